"""tnllm: TransNormerLLM and Lightning Attention in JAX."""
from tnllm.attention import lightning_attention, lightning_attention_step
from tnllm.config import ModelConfig
from tnllm.model import TransNormerLLM

__all__ = ["ModelConfig", "TransNormerLLM", "lightning_attention", "lightning_attention_step"]
