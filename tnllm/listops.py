"""Long-Range Arena ListOps, generated offline, and the encoder classifier that reads it.

The task (Nangia & Bowman 2018, as generated for LRA by Tay et al. 2020): evaluate a nested prefix
expression such as `[MAX 4 3 [MIN 2 3 ] 1 0 [MED 1 5 8 9 2 ] ]` to a digit (10 classes). Operators MIN,
MAX, MED (the median rounded down) and SM (sum mod 10) take 2 to `max_args` arguments; each node
below `max_depth` is an operator with probability 1/4 (the root is depth 1), otherwise a digit. Trees
are redrawn until their token count lies strictly between `min_length` and `max_length`; LRA's splits
hold 96,000 / 2,000 / 2,000 examples. Tokens are the operators, the digits and `]`. (LRA's text
pipeline also dropped `]`, leaving expressions ambiguous; here it stays, as in the grammar.)

Example `index` of a split is drawn from its own random stream, seeded by (seed, split, index): the
data depend on nothing else, so any number of processes can generate them and a split's first n
examples are the same whatever its size.

The classifier (the LRA ListOps model: 4 layers, width 512, 8 heads) is a pre-LayerNorm Transformer
encoder with sinusoidal positions, mean pooling over real tokens and an MLP head; its token mixer is
bidirectional cosFormer (`tnllm.cosformer`) or softmax attention (`tnllm.softmax.encoder_attention`,
XLA or cuDNN flash attention), each chosen by the language model's policy for "auto".
`train_classifier` trains it with AdamW and `accuracy` tests it.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import math
import multiprocessing
import os
import random
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from tnllm import softmax
from tnllm.config import IMPLS, ModelConfig
from tnllm.cosformer import CosformerAttention

Array = jax.Array

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
VOCAB = ("<pad>",) + tuple(str(d) for d in range(10)) + OPERATORS + ("]",)
PAD = 0
_DIGIT = 1  # id of "0"
_OPERATOR = VOCAB.index("[MIN")
_CLOSE = VOCAB.index("]")
NUM_CLASSES = 10
SPLITS = {"train": 96_000, "validation": 2_000, "test": 2_000}
TOKEN_MIXERS = ("cosformer", "softmax")
_OPERATOR_P = 0.25  # LRA's VALUE_P: a node is a digit when a uniform draw exceeds it


@dataclasses.dataclass(frozen=True)
class Grammar:
    """The generator's parameters (LRA's defaults); lengths are exclusive bounds on the token count."""

    max_depth: int = 10
    max_args: int = 10
    min_length: int = 500
    max_length: int = 2000

    def __post_init__(self):
        if not 1 <= self.max_depth or not 2 <= self.max_args:
            raise ValueError("ListOps needs max_depth >= 1 and max_args >= 2.")
        if not 0 <= self.min_length < self.max_length - 1:
            raise ValueError(f"ListOps min_length ({self.min_length}) must be below max_length - 1 "
                             f"({self.max_length - 1}): both bounds are exclusive.")


class _TooLong(Exception):
    pass


def _operator_value(op: int, args: List[int]) -> int:
    if op == 0:
        return min(args)
    if op == 1:
        return max(args)
    if op == 2:  # LRA: int(np.median(args))
        s, mid = sorted(args), len(args) // 2
        return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) // 2
    return sum(args) % 10


def _tree(rng: random.Random, depth: int, grammar: Grammar, out: List[int]) -> int:
    """Appends one subtree's tokens to `out` and returns its value."""
    if depth >= grammar.max_depth or rng.random() > _OPERATOR_P:
        value = rng.randrange(10)
        out.append(_DIGIT + value)
        return value
    op = rng.randrange(len(OPERATORS))
    out.append(_OPERATOR + op)
    args = []
    for _ in range(rng.randint(2, grammar.max_args)):
        args.append(_tree(rng, depth + 1, grammar, out))
        if len(out) >= grammar.max_length:  # rejected anyway: stop growing it
            raise _TooLong
    out.append(_CLOSE)
    return _operator_value(op, args)


