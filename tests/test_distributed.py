"""Training on device meshes and across processes (issue: model parallelism, points 4-6).

Each case runs `train.py` or this file in subprocesses whose XLA_FLAGS give them fake CPU devices
(the flag must be set before JAX starts, and the rest of the suite keeps one device).
"""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, subprocess_env

from tnllm import checkpoint

# Four heads and a vocabulary of 260 (the byte tokenizer needs 259) divide every mesh used here.
MODEL_FLAGS = ["--config.model.d_model=64", "--config.model.num_heads=4", "--config.model.glu_dim=128",
               "--config.model.vocab_size=260", "--config.model.num_layers=2",
               "--config.model.chunk_size=8"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i in range(8):
        (root / f"m{i}.txt").write_text("".join(f"def g{i}_{j}(y):\n    return y - {j}\n"
                                                for j in range(40)))
    return root


def _env(devices):
    return subprocess_env(JAX_PLATFORMS="cpu",
                          XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _train_flags(corpus, workdir, steps=4, *extra):
    return ["train.py", f"--workdir={workdir}", f"--config.data.path={corpus}",
            f"--config.data.cache_dir={corpus}-cache", "--config.data.seq_len=24",
            "--config.data.val_fraction=0.25", "--config.train.batch_size=8",
            f"--config.train.steps={steps}", "--config.train.log_every=1",
            f"--config.train.eval_every={steps}", "--config.train.eval_batches=1",
            "--config.train.sample_tokens=0", f"--config.checkpoint.every={steps}",
            "--config.checkpoint.async_save=False", "--config.optim.warmup_steps=1", *MODEL_FLAGS,
            *extra]


def _train(corpus, workdir, devices, *extra, steps=4):
    out = subprocess.run([sys.executable, *_train_flags(corpus, workdir, steps, *extra)], cwd=REPO,
                         env=_env(devices), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def _assert_close(a, b, rtol=1e-5):
    assert len(a) == len(b) and len(a) > 0
    np.testing.assert_allclose(a, b, rtol=rtol)


def test_train_cli_on_a_tensor_parallel_mesh_matches_one_device(corpus, tmp_path):
    """`train.py --config.mesh.fsdp=2 --config.mesh.tensor=4` on 8 fake devices."""
    _train(corpus, tmp_path / "one", 1)
    out = _train(corpus, tmp_path / "mesh", 8, "--config.mesh.fsdp=2", "--config.mesh.tensor=4")
    assert "Validation loss after 4 steps" in out.stdout
    _assert_close(_losses(tmp_path / "mesh"), _losses(tmp_path / "one"))


def test_unshardable_mesh_fails_before_compiling(corpus, tmp_path):
    out = subprocess.run([sys.executable, *_train_flags(corpus, tmp_path, 4, "--config.mesh.tensor=8")],
                         cwd=REPO, env=_env(8), capture_output=True, text=True, timeout=600)
    assert out.returncode != 0 and "is not divisible by the mesh axis tensor = 8" in out.stderr
    assert "Traceback" not in out.stderr


def test_checkpoint_restores_on_other_meshes_and_one_device(corpus, tmp_path):
    """Saved on (2, 2, 2), restored on (8, 1, 1) and on a single device, identical values."""
    workdir = tmp_path / "run"
    _train(corpus, workdir, 8, "--config.mesh.data=2", "--config.mesh.fsdp=2",
           "--config.mesh.tensor=2", steps=2)
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "restore", str(workdir)],
                         cwd=REPO, env=_env(8), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    on_mesh = np.load(tmp_path / "run" / "restored_8_1_1.npz")
    _, params = checkpoint.load_model(str(workdir))  # this process: one device
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    assert len(leaves) == len(on_mesh.files)
    for path, value in leaves:
        np.testing.assert_array_equal(np.asarray(value), on_mesh[jax.tree_util.keystr(path)])


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(corpus, tmp_path):
    """Two processes (one CPU device each) joined by jax.distributed give the losses of one
    process holding both devices."""
    _train(corpus, tmp_path / "one", 2, "--config.mesh.data=2")
    address = f"localhost:{_free_port()}"
    procs = [subprocess.Popen(
        [sys.executable, *_train_flags(corpus, tmp_path / "two", 4, "--config.mesh.data=2"),
         f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"],
        cwd=REPO, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, outs):
        assert p.returncode == 0, stderr[-4000:]
    assert "Validation loss after 4 steps" in outs[0][0]
    assert "Validation loss" not in outs[1][0]  # only process 0 reports
    _assert_close(_losses(tmp_path / "two"), _losses(tmp_path / "one"))


def _restore_case(workdir):
    """Runs in an 8-device subprocess: restores `workdir`'s latest step onto a (8, 1, 1) mesh."""
    from tnllm import train_lib

    cfg, _ = checkpoint.load_model(workdir)
    cfg.mesh.update(data=8, fsdp=1, tensor=1)
    setup = train_lib._Setup(cfg, workdir)  # restores the latest checkpoint onto cfg's mesh
    try:
        assert setup.resumed_from == 2
        values = {}
        for (path, value), target in zip(jax.tree_util.tree_flatten_with_path(setup.state.params)[0],
                                         jax.tree.leaves(setup.state_sharding.params)):
            assert value.sharding.is_equivalent_to(target, value.ndim), path
            values[jax.tree_util.keystr(path)] = np.asarray(value)
        np.savez(os.path.join(workdir, "restored_8_1_1.npz"), **values)
    finally:
        setup.checkpoints.close()


if __name__ == "__main__":
    if sys.argv[1] == "restore":
        _restore_case(sys.argv[2])
