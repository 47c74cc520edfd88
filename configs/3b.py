"""TransNormerLLM2-3B (docs/spec.md §5): 2,911,111,680 parameters with the tied embedding."""
from tnllm.config import LOSS_CHUNK, base_config


def get_config():
    cfg = base_config()
    cfg.model.update(vocab_size=64000, d_model=2560, num_layers=32, num_heads=20, glu_dim=6912,
                     scale_embedding=False, lrpe_layers=[0], dtype="bfloat16",
                     loss_chunk=LOSS_CHUNK)
    return cfg
