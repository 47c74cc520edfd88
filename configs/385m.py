"""TransNormerLLM-385M (docs/spec.md §5): 398,984,192 parameters with the tied embedding."""
from tnllm.config import LOSS_CHUNK, base_config


def get_config():
    cfg = base_config()
    cfg.model.update(vocab_size=64000, d_model=1024, num_layers=24, num_heads=8, glu_dim=2816,
                     scale_embedding=True, lrpe_layers=[0], dtype="bfloat16",
                     loss_chunk=LOSS_CHUNK)
    # 32 x 2048 tokens per step in micro-batches of 8 sequences: 8 x 2048 fit one H100 80GB
    # without rematerialisation (docs/training.md).
    cfg.train.update(batch_size=32, grad_accum_steps=4)
    return cfg
