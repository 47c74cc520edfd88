"""Training: the optimizer, one pure `train_step`, evaluation, and the training loop.

`train(cfg, workdir)` takes the work directory's lock, tokenizes the data once (tnllm.data), builds
or restores the TrainState, compiles `train_step` once with shardings over the configured mesh and a
donated state, then loops: a tqdm bar (step, loss, tokens/s), metrics to WORKDIR/metrics.jsonl and
TensorBoard (tnllm.metrics), validation loss and perplexity, asynchronous Orbax checkpoints
(tnllm.checkpoint); at the end a loss curve (WORKDIR/loss.png) and a sampled continuation of a
validation prompt (tnllm.generate).

SIGTERM or SIGINT (Ctrl-C), whenever it comes (while compiling, stepping, evaluating or saving),
lets the step in flight finish, saves it and waits until the save is committed; a second signal
meanwhile only says so. Rerunning with the same work directory resumes exactly where it stopped.
docs/training.md ("Reliability") lists what survives which fault.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training.train_state import TrainState
from tqdm import tqdm

from tnllm import config as config_lib
from tnllm import data, distributed, generate, instruct, sharding
from tnllm.attention import document_positions
from tnllm.checkpoint import (DAMAGED, EXPORT_CONFIG, StorageError, TrainCheckpoints, WorkdirLock,
                              abstract_params, check_shapes, load_model)
from tnllm.loss import cross_entropy_sum, sequence_slices
from tnllm.metrics import (METRICS, MetricsLog, flops_per_token, peak_flops, peak_memory_bytes,
                           plot_losses)
from tnllm.model import TransNormerLLM, zero_states
from tnllm.sampling import make_sampler
from tnllm.tokenizer import BYTE_SPEC, load_tokenizer

SAMPLE_PROMPT_TOKENS = 64
SAMPLE_TEMPERATURE = 0.7


# ----------------------------------------------------------------------------- optimizer and steps


def decay_mask(params: Any) -> Any:
    """True for weight matrices and the embedding; LRPE's theta (and any bias) is not decayed."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in ("kernel", "embedding"), params)


