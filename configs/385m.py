"""TransNormerLLM-385M (SPEC.md §5): 398,984,192 parameters with the tied embedding."""
from tnllm.config import base_config


def get_config():
    cfg = base_config()
    cfg.model.update(vocab_size=64000, d_model=1024, num_layers=24, num_heads=8, glu_dim=2816,
                     scale_embedding=True, lrpe_layers=[0], dtype="bfloat16")
    return cfg
