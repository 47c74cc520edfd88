"""Long-Range Arena ListOps: the generated data, the encoder classifier and its training budget.

`python -m bench.listops` trains the classifier once per token mixer (cosFormer and softmax) with this
budget; override fields with `--config.train.steps=...`.
"""
import dataclasses

import ml_collections

from tnllm.listops import ClassifierConfig, Grammar, TrainConfig


def get_config():
    cfg = ml_collections.ConfigDict()
    # The LRA ListOps model: 4 layers, width 512, 8 heads; bfloat16 activations, float32 parameters.
    # Softmax attention as cuDNN flash attention: XLA's holds 4 GiB of float32 logits per layer at
    # batch 32 and 2,000 tokens (the bench falls back to XLA where cuDNN fails, and off GPUs).
    cfg.model = ml_collections.ConfigDict(dataclasses.asdict(
        ClassifierConfig(dtype="bfloat16", softmax_impl="cudnn")))
    cfg.data = ml_collections.ConfigDict(dataclasses.asdict(Grammar()))
    cfg.data.seed = 0
    cfg.data.num_test = 2000
    cfg.data.workers = 0  # processes generating the data; 0 = one per CPU core
    # AdamW, lr 1e-3 (TrainConfig says why), 1,200 steps x 32 sequences.
    cfg.train = ml_collections.ConfigDict(dataclasses.asdict(TrainConfig()))
    cfg.token_mixers = ("cosformer", "softmax")
    return cfg