def make_optimizer(cfg: ml_collections.ConfigDict) -> Tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warmup then cosine decay to lr * min_lr_ratio, after global-norm clipping."""
    o = cfg.optim
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=o.lr, warmup_steps=o.warmup_steps, decay_steps=cfg.train.steps,
        end_value=o.lr * o.min_lr_ratio)
    adamw = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                        mask=decay_mask)
    if o.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(o.grad_clip), adamw), schedule
    return adamw, schedule


def weighted_loss(model: TransNormerLLM, params: Any, tokens: jax.Array,
                  weights: jax.Array, segment_ids: Optional[jax.Array] = None) -> jax.Array:
    """Σ weights · next-token cross-entropy. tokens: [batch, seq_len + 1]; weights: [batch, seq_len];
    segment_ids: None or [batch, seq_len] int packed documents of the inputs (`TransNormerLLM`).

    With config.model.loss_chunk the head and loss run that many tokens at a time (tnllm.loss),
    never holding all [batch, seq_len, vocab] logits. With config.model.train_segment the model
    runs that many positions at a time, each layer's recurrent state carried into the next segment,
    and a segment's forward pass is recomputed in the backward pass: activation memory is one
    segment's, whatever seq_len, and the gradients are exact (the states' cotangents flow back).
    """
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    segment = model.cfg.train_segment
    if not segment or inputs.shape[1] <= segment:
        return _run_loss(model, params, inputs, labels, weights, None, None, segment_ids)[1]

    @jax.checkpoint
    def run_segment(states, xs):
        return _run_loss(model, params, *xs[:4], states, *xs[4:])

    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
    packed = ()
    if segment_ids is not None:  # each segment's first document continues the state carried in
        positions, packed = document_positions(segment_ids), (segment_ids,)
    # The last segment is padded at its end with zero weights: causal, so no real token sees it.
    xs = tuple(sequence_slices(x, segment) for x in (inputs, labels, weights, positions) + packed)
    _, losses = jax.lax.scan(run_segment, zero_states(model.cfg, inputs.shape[0]), xs)
    return jnp.sum(losses)


def params_from_export(path: str, expected: Any, shardings: Any) -> Any:
    """The parameters of the export at `path` (config.train.init_from), cast to the dtypes of
    `expected` (the config's parameter tree of ShapeDtypeStructs) and placed per `shardings`.

    Raises one sentence when the export is missing or its shapes differ from the config's."""
    if not os.path.isfile(os.path.join(path, EXPORT_CONFIG)):
        raise FileNotFoundError(f"config.train.init_from = {path!r} is not an export (no "
                                f"{EXPORT_CONFIG}); pass a directory written by `python -m "
                                "tnllm.checkpoint export` or `python -m tnllm.convert import`.")
    _, params = load_model(path)
    check_shapes(expected, params, f"The export {path} (config.train.init_from)",
                 "set config.model to the export's model (its config.json)")
    return jax.tree.map(lambda x, want, where: jax.device_put(x.astype(want.dtype), where),
                        params, expected, shardings)


def _run_loss(model, params, inputs, labels, weights, positions, states, segment_ids=None):
    """(each layer's final state, Σ weights · cross-entropy) of one model run over inputs [b, s]."""
    if model.cfg.loss_chunk:
        hidden, states = model.apply({"params": params}, inputs, positions, None, states,
                                     return_hidden=True, segment_ids=segment_ids)
        return states, cross_entropy_sum(hidden, params["embed_tokens"]["embedding"], labels,
                                         weights, model.cfg.loss_chunk)
    logits, states = model.apply({"params": params}, inputs, positions, None, states,
                                 segment_ids=segment_ids)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return states, jnp.sum(losses * weights)


def init_state(model: TransNormerLLM, tx: optax.GradientTransformation, rng: jax.Array,
               boxed: bool = False) -> TrainState:
    """A fresh TrainState (step 0 as an int32 array); `boxed` keeps the logical axis metadata."""
    params = model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]
    return TrainState.create(apply_fn=model.apply, params=params if boxed else nn.unbox(params),
                             tx=tx).replace(step=jnp.zeros((), jnp.int32))