def example(split: str, index: int, *, seed: int = 0, grammar: Grammar = Grammar()) -> Tuple[List[int], int]:
    """Example `index` of `split`: its token ids (no padding) and its label 0..9."""
    rng = random.Random(f"listops/{seed}/{split}/{index}")
    while True:
        tokens: List[int] = []
        try:
            label = _tree(rng, 1, grammar, tokens)
        except _TooLong:
            continue
        if grammar.min_length < len(tokens) < grammar.max_length:
            return tokens, label


def _examples(split: str, indices: Sequence[int], seed: int, grammar: Grammar,
              width: int) -> Tuple[np.ndarray, np.ndarray]:
    tokens = np.full((len(indices), width), PAD, np.uint8)  # 4x less to send between processes
    labels = np.empty(len(indices), np.int32)
    for row, i in enumerate(indices):
        ids, labels[row] = example(split, i, seed=seed, grammar=grammar)
        tokens[row, :len(ids)] = ids
    return tokens, labels


def generate(split: str, num_examples: Optional[int] = None, *, seed: int = 0,
             grammar: Grammar = Grammar(),
             executor: Optional[concurrent.futures.Executor] = None) -> Tuple[np.ndarray, np.ndarray]:
    """The first `num_examples` (default: LRA's split size) examples of `split`.

    Returns tokens [n, max_length - 1] int32 padded with PAD (0) at the end, and labels [n] int32.
    With an `executor` (e.g. a process pool) the examples are generated in parallel pieces; the
    result is the same.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown ListOps split {split!r}; choose one of {', '.join(SPLITS)}.")
    n = SPLITS[split] if num_examples is None else num_examples
    width = grammar.max_length - 1
    if executor is None:
        tokens, labels = _examples(split, range(n), seed, grammar, width)
    else:
        bounds = np.linspace(0, n, 64 + 1).astype(int)
        pieces = [executor.submit(_examples, split, range(a, b), seed, grammar, width)
                  for a, b in zip(bounds[:-1], bounds[1:])]
        tokens, labels = (np.concatenate(parts) for parts in zip(*(p.result() for p in pieces)))
    return tokens.astype(np.int32), labels


def generate_splits(sizes: Mapping[str, int], *, seed: int = 0, grammar: Grammar = Grammar(),
                    workers: int = 0) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """`generate(split, n)` for each split and n in `sizes`, on `workers` processes (0: one per CPU
    core; 1: this process). The processes are spawned: forking a process that has started JAX can
    deadlock."""
    workers = workers or os.cpu_count()
    spawn = multiprocessing.get_context("spawn")
    with (concurrent.futures.ProcessPoolExecutor(workers, mp_context=spawn) if workers > 1
          else contextlib.nullcontext()) as pool:
        return {split: generate(split, n, seed=seed, grammar=grammar, executor=pool)
                for split, n in sizes.items()}


def from_config(cls, fields: Mapping[str, Any], section: str, ignore: Sequence[str] = ()):
    """cls (Grammar, ClassifierConfig or TrainConfig) from the fields of config.<section>, refusing
    fields that neither it knows nor `ignore` names."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known - set(ignore))
    if unknown:
        raise ValueError(f"Unknown config.{section} field(s) {', '.join(unknown)}; known fields are "
                         f"{', '.join(sorted(known))}.")
    return cls(**{k: v for k, v in fields.items() if k in known})


# ----------------------------------------------------------------------------------------------
# the encoder classifier
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """The LRA ListOps encoder; `max_len` bounds the sequence length and is cosFormer's M.

    softmax_impl: the form of softmax attention, "auto" (`tnllm.attention.choose_impl`), "xla" or
    "cudnn"; cosFormer runs its "auto" form.
    """

    token_mixer: str = "cosformer"
    num_layers: int = 4
    d_model: int = 512
    num_heads: int = 8
    mlp_dim: int = 1024
    max_len: int = 2000
    vocab_size: int = len(VOCAB)
    num_classes: int = NUM_CLASSES
    dtype: str = "float32"
    softmax_impl: str = "auto"

    def __post_init__(self):
        if self.token_mixer not in TOKEN_MIXERS:
            raise ValueError(f"config.model.token_mixer is {self.token_mixer!r}; choose one of "
                             f"{', '.join(TOKEN_MIXERS)}.")
        if self.softmax_impl not in IMPLS["softmax"]:
            raise ValueError(f"config.model.softmax_impl is {self.softmax_impl!r}; choose one of "
                             f"{', '.join(IMPLS['softmax'])}.")
        if self.d_model % self.num_heads:
            raise ValueError(f"config.model.d_model ({self.d_model}) must be divisible by "
                             f"config.model.num_heads ({self.num_heads}).")

    def cosformer_config(self) -> ModelConfig:
        """cosFormer's part as a language-model config, from which every token mixer is built."""
        return ModelConfig(vocab_size=self.vocab_size, d_model=self.d_model, num_heads=self.num_heads,
                           token_mixer="cosformer", cosformer_max_len=self.max_len, dtype=self.dtype)


