"""TransNormerLLM-1B (docs/spec.md §5): 1,020,266,496 parameters with the tied embedding."""
from tnllm.config import LOSS_CHUNK, base_config


def get_config():
    cfg = base_config()
    cfg.model.update(vocab_size=64000, d_model=2048, num_layers=16, num_heads=16, glu_dim=5632,
                     scale_embedding=True, lrpe_layers=[0], dtype="bfloat16",
                     loss_chunk=LOSS_CHUNK)
    return cfg