def make_train_step(model: TransNormerLLM, schedule: optax.Schedule):
    """The pure step: one optimizer update from the gradient of the batch's loss, summed over its
    micro-batches.

    The loss is the mean next-token cross-entropy over the target tokens of the whole batch, all
    micro-batches together (not a mean of per-row means): every token of plain text, or with packed
    instruction data the tokens its loss mask marks."""

    def train_step(state: TrainState, batch) -> Tuple[TrainState, Dict[str, jax.Array]]:
        """batch: tokens [micro_batches, rows, seq_len + 1] int32; with packed documents the tuple
        (tokens, targets [micro_batches, rows, seq_len] f32 (1 where the label is a target),
        segment_ids [micro_batches, rows, seq_len] int32)."""
        tokens, targets, segment_ids = batch if isinstance(batch, tuple) else (batch, None, None)
        if targets is None:
            targets = jnp.ones(tokens[..., 1:].shape, jnp.float32)
        weights = targets / jnp.maximum(jnp.sum(targets), 1.0)

        def micro_step(grad_sum, xs):
            loss, grads = jax.value_and_grad(lambda p: weighted_loss(model, p, *xs))(state.params)
            return jax.tree.map(jnp.add, grad_sum, grads), loss

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grads, losses = jax.lax.scan(micro_step, zeros, (tokens, weights, segment_ids))
        metrics = dict(loss=losses.sum(), grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
        return state.apply_gradients(grads=grads), metrics

    return train_step


def make_eval_step(model: TransNormerLLM):
    def eval_step(params: Any, tokens: jax.Array, weights: jax.Array) -> jax.Array:
        """tokens: [batch, seq_len + 1]; weights: [batch] f32 (0 for padding rows) -> weighted loss sum."""
        seq_len = tokens.shape[1] - 1
        per_token = jnp.broadcast_to(weights[:, None] / seq_len, (weights.shape[0], seq_len))
        return weighted_loss(model, params, tokens, per_token)

    return eval_step


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class Result:
    """What a call of `train` ended with. Losses are nats per token; per byte divides by bytes."""

    step: int
    interrupted_by: Optional[int] = None  # the signal that stopped the run early
    saved_step: Optional[int] = None  # after a signal: the step whose checkpoint is committed
    val_loss: float = math.nan
    val_nats_per_byte: float = math.nan
    unigram_nats_per_byte: float = math.nan
    tokens_per_s: float = math.nan  # medians over this call's logging intervals
    mfu: Optional[float] = None  # None when the devices' peak FLOP/s is unknown
    peak_memory_bytes: Optional[int] = None  # the most any one local device held; None off GPUs
    sample: str = ""


def _check_finite(records: List[Tuple[int, Dict[str, float]]], last_checkpoint: Optional[int]) -> None:
    """Stops at a non-finite loss. Restored states are checked finite (tnllm.checkpoint.verify), so
    the loss went bad in this run's own steps and the learning rate is the likely cause."""
    for step, values in records:
        if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
            kept = ("no checkpoint was written" if last_checkpoint is None
                    else f"the last good checkpoint (step {last_checkpoint}) is kept")
            raise FloatingPointError(
                f"The loss became {values['loss']} (gradient norm {values['grad_norm']}) at step "
                f"{step}; stopped without saving, {kept}; lower config.optim.lr or raise "
                "config.optim.warmup_steps.")


class StopSignals:
    """Turns SIGTERM / SIGINT into a request to stop after the current step, for the whole run.

    The handler only records the signal: the loop looks at `received` between steps, after each
    blocking wait (device_get, evaluation, compilation), so a signal that arrives during any of them
    is acted on at the next step boundary. Later signals do not kill the run while it saves (a kill
    could not damage a committed checkpoint, but would lose the one being written); SIGKILL still
    stops it at once. `early` holds signals that a caller recorded before this was installed.
    """

    def __init__(self, early: Sequence[int] = ()):
        self.received: Optional[int] = None
        self._early = early
        self._previous = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self._previous[s] = signal.signal(s, self._handle)
        if self._early and self.received is None:
            self.received = self._early[0]
        return self

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signum
            return
        print(f"Signal {signum} again: still finishing the current step and saving it; training "
              "stops once the checkpoint is committed (SIGKILL stops at once and keeps the "
              "previous checkpoint).", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _global_array(rows: np.ndarray, sharding_: jax.sharding.Sharding) -> jax.Array:
    """The global array whose value is `rows`, built from this process's share of them."""
    mine = distributed.local_rows(sharding_, rows.shape)
    return jax.make_array_from_process_local_data(sharding_, rows[mine], rows.shape)


def _earlier_training(workdir: str) -> str:
    """What in `workdir` shows an earlier run though no checkpoint is readable; "" when nothing."""
    damaged = os.path.join(workdir, DAMAGED)
    if os.path.isdir(damaged) and os.listdir(damaged):
        return f"damaged checkpoints in {damaged}"
    if os.path.isfile(os.path.join(workdir, METRICS)) and os.path.getsize(
            os.path.join(workdir, METRICS)):
        return f"the metrics of earlier steps in {os.path.join(workdir, METRICS)}"
    return ""


class _Setup:
    """Everything `train` builds before the loop: data, mesh, model, compiled steps, state.

    from_scratch: start from step 0 although the work directory shows earlier training (its
    checkpoints all damaged, or metrics without a checkpoint); a readable checkpoint is never
    ignored.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, workdir: str, from_scratch: bool = False):
        self.model_cfg = config_lib.check(cfg)
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        if self.tokenizer.vocab_size > self.model_cfg.vocab_size:
            raise ValueError(
                f"The tokenizer {cfg.data.tokenizer!r} has {self.tokenizer.vocab_size} ids but "
                f"config.model.vocab_size is {self.model_cfg.vocab_size}; set config.model.vocab_size "
                f"to at least {self.tokenizer.vocab_size}.")
        if cfg.data.tokenizer != BYTE_SPEC:  # checkpoints must find it from any working directory
            cfg.data.tokenizer = os.path.abspath(cfg.data.tokenizer)
        t = cfg.train
        self.micro_batch = t.batch_size // t.grad_accum_steps
        self.packed = cfg.data.packing == "documents"  # whole documents per window (tnllm.instruct)
        if self.packed:
            self.store = instruct.Store(cfg.data, self.tokenizer)
            self.loader = instruct.Loader(self.store, t.batch_size, t.seed)
            self.val = self.store.splits["val"]
            if distributed.is_main_process():
                print(f"Packed {len(self.loader.windows.documents)} training records into windows of "
                      f"{cfg.data.seq_len + 1} tokens; {self.loader.windows.waste():.1%} of the window "
                      "tokens are padding.")
        else:
            self.store = data.TokenStore(cfg.data, self.tokenizer)
            self.loader = data.Loader(self.store, cfg.data.seq_len, t.batch_size, t.seed)
            self.val = data.Windows(self.store.splits["val"], cfg.data.seq_len, "val")
        self.mesh = sharding.make_mesh(cfg.mesh)
        sharding.check_batch(self.micro_batch, self.mesh, "The micro-batch (config.train.batch_size "
                                                          "/ config.train.grad_accum_steps)")
        self.model = TransNormerLLM(self.model_cfg)
        self.tx, schedule = make_optimizer(cfg)
        self.checkpoints = TrainCheckpoints(workdir, cfg.checkpoint.keep, cfg.checkpoint.async_save)
        try:
            # Traced under the mesh, so that the model's logical constraints place its activations.
            with sharding.use_mesh(self.mesh):
                self._build_state(cfg, workdir, from_scratch)
                self._compile(cfg, schedule)
        except BaseException:
            self.checkpoints.close()
            raise

    def _init_state(self, rng: jax.Array) -> TrainState:
        return init_state(self.model, self.tx, rng, boxed=True)

    def _build_state(self, cfg: ml_collections.ConfigDict, workdir: str, from_scratch: bool) -> None:
        rng = jax.random.key(cfg.train.seed)
        # One trace of the model's init gives the state's shapes and its logical axes, thus its
        # shardings: a restore needs both, and a fresh state is then born on its shards.
        boxed = jax.eval_shape(self._init_state, rng)
        sharding.check_params(boxed.params, self.mesh)
        self.state_sharding = sharding.logical_to_sharding(nn.get_partition_spec(boxed), self.mesh)
        # A box holds one array, so the boxed tree's leaves are the state's, in the same order.
        self.abstract_state = jax.tree.unflatten(jax.tree.structure(self.state_sharding), [
            jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
            for a, s in zip(jax.tree.leaves(boxed), jax.tree.leaves(self.state_sharding), strict=True)])
        a = self.abstract_state
        restored = self.checkpoints.restore_latest(dict(params=a.params, opt_state=a.opt_state), cfg)
        if restored is None:
            earlier = _earlier_training(workdir)
            if earlier and not from_scratch:
                raise StorageError(
                    f"Work directory {workdir} holds no readable checkpoint but {earlier}; pass "
                    "--from_scratch to train again from step 0 there, or pass a new --workdir.")
            if from_scratch and distributed.is_main_process() and os.path.isfile(
                    os.path.join(workdir, METRICS)):
                _set_metrics_aside(workdir)
            self.state, _ = sharding.init_sharded(self._init_state, self.mesh, rng,
                                                  shardings=self.state_sharding)
            if cfg.train.init_from:
                self.state = self.state.replace(params=params_from_export(
                    cfg.train.init_from, a.params, self.state_sharding.params))
            self.resumed_from = None
            return
        if from_scratch:
            raise StorageError(
                f"--from_scratch was given but work directory {workdir} holds a readable checkpoint "
                f"(step {restored[0]}); drop the flag to resume from it, or pass a new --workdir.")
        step, items = restored
        self.state = TrainState(
            step=jax.device_put(np.int32(step), sharding.replicated(self.mesh)),
            apply_fn=self.model.apply, params=items["params"], tx=self.tx,
            opt_state=items["opt_state"])
        for warning in self.loader.restore(items["meta"]["loader"]):
            print(f"Warning: resuming from step {step}, but {warning}.")
        self.resumed_from = step

    def _compile(self, cfg: ml_collections.ConfigDict, schedule: optax.Schedule) -> None:
        """The train and eval steps for this run's batches: token windows [grad_accum_steps,
        micro_batch, seq_len + 1], or with packed instruction data the tuple (tokens, targets,
        segment_ids) of `make_train_step`."""
        self.rows = sharding.batch_sharding(self.mesh)
        self.batch_sharding = sharding.batch_sharding(self.mesh, batch_dim=1)
        steps, m = cfg.train.grad_accum_steps, self.micro_batch
        mine = distributed.local_rows(self.batch_sharding, (steps, m, 1), batch_dim=1)
        # The rows of the loader's batch that `next_batch` reads, the same every step: row r of
        # micro-batch a is row a * micro_batch + r of the loader's batch.
        self.local_batch_rows = (np.arange(steps)[:, None] * m +
                                 np.arange(mine.start, mine.stop)).ravel()
        seq = cfg.data.seq_len
        shapes = [(seq + 1, jnp.int32)]
        if self.packed:
            shapes += [(seq, jnp.float32), (seq, jnp.int32)]
        batch = tuple(jax.ShapeDtypeStruct((steps, m, n), dtype, sharding=self.batch_sharding)
                      for n, dtype in shapes)
        rows = [jax.ShapeDtypeStruct((m, n), dtype, sharding=self.rows) for n, dtype in shapes]
        if self.packed:
            evaluate = functools.partial(weighted_loss, self.model)
        else:  # windows and the weight of each row
            batch, evaluate = batch[0], make_eval_step(self.model)
            rows.append(jax.ShapeDtypeStruct((m,), jnp.float32, sharding=self.rows))
        self.train_step = jax.jit(
            make_train_step(self.model, schedule),
            in_shardings=(self.state_sharding, jax.tree.map(lambda b: b.sharding, batch)),
            out_shardings=(self.state_sharding, sharding.replicated(self.mesh)),
            donate_argnums=0).lower(self.abstract_state, batch).compile()
        self.eval_step = jax.jit(evaluate, out_shardings=sharding.replicated(self.mesh)).lower(
            self.abstract_state.params, *rows).compile()

    def next_batch(self) -> jax.Array:
        """[grad_accum_steps, micro_batch, seq_len + 1] int32, sharded over the batch axes (with
        packed documents a tuple: the tokens, targets and segment ids of `make_train_step`).

        The global batch is a pure function of seed and step; every process reads and hands over
        only the rows its own devices hold."""
        steps, m = self.loader.batch_size // self.micro_batch, self.micro_batch
        local = self.loader.next_rows(self.local_batch_rows)
        arrays = tuple(jax.make_array_from_process_local_data(
            self.batch_sharding, x.reshape(steps, -1, *x.shape[1:]), (steps, m, *x.shape[1:]))
            for x in (local if self.packed else (local,)))
        return arrays if self.packed else arrays[0]

    def evaluate(self, params: Any, eval_batches: int) -> float:
        """Mean validation loss (nats/token) over eval_batches micro-batches of windows spread
        evenly over the validation split (with packed documents: the first windows, per target)."""
        if self.packed:
            return self._evaluate_packed(params, eval_batches)
        windows = self.val.spread(eval_batches * self.micro_batch)
        total = 0.0
        for start in range(0, len(windows), self.micro_batch):
            ids = windows[start:start + self.micro_batch]
            weights = np.zeros(self.micro_batch, np.float32)
            weights[:len(ids)] = 1.0
            ids = np.pad(ids, (0, self.micro_batch - len(ids)), mode="edge")
            total += float(self.eval_step(params, _global_array(self.val.read(ids), self.rows),
                                          _global_array(weights, self.rows)))
        return total / len(windows)


    def _evaluate_packed(self, params: Any, eval_batches: int) -> float:
        windows = self.val.in_order()[:eval_batches * self.micro_batch]
        total = targets = 0.0
        for start in range(0, len(windows), self.micro_batch):
            rows = windows[start:start + self.micro_batch]
            rows += [rows[-1]] * (self.micro_batch - len(rows))
            tokens, weights, segment_ids = self.val.arrays(rows)
            weights[len(windows) - start:] = 0.0  # the repeated rows that fill the last batch
            total += float(self.eval_step(params, *(_global_array(x, self.rows)
                                                    for x in (tokens, weights, segment_ids))))
            targets += float(weights.sum())
        return total / max(targets, 1.0)


def train(cfg: ml_collections.ConfigDict, workdir: str, from_scratch: bool = False,
          early_signals: Sequence[int] = ()) -> Result:
    """Trains (or resumes training) per `cfg` in `workdir`; see the module docstring.

    from_scratch: see `_Setup`. early_signals: SIGTERM / SIGINT numbers a caller recorded before
    this call (train.py records them while it imports); they stop the run like later ones.
    Raises StorageError (a ValueError) with one sentence for work-directory and checkpoint faults.
    """
    cfg = cfg.copy_and_resolve_references()
    config_lib.check(cfg)  # a bad config is refused before the work directory is made or locked
    main = distributed.is_main_process()
    with StopSignals(early_signals) as stop:
        lock = WorkdirLock(workdir) if main else None
        try:
            return _train(cfg, workdir, from_scratch, stop)
        finally:
            if lock is not None:
                lock.release()


def _set_metrics_aside(workdir: str) -> None:
    """--from_scratch keeps the old metrics under another name rather than appending to them."""
    old = os.path.join(workdir, METRICS)
    stamp = time.strftime('%Y%m%d-%H%M%S')
    kept = os.path.join(workdir, f"metrics-before-{stamp}.jsonl")
    for n in range(2, 1000):  # never over an earlier one
        if not os.path.exists(kept):
            break
        kept = os.path.join(workdir, f"metrics-before-{stamp}-{n}.jsonl")
    os.replace(old, kept)
    print(f"Starting from step 0: the earlier metrics are kept as {kept}.", file=sys.stderr)


def _train(cfg: ml_collections.ConfigDict, workdir: str, from_scratch: bool,
           stop: StopSignals) -> Result:
    s = _Setup(cfg, workdir, from_scratch)  # the work directory exists: `train` locked it
    t = cfg.train
    start = int(s.state.step)
    meta = s.store.meta
    main = distributed.is_main_process()
    say = print if main else (lambda *a, **k: None)
    say(("Tokenized" if s.store.built else "Reusing tokens of") +
          f" {meta['files']} files ({meta['splits']['train']['tokens']:,} training and "
          f"{meta['splits']['val']['tokens']:,} validation tokens) in {s.store.directory}.")
    if s.resumed_from is not None:
        say(f"Resuming from the checkpoint at step {start} in {workdir}.")
    tokens_per_step = t.batch_size * cfg.data.seq_len
    flops = flops_per_token(s.model_cfg, cfg.data.seq_len)
    peak = peak_flops(s.mesh.devices.flatten().tolist(), t.peak_tflops)
    log = MetricsLog(workdir, start, enabled=main)
    last_checkpoint = s.resumed_from
    val_bytes = s.store.tokens_per_byte("val")
    result = Result(step=start, unigram_nats_per_byte=meta["unigram_entropy"] *
                    s.store.tokens_per_byte("train"))

    def evaluate(step: int, record: bool = True) -> None:
        result.val_loss = s.evaluate(s.state.params, t.eval_batches)
        result.val_nats_per_byte = result.val_loss * val_bytes
        if record:
            log.write(step, dict(val_loss=result.val_loss, val_perplexity=math.exp(result.val_loss),
                                 val_nats_per_byte=result.val_nats_per_byte))

    def save(step: int) -> None:
        nonlocal last_checkpoint
        s.checkpoints.save(step, s.state.params, s.state.opt_state, s.loader.state(), cfg)
        last_checkpoint = step

    bar = tqdm(total=t.steps, initial=start, unit="step", dynamic_ncols=True, disable=not main)
    pending: List[Tuple[int, Dict[str, jax.Array]]] = []
    speeds: List[float] = []
    clock, clock_step = time.perf_counter(), start

    def flush(step: int) -> None:
        """Waits for the pending steps' metrics (the device catches up here) and logs them."""
        nonlocal pending, clock, clock_step
        records = [(i, {k: float(v) for k, v in m.items()}) for i, m in jax.device_get(pending)]
        pending = []
        _check_finite(records, last_checkpoint)
        now = time.perf_counter()
        values = dict(records[-1][1], tokens_per_s=tokens_per_step * (step - clock_step) /
                      (now - clock))
        speeds.append(values["tokens_per_s"])
        postfix = dict(loss=f"{values['loss']:.3f}", tok_s=f"{values['tokens_per_s']:,.0f}")
        if peak is not None:
            values["mfu"] = values["tokens_per_s"] * flops / peak
            postfix["mfu"] = f"{values['mfu']:.1%}"
        log.write(step, values)
        bar.set_postfix(postfix)
        clock, clock_step = now, step

    step = start
    try:
        # The stop request is read only here, at a step boundary, after every wait of the step
        # before: a signal that came during a device_get, an evaluation or a save is seen now.
        while stop.received is None and step < t.steps:
            step += 1
            s.state, metrics = s.train_step(s.state, s.next_batch())
            pending.append((step, metrics))
            bar.update()
            due_eval = step % t.eval_every == 0 or step == t.steps
            due_save = step % cfg.checkpoint.every == 0 or step == t.steps
            if step % t.log_every == 0 or due_eval or due_save:
                flush(step)
            if due_eval:
                evaluate(step)
                if main:
                    tqdm.write(f"step {step}: validation loss {result.val_loss:.4f} nats/token, "
                               f"perplexity {math.exp(result.val_loss):.3f}")
            if due_save:
                save(step)
        result.step = step
        if stop.received is not None:
            if pending:
                flush(step)
            if step > start:
                save(step)
        elif start >= t.steps:
            evaluate(start, record=False)  # a finished run still reports where it ended
        s.checkpoints.wait()
        if stop.received is not None:
            result.interrupted_by = stop.received
            if step > 0:  # a fresh run stopped before its first step has nothing to save
                result.saved_step = _committed(s.checkpoints, step)
    finally:
        bar.close()
        try:
            s.checkpoints.wait()
        finally:
            s.checkpoints.close()
            log.close()
    result.peak_memory_bytes = peak_memory_bytes(s.mesh.devices.flatten().tolist())
    if speeds:
        result.tokens_per_s = float(np.median(speeds))
        result.mfu = None if peak is None else result.tokens_per_s * flops / peak
    if result.interrupted_by is not None or not main:
        return result
    plot_losses(workdir)
    if t.sample_tokens > 0 and jax.process_count() == 1:  # the sample needs all parameters here
        prompt = s.val.read([0])[0, :SAMPLE_PROMPT_TOKENS].tolist()
        out = generate.generate(jax.device_get(s.state.params), s.model_cfg, [prompt],
                                max_new_tokens=t.sample_tokens,
                                sampler=make_sampler(temperature=SAMPLE_TEMPERATURE),
                                eos_id=s.tokenizer.eos_id, pad_id=s.tokenizer.pad_id,
                                seed=cfg.train.seed)
        continuation = out.tokens[0, :int(out.lengths[0])].tolist()
        if continuation and continuation[-1] == s.tokenizer.eos_id:
            continuation = continuation[:-1]
        result.sample = s.tokenizer.decode(prompt) + "\u2502" + s.tokenizer.decode(continuation)
    return result


def _committed(checkpoints: TrainCheckpoints, step: int) -> int:
    """`step`, once the directory listing shows its checkpoint committed; never claims a save that
    is not on disk."""
    if step not in checkpoints.committed_steps():
        raise StorageError(f"The checkpoint of step {step} is not in {checkpoints.workdir} after "
                           "saving it; the previous checkpoints are kept, so rerun the same command.")
    return step