def sinusoidal_positions(length: int, width: int) -> Array:
    """[length, width] f32 sin/cos position codes (Vaswani et al.)."""
    pos = np.arange(length)[:, None]
    freq = np.exp(-math.log(10000.0) * np.arange(0, width, 2) / width)
    codes = np.zeros((length, width), np.float32)
    codes[:, 0::2], codes[:, 1::2] = np.sin(pos * freq), np.cos(pos * freq)
    return jnp.asarray(codes)


class EncoderBlock(nn.Module):
    """x + Mixer(LN(x)), then x + MLP(LN(x)) with a GELU MLP."""

    cfg: ClassifierConfig

    @nn.compact
    def __call__(self, x: Array, mask: Array) -> Array:
        cfg = self.cfg
        y = nn.LayerNorm(dtype=cfg.dtype)(x)
        if cfg.token_mixer == "cosformer":
            cosformer = CosformerAttention(cfg.cosformer_config(), causal=False,
                                           kernel_init=nn.initializers.lecun_normal(), name="attention")
            y, _ = cosformer(y, mask=mask)
        else:
            # Flax's projections (with biases, no RoPE) around the language model's softmax attention.
            attend = functools.partial(softmax.encoder_attention, impl=cfg.softmax_impl)
            y = nn.MultiHeadDotProductAttention(cfg.num_heads, dtype=cfg.dtype, attention_fn=attend,
                                                name="attention")(y, mask=mask[:, None, None, :])
        x = x + y
        y = nn.LayerNorm(dtype=cfg.dtype)(x)
        y = nn.Dense(cfg.d_model, dtype=cfg.dtype)(nn.gelu(nn.Dense(cfg.mlp_dim, dtype=cfg.dtype)(y)))
        return x + y


class ListOpsClassifier(nn.Module):
    """Token + position embedding, `num_layers` encoder blocks, LayerNorm, mean pool, MLP head."""

    cfg: ClassifierConfig

    @nn.compact
    def __call__(self, tokens: Array) -> Array:
        """tokens: [batch, seq] int, PAD (0) at padding. Returns logits [batch, num_classes] f32."""
        cfg = self.cfg
        if tokens.shape[1] > cfg.max_len:
            raise ValueError(f"Sequences of {tokens.shape[1]} tokens exceed config.model.max_len "
                             f"({cfg.max_len}); raise it to the longest sequence.")
        mask = tokens != PAD
        x = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype)(tokens)
        x = x + sinusoidal_positions(tokens.shape[1], cfg.d_model).astype(x.dtype)
        for i in range(cfg.num_layers):
            x = EncoderBlock(cfg, name=f"layers_{i}")(x, mask)
        x = nn.LayerNorm(dtype=cfg.dtype)(x)
        weights = mask[..., None].astype(jnp.float32)
        pooled = jnp.sum(x.astype(jnp.float32) * weights, 1) / jnp.maximum(jnp.sum(weights, 1), 1.0)
        h = nn.relu(nn.Dense(cfg.mlp_dim, dtype=cfg.dtype)(pooled))
        return nn.Dense(cfg.num_classes, dtype=cfg.dtype)(h).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# training and testing the classifier
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """AdamW (b2 0.98) on a warmup-cosine schedule, gradients clipped to norm `grad_clip`; `steps`
    batches of `batch_size` sequences, in epochs of permutations seeded by `seed` (which also seeds
    the parameters), so that every token mixer sees the same data in the same order.

    lr 1e-3: at 5e-4 cosFormer sits on the loss plateau (ln 10) far longer than softmax (CPU, 200
    tokens, 2 layers x 64, 600 steps: test acc. 22.8% vs 35.2%); at 1e-3 it leaves the plateau by
    step 300 as softmax does at 5e-4 (34.2%), bf16 alike (34.8%).
    """

    steps: int = 1200
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"config.train.steps ({self.steps}) and config.train.batch_size "
                             f"({self.batch_size}) must be at least 1.")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"config.train.warmup_steps ({self.warmup_steps}) must lie in "
                             f"[0, config.train.steps) = [0, {self.steps}).")


