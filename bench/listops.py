"""ListOps (Long-Range Arena): the encoder classifier with cosFormer and softmax attention, the same
steps, data order and seed for each; test accuracy next to the cosFormer paper's.

    python -m bench.listops [--steps N] [--batch_size B] [--token_mixers softmax] [--smoke]

Writes listops.json and listops_loss.png to --out (default $OUT, else ./bench_out).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import functools
import json
import multiprocessing
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Room for XLA's softmax attention should cuDNN's be unavailable (4 GiB of logits per layer).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

from absl import app, flags  # noqa: E402

try:
    from ml_collections import config_flags  # noqa: E402
except ImportError:  # the GPU image lacks it
    sys.exit("bench.listops needs ml_collections: pip install ml-collections==1.1.0 (or its wheel).")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench import report  # noqa: E402
from tnllm import listops  # noqa: E402

# cosFormer paper (arXiv 2202.08791), Long-Range Arena ListOps test accuracy, %.
PAPER = {"cosformer": ("cosFormer", 37.9), "softmax": ("vanilla Transformer", 36.37)}

_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(ROOT, "configs/listops.py"),
                                          "ListOps config file (model, data, train).")
_STEPS = flags.DEFINE_integer("steps", None, "Training steps per token mixer (config.train.steps).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Sequences per step (config.train.batch_size).")
_MIXERS = flags.DEFINE_list("token_mixers", None, "Token mixers to train, in order, e.g. softmax or "
                            "cosformer,softmax (config.token_mixers).")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny model, tiny data, a few steps: checks the script.")
_OUT = flags.DEFINE_string("out", None, "Output folder; default $OUT, else ./bench_out.")


def smoke(cfg) -> None:
    cfg.model.update(num_layers=1, d_model=32, num_heads=2, mlp_dim=64, max_len=64)
    cfg.data.update(min_length=10, max_length=64, num_test=4, workers=1)
    cfg.train.update(steps=2, batch_size=4, warmup_steps=1)


def grammar(cfg) -> listops.Grammar:
    return listops.Grammar(**{f.name: cfg.data[f.name] for f in dataclasses.fields(listops.Grammar)})


def classifier_config(cfg, token_mixer: str) -> listops.ClassifierConfig:
    fields = {f.name for f in dataclasses.fields(listops.ClassifierConfig)}
    unknown = sorted(set(cfg.model) - fields)
    if unknown:
        raise ValueError(f"Unknown config.model field(s) {', '.join(unknown)}; known fields are "
                         f"{', '.join(sorted(fields))}.")
    return listops.ClassifierConfig(**{**cfg.model.to_dict(), "token_mixer": token_mixer})


def train_and_evaluate(cfg, token_mixer: str, train, test) -> dict:
    """Trains one classifier for cfg.train.steps steps and returns its metrics and loss curve."""
    net = listops.ListOpsClassifier(classifier_config(cfg, token_mixer))
    tc = cfg.train
    schedule = optax.warmup_cosine_decay_schedule(0.0, tc.learning_rate, tc.warmup_steps, tc.steps)
    tx = optax.chain(optax.clip_by_global_norm(tc.grad_clip),
                     optax.adamw(schedule, b2=0.98, weight_decay=tc.weight_decay))
    tokens, labels = train
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
        accuracy = jnp.mean(jnp.argmax(logits, -1) == y)
        return optax.apply_updates(params, updates), opt_state, loss, accuracy

    predict = jax.jit(lambda p, x: jnp.argmax(net.apply(p, x), -1))

    # The same data order for every token mixer: epochs of seeded permutations.
    rng = np.random.default_rng(tc.seed)
    epochs = -(-tc.steps * batch // len(tokens))
    order = np.concatenate([rng.permutation(len(tokens)) for _ in range(epochs)])

    t0 = time.perf_counter()
    step_fn = train_step.lower(params, opt_state, tokens[:batch], labels[:batch]).compile()
    compile_s = time.perf_counter() - t0
    losses = []
    bar = tqdm(range(tc.steps), desc=token_mixer, unit="step")
    t0 = time.perf_counter()
    for step in bar:
        idx = order[step * batch:(step + 1) * batch]
        params, opt_state, loss, accuracy = step_fn(params, opt_state, tokens[idx], labels[idx])
        if step % 10 == 0 or step == tc.steps - 1:
            losses.append((step, float(loss)))  # also syncs, so the rate below is honest
            rate = (step + 1) * batch * tokens.shape[1] / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{losses[-1][1]:.3f}", acc=f"{float(accuracy):.2f}",
                            tokens_per_s=f"{rate:,.0f}")
    train_s = time.perf_counter() - t0

    test_tokens, test_labels = test
    n = len(test_tokens)
    pad = -n % batch  # repeat real rows so every batch has the compiled shape; they are not counted
    rows = np.concatenate([np.arange(n), np.arange(pad) % n])
    preds = np.concatenate([np.asarray(predict(params, test_tokens[rows[i:i + batch]]))
                            for i in range(0, len(rows), batch)])[:n]
    tail = [loss for _, loss in losses[-max(1, len(losses) // 10):]]
    return {
        "token_mixer": token_mixer, "softmax_impl": cfg.model.softmax_impl,
        "test_accuracy": float(np.mean(preds == test_labels)) * 100.0,
        "final_train_loss": float(np.mean(tail)),
        "steps": tc.steps, "batch_size": batch, "compile_s": compile_s, "train_s": train_s,
        "padded_tokens_per_s": tc.steps * batch * tokens.shape[1] / train_s,
        "loss_curve": losses,
    }


def run(cfg, token_mixer: str, train, test) -> dict:
    """`train_and_evaluate`; a failure (e.g. out of memory) is returned as {"error": ...} so that the
    other token mixer's result still comes out."""
    try:
        return train_and_evaluate(cfg, token_mixer, train, test)
    except (jax.errors.JaxRuntimeError, NotImplementedError, RuntimeError) as e:
        print(f"{token_mixer} failed: {e}")
        return {"token_mixer": token_mixer, "softmax_impl": cfg.model.softmax_impl, "error": str(e)}


