"""The tiny language model with cosFormer token mixers (SPEC.md §10) instead of gated linear attention.

Everything else (SRMSNorm, SGLU, tied embedding) is unchanged. M = cosformer_max_len must cover the
longest context the model sees in training and generation.
"""
from tnllm.config import base_config


def get_config():
    cfg = base_config()
    cfg.model.update(vocab_size=256, d_model=64, num_layers=2, num_heads=2, glu_dim=128,
                     scale_embedding=True, lrpe_layers=[], token_mixer="cosformer",
                     cosformer_max_len=2048)
    return cfg