def train_classifier(cfg: ClassifierConfig, tc: TrainConfig, tokens: np.ndarray,
                     labels: np.ndarray) -> Tuple[Any, dict]:
    """Trains `ListOpsClassifier(cfg)` on tokens [n, seq] int32 and labels [n] (n >= batch_size),
    showing a tqdm bar (loss, batch accuracy, tokens/s).

    Returns the parameters and a dict: loss_curve [(step, loss)] every 10 steps and at the last,
    final_train_loss (the mean of its last tenth), compile_s, train_s (the steps after
    compilation) and padded_tokens_per_s (padding counted).
    """
    if len(tokens) < tc.batch_size:
        raise ValueError(f"{len(tokens)} training examples are fewer than config.train.batch_size "
                         f"({tc.batch_size}); generate more or lower the batch size.")
    net = ListOpsClassifier(cfg)
    schedule = optax.warmup_cosine_decay_schedule(0.0, tc.learning_rate, tc.warmup_steps, tc.steps)
    tx = optax.chain(optax.clip_by_global_norm(tc.grad_clip),
                     optax.adamw(schedule, b2=0.98, weight_decay=tc.weight_decay))
    batch = tc.batch_size
    params = jax.jit(net.init)(jax.random.PRNGKey(tc.seed), jnp.asarray(tokens[:batch]))
    opt_state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, x, y):
        def loss_fn(p):
            logits = net.apply(p, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        batch_accuracy = jnp.mean(jnp.argmax(logits, -1) == y)
        return optax.apply_updates(params, updates), opt_state, loss, batch_accuracy

    rng = np.random.default_rng(tc.seed)
    epochs = -(-tc.steps * batch // len(tokens))
    order = np.concatenate([rng.permutation(len(tokens)) for _ in range(epochs)])

    t0 = time.perf_counter()
    step_fn = train_step.lower(params, opt_state, tokens[:batch], labels[:batch]).compile()
    compile_s = time.perf_counter() - t0
    losses = []
    bar = tqdm(range(tc.steps), desc=cfg.token_mixer, unit="step")
    t0 = time.perf_counter()
    for step in bar:
        idx = order[step * batch:(step + 1) * batch]
        params, opt_state, loss, batch_accuracy = step_fn(params, opt_state, tokens[idx], labels[idx])
        if step % 10 == 0 or step == tc.steps - 1:
            losses.append((step, float(loss)))  # also syncs, so the rate below is honest
            rate = (step + 1) * batch * tokens.shape[1] / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{losses[-1][1]:.3f}", acc=f"{float(batch_accuracy):.2f}",
                            tokens_per_s=f"{rate:,.0f}")
    train_s = time.perf_counter() - t0
    tail = [loss for _, loss in losses[-max(1, len(losses) // 10):]]
    return params, {"loss_curve": losses, "final_train_loss": float(np.mean(tail)),
                    "compile_s": compile_s, "train_s": train_s,
                    "padded_tokens_per_s": tc.steps * batch * tokens.shape[1] / train_s}


def accuracy(cfg: ClassifierConfig, params: Any, tokens: np.ndarray, labels: np.ndarray,
             batch_size: int) -> float:
    """Percent of the examples (tokens [n, seq], labels [n]) classified right, in batches of
    batch_size; the last batch is filled with repeated examples (not counted), so that every
    batch has the shape `train_classifier` compiled."""
    predict = jax.jit(lambda p, x: jnp.argmax(ListOpsClassifier(cfg).apply(p, x), -1))
    n = len(tokens)
    rows = np.concatenate([np.arange(n), np.arange(-n % batch_size) % n])
    preds = np.concatenate([np.asarray(predict(params, tokens[rows[i:i + batch_size]]))
                            for i in range(0, len(rows), batch_size)])[:n]
    return float(np.mean(preds == labels)) * 100.0
