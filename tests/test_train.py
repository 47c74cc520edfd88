"""Training: exact resume after SIGTERM, gradient accumulation, NaN stop, clear errors, the CLI."""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training.train_state import TrainState
from conftest import REPO, subprocess_env

from tnllm import checkpoint, config, data, metrics, train_lib
from tnllm.model import TransNormerLLM

STEPS = 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i in range(12):
        lines = [f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(30)]
        (root / f"m{i:02d}.txt").write_text("".join(lines))
    return root


def _cfg(corpus, **train):
    cfg = config.load(os.path.join(REPO, "configs", "tiny.py"))
    cfg.model.update(d_model=32, num_layers=1, glu_dim=64, attention_impl="reference")
    cfg.data.update(path=str(corpus), cache_dir=str(corpus) + "-cache", val_fraction=0.25, seq_len=16)
    cfg.optim.update(lr=1e-2, warmup_steps=2)
    cfg.train.update(steps=STEPS, batch_size=4, log_every=1, eval_every=4, eval_batches=2,
                     sample_tokens=0)
    cfg.checkpoint.update(every=4)
    cfg.train.update(**train)
    return cfg


def _losses(workdir):
    return {r["step"]: r["loss"] for r in metrics.read_metrics(str(workdir)) if "loss" in r}


@pytest.fixture(scope="module")
def reference_run(corpus, tmp_path_factory):
    """An uninterrupted run of STEPS steps; its work directory and per-step losses."""
    workdir = tmp_path_factory.mktemp("reference")
    result = train_lib.train(_cfg(corpus), str(workdir))
    assert result.interrupted_by is None and result.step == STEPS
    return workdir, _losses(workdir)


def test_run_killed_with_sigterm_resumes_with_identical_losses(corpus, reference_run, tmp_path,
                                                               monkeypatch):
    _, want = reference_run
    real_next = data.Loader.next_rows

    def next_then_sigterm(loader, rows):
        if loader.next_batch == 2:  # while the third batch is fetched
            signal.raise_signal(signal.SIGTERM)
        return real_next(loader, rows)

    monkeypatch.setattr(data.Loader, "next_rows", next_then_sigterm)
    stopped = train_lib.train(_cfg(corpus), str(tmp_path))
    assert (stopped.interrupted_by, stopped.step) == (signal.SIGTERM, 3)
    assert checkpoint.TrainCheckpoints(str(tmp_path)).steps() == [3]
    monkeypatch.setattr(data.Loader, "next_rows", real_next)
    resumed = train_lib.train(_cfg(corpus), str(tmp_path))
    assert resumed.step == STEPS and resumed.interrupted_by is None
    assert _losses(tmp_path) == want  # every step, bit for bit


def test_checkpoint_written_mid_run_resumes_with_identical_losses(corpus, reference_run, tmp_path):
    """The asynchronous save at step 4 holds step 4's state although training went on (and
    donated that state's buffers) while it was written: a crash after it loses nothing."""
    workdir, want = reference_run
    shutil.copytree(workdir, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / str(STEPS))  # as if killed before step 8's save
    train_lib.train(_cfg(corpus), str(tmp_path / "run"))
    assert _losses(tmp_path / "run") == want
    logged = [r["step"] for r in metrics.read_metrics(str(tmp_path / "run")) if "loss" in r]
    assert logged == list(range(1, STEPS + 1))  # the redone steps replaced, not repeated


