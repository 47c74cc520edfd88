"""The softmax-attention Transformer baseline (docs/spec.md §11) of the size of configs/385m.py.

LLaMA-style: softmax attention with RoPE, RMSNorm with a learned weight, SwiGLU; everything else as in
configs/385m.py: d_model 1024, 24 layers, 8 heads, vocab 64000 (and its training defaults). Its
attention has 4·d² weights per layer against GLA's 5·d², so SwiGLU is widened by about d/3 (rounded to a
multiple of 128) to keep the parameter count within 2% of the TNL model (tests/test_softmax.py checks
it).
"""
import os

from tnllm.config import load


def get_config():
    cfg = load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "385m.py"))
    cfg.model.update(token_mixer="softmax", lrpe_layers=[], glu_dim=3200, max_cache_len=2048)
    return cfg
