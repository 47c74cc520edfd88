"""TransNormerLLM-7B (docs/spec.md §5): 6,836,719,616 parameters with the tied embedding."""
from tnllm.config import LOSS_CHUNK, base_config


def get_config():
    cfg = base_config()
    cfg.model.update(vocab_size=64000, d_model=4096, num_layers=30, num_heads=32, glu_dim=11008,
                     scale_embedding=False, lrpe_layers=[0], dtype="bfloat16",
                     loss_chunk=LOSS_CHUNK)
    return cfg
