"""The tiny language model with cosFormer token mixers (docs/spec.md §10) instead of gated linear attention.

Everything else (SRMSNorm, SGLU, tied embedding, the byte vocabulary and the CPU training defaults of
configs/tiny.py) is unchanged. M = cosformer_max_len must cover the longest context the model sees in
training and generation.
"""
import os

from tnllm.config import load


def get_config():
    cfg = load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py"))
    cfg.model.update(lrpe_layers=[], token_mixer="cosformer", cosformer_max_len=2048)
    return cfg
