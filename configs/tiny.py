"""Tiny TransNormerLLM for tests and CPU runs (byte-level vocabulary: 256 bytes + PAD, BOS, EOS).

Its training defaults are what `python train.py` runs: a few minutes on a 2-core CPU over the Python
standard library's sources.
"""
from tnllm.config import base_config


def get_config():
    cfg = base_config()
    cfg.model.update(vocab_size=259, d_model=64, num_layers=2, num_heads=2, glu_dim=128,
                     scale_embedding=True, lrpe_layers=[0])
    cfg.data.update(seq_len=256)
    cfg.optim.update(lr=6e-3, warmup_steps=50)
    cfg.train.update(steps=600, batch_size=32, eval_every=200)
    cfg.checkpoint.update(every=200)
    return cfg