def plot(results, path: str) -> None:
    report.line_plot({f"{r['token_mixer']} (test acc {r['test_accuracy']:.2f}%)": r["loss_curve"]
                      for r in results if "loss_curve" in r}, path, xlabel="step", ylabel="training loss",
                     title="ListOps, same budget per token mixer", logx=False)


def main(argv):
    del argv
    cfg = _CONFIG.value
    if _SMOKE.value:
        smoke(cfg)
    if _STEPS.value is not None:
        cfg.train.steps = _STEPS.value
    if _BATCH.value is not None:
        cfg.train.batch_size = _BATCH.value
    if _MIXERS.value is not None:
        cfg.token_mixers = tuple(_MIXERS.value)
    unknown = [m for m in cfg.token_mixers if m not in listops.TOKEN_MIXERS]
    if unknown or not cfg.token_mixers:
        raise app.UsageError(f"--token_mixers names {', '.join(unknown) or 'none'}; name one or more of "
                             f"{', '.join(listops.TOKEN_MIXERS)}, comma-separated.")
    out = _OUT.value or os.environ.get("OUT") or "bench_out"
    os.makedirs(out, exist_ok=True)
    workers = cfg.data.workers or os.cpu_count()
    gram = grammar(cfg)

    t0 = time.perf_counter()
    num_train = min(cfg.train.steps * cfg.train.batch_size, listops.SPLITS["train"])
    spawn = multiprocessing.get_context("spawn")  # never fork a process that has started JAX
    with (concurrent.futures.ProcessPoolExecutor(workers, mp_context=spawn) if workers > 1
          else contextlib.nullcontext()) as pool:  # one worker: this process
        train = listops.generate("train", num_train, seed=cfg.data.seed, grammar=gram, executor=pool)
        test = listops.generate("test", cfg.data.num_test, seed=cfg.data.seed, grammar=gram,
                                executor=pool)
    data_s = time.perf_counter() - t0
    print(f"data: {num_train} train + {len(test[0])} test examples of up to {train[0].shape[1]} tokens "
          f"in {data_s:.1f} s on {workers} processes; devices: {jax.devices()}")

    if cfg.model.softmax_impl == "cudnn" and jax.default_backend() != "gpu":
        print("cuDNN attention needs a GPU: softmax attention runs on XLA here.")
        cfg.model.softmax_impl = "xla"
    results = []
    for mixer in cfg.token_mixers:
        results.append(run(cfg, mixer, train, test))
        write_report(cfg, results, out, data_s=data_s, num_train=num_train)
    print_table(cfg, results)


def print_table(cfg, results) -> None:
    device = jax.devices()[0].device_kind
    print(f"\nListOps test accuracy, {cfg.train.steps} steps x {cfg.train.batch_size} sequences, {device}")
    for r in results:
        r["paper"] = "{1} ({0})".format(*PAPER[r["token_mixer"]])
    print(report.markdown(results, [
        ("token mixer", "token_mixer", ""), ("test acc. (%)", "test_accuracy", ".2f"),
        ("paper (%)", "paper", ""),
        ("final train loss", "final_train_loss", ".3f"), ("train s", "train_s", ".1f"),
        ("padded tokens/s", "padded_tokens_per_s", ",.0f")]))


def write_report(cfg, results, out: str, *, data_s: float, num_train: int) -> None:
    """listops.json and the loss plot for the token mixers finished so far (rewritten each time)."""
    summary = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv), "device": jax.devices()[0].device_kind, "jax": jax.__version__,
        "smoke": _SMOKE.value, "data_s": data_s, "num_train_examples": num_train,
        "config": cfg.to_dict(), "paper": {k: v[1] for k, v in PAPER.items()}, "results": results,
    }
    with open(os.path.join(out, "listops.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    plot(results, os.path.join(out, "listops_loss.png"))
    print(f"wrote {out}/listops.json and {out}/listops_loss.png ({len(results)} of "
          f"{len(cfg.token_mixers)} token mixers)")


if __name__ == "__main__":
    app.run(main)