def test_gradient_accumulation_equals_one_full_batch_step():
    model = TransNormerLLM(config.ModelConfig(vocab_size=259, d_model=32, num_layers=1, glu_dim=64,
                                              attention_impl="reference"))
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    schedule = optax.constant_schedule(0.1)
    batch = jax.random.randint(jax.random.key(1), (8, 13), 0, 259)
    step = jax.jit(train_lib.make_train_step(model, schedule))
    results = []
    for k in (1, 4):  # SGD: the update is the gradient itself, so it shows any difference
        state = TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(schedule))
        results.append(step(state, batch.reshape(k, 8 // k, 13)))
    (full, m1), (accumulated, m4) = results
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
    for a, b, p in zip(jax.tree.leaves(full.params), jax.tree.leaves(accumulated.params),
                       jax.tree.leaves(params)):
        np.testing.assert_allclose(a - p, b - p, rtol=1e-4, atol=1e-8)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(corpus, reference_run, tmp_path,
                                                          monkeypatch):
    workdir = tmp_path / "run"
    shutil.copytree(reference_run[0], workdir)
    real = train_lib.weighted_loss
    monkeypatch.setattr(train_lib, "weighted_loss", lambda *a: real(*a) * jnp.nan)
    with pytest.raises(FloatingPointError, match=r"became nan .* at step 9;.*checkpoint \(step 8\)"):
        train_lib.train(_cfg(corpus, steps=12), str(workdir))
    assert checkpoint.TrainCheckpoints(str(workdir)).steps() == [4, 8]


def test_clear_errors(corpus, reference_run, tmp_path):
    cfg = _cfg(corpus)
    cfg.model.vocab_size = 128
    with pytest.raises(ValueError, match="259 ids but config.model.vocab_size is 128"):
        train_lib.train(cfg, str(tmp_path / "a"))
    cfg = _cfg(corpus)
    cfg.model.d_model = 48
    with pytest.raises(ValueError, match=r"Work directory .* holds params/.* of shape .*--workdir"):
        train_lib.train(cfg, str(reference_run[0]))
    cfg = _cfg(corpus)
    cfg.train.lr = 1.0
    with pytest.raises(ValueError, match="Unknown config.train field"):
        train_lib.train(cfg, str(tmp_path / "b"))
    assert not (tmp_path / "b").exists()  # refused before the work directory is made or locked
    cfg = _cfg(corpus)
    cfg.data.path = str(tmp_path / "no-such-dir")
    with pytest.raises(FileNotFoundError, match="config.data.path"):
        train_lib.train(cfg, str(tmp_path / "c"))


def test_flops_are_the_projections_of_spec_plus_linear_attention():
    d, h, g, v, hd, c = 64, 64, 96, 300, 32, 16
    m = config.ModelConfig(vocab_size=v, d_model=d, num_layers=3, num_heads=2, glu_dim=g,
                           lrpe_layers=(0,), chunk_size=c)
    projections = 3 * 2 * (4 * d * h + h * d + 3 * d * g) + 2 * d * v  # docs/spec.md §1, tied head
    attention = sum(2 * (2 * c * (dk + hd) + 4 * dk * hd) for dk in (2 * hd, hd, hd))
    assert metrics.flops_per_token(m, 4096) == 3 * (projections + attention)
    assert metrics.flops_per_token(m, 4096) == metrics.flops_per_token(m, 512)  # linear in length


def test_cli_trains_logs_plots_and_samples(corpus, tmp_path):
    workdir = tmp_path / "run"
    flags = [f"--workdir={workdir}", f"--config.data.path={corpus}",
             f"--config.data.cache_dir={corpus}-cache", "--config.data.val_fraction=0.25",
             "--config.data.seq_len=16", "--config.model.d_model=32", "--config.model.glu_dim=64",
             "--config.model.num_layers=1", "--config.model.attention_impl=reference",
             "--config.train.batch_size=4", "--config.train.steps=6", "--config.optim.warmup_steps=2",
             "--config.train.log_every=2", "--config.train.eval_every=3", "--config.checkpoint.every=3",
             "--config.train.sample_tokens=8"]
    run = lambda *extra: subprocess.run(  # noqa: E731
        [sys.executable, "train.py", *flags, *extra], cwd=REPO, capture_output=True, text=True,
        env=subprocess_env())
    out = run()
    assert out.returncode == 0, out.stderr[-2000:]
    summary = re.search(r"Validation loss after 6 steps: ([\d.]+) nats/byte.*Unigram entropy of the "
                        r"corpus: ([\d.]+) nats/byte; the validation loss is ([\d.]+)% (below|above) it",
                        out.stdout, re.S)
    assert summary, out.stdout[-2000:]
    val, unigram, percent = map(float, summary.groups()[:3])
    assert summary.group(4) == ("below" if val <= unigram else "above")
    assert abs(percent - 100 * abs(1 - val / unigram)) < 0.2
    assert "Sample" in out.stdout
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(records[0])
    assert {"val_loss", "val_perplexity", "val_nats_per_byte"} <= set(records[-1])
    assert (workdir / "loss.png").stat().st_size > 0
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))
    assert checkpoint.TrainCheckpoints(str(workdir)).steps() == [3, 6]
    bad = run("--config.train.bogus=1")
    assert bad.returncode != 0 and "--config.train.bogus names no config field" in bad.stderr


@pytest.mark.parametrize("name, extra", [
    ("cosformer", ["--config.model.cosformer_max_len=64", "--config.train.sample_tokens=0"]),
    # The softmax baseline also samples at the end: generation through its KV cache of 64 tokens.
    ("softmax_tiny", ["--config.model.max_cache_len=64", "--config.train.sample_tokens=16"]),
])
def test_cli_trains_the_language_model_with_other_token_mixers(corpus, tmp_path, name, extra):
    """configs/cosformer.py and configs/softmax_tiny.py: the LM with cosFormer or softmax token
    mixers trains through train.py."""
    workdir = tmp_path / name
    flags = [f"--config=configs/{name}.py", f"--workdir={workdir}", f"--config.data.path={corpus}",
             f"--config.data.cache_dir={corpus}-cache", "--config.data.val_fraction=0.25",
             "--config.data.seq_len=32", "--config.model.d_model=32", "--config.model.glu_dim=64",
             "--config.model.num_layers=1", *extra,
             "--config.train.batch_size=8", "--config.train.steps=12", "--config.optim.warmup_steps=2",
             "--config.optim.lr=1e-2", "--config.train.log_every=1", "--config.train.eval_every=12",
             "--config.checkpoint.every=12"]
    run = lambda *args: subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True,  # noqa: E731
                                       text=True, env=subprocess_env())
    out = run("train.py", *flags)
    assert out.returncode == 0, out.stderr[-2000:]
    losses = [r["loss"] for r in map(json.loads, open(workdir / "metrics.jsonl")) if "loss" in r]
    assert len(losses) == 12 and all(map(math.isfinite, losses))
    assert sum(losses[-3:]) < sum(losses[:3])
    if name == "softmax_tiny":
        assert "Sample" in out.stdout
        out = run("-m", "tnllm.generate", f"--checkpoint={workdir}", "--prompt=def f(", "--max_new_tokens=8",
                  "--logprobs")
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.startswith("def f(") and "tokens, mean log-probability" in out.stdout
