"""The softmax-attention Transformer baseline (docs/spec.md §11) of the size of configs/tiny.py.

LLaMA-style: softmax attention with RoPE, RMSNorm with a learned weight, SwiGLU; everything else as in
configs/tiny.py: d_model 64, 2 layers, 2 heads, vocab 259 (and its training defaults). Its attention has
4·d² weights per layer against GLA's 5·d², so SwiGLU is widened by about d/3 (rounded to a multiple of
8) to keep the parameter count within 2% of the TNL model (tests/test_softmax.py checks it).
"""
import os

from tnllm.config import load


def get_config():
    cfg = load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py"))
    cfg.model.update(token_mixer="softmax", lrpe_layers=[], glu_dim=152, max_cache_len=2048)
    return cfg
