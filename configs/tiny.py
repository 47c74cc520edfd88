"""Tiny TransNormerLLM for tests and CPU runs (byte-level vocabulary)."""
from tnllm.config import base_config


def get_config():
    cfg = base_config()
    cfg.model.update(vocab_size=259, d_model=64, num_layers=2, num_heads=2, glu_dim=128,
                     scale_embedding=True, lrpe_layers=[0])
    return cfg
