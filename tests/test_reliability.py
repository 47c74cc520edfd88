"""Faults as they really happen to a training run: signals from another process at random moments,
bytes flipped on disk, a changed optimizer setting on resume, two runs in one directory, a stale lock,
a work directory that is a file or read-only, a full disk. docs/training.md ("Reliability") lists the
promise each test stands behind."""
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, subprocess_env

from tnllm import checkpoint, config, metrics, train_lib

CORPUS_FILES = 12


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i in range(CORPUS_FILES):
        lines = [f"def g{i}_{j}(y):\n    return y - {j} * {i}\n" for j in range(30)]
        (root / f"m{i:02d}.txt").write_text("".join(lines))
    return root


def _cfg(corpus, steps=12, **optim):
    cfg = config.load(os.path.join(REPO, "configs", "tiny.py"))
    cfg.model.update(d_model=32, num_layers=1, glu_dim=64, attention_impl="reference")
    cfg.data.update(path=str(corpus), cache_dir=str(corpus) + "-cache", val_fraction=0.25, seq_len=16)
    cfg.optim.update(lr=1e-2, warmup_steps=2, **optim)
    cfg.train.update(steps=steps, batch_size=4, log_every=1, eval_every=4, eval_batches=2,
                     sample_tokens=0)
    cfg.checkpoint.update(every=4)
    return cfg


def _flags(corpus, workdir, steps, every=4, eval_every=4):
    return [f"--workdir={workdir}", f"--config.data.path={corpus}",
            f"--config.data.cache_dir={corpus}-cache", "--config.data.val_fraction=0.25",
            "--config.data.seq_len=16", "--config.model.d_model=32", "--config.model.glu_dim=64",
            "--config.model.num_layers=1", "--config.model.attention_impl=reference",
            "--config.train.batch_size=4", f"--config.train.steps={steps}",
            "--config.optim.warmup_steps=2", "--config.optim.lr=1e-2", "--config.train.log_every=1",
            f"--config.train.eval_every={eval_every}", f"--config.checkpoint.every={every}",
            "--config.train.sample_tokens=0"]


def _env(tmp_path_factory_or_dir):
    """Child environment with JAX's persistent compilation cache: every child after the first
    loads the compiled steps instead of compiling them again."""
    return subprocess_env(JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory_or_dir),
                          JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                          JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _losses(workdir):
    return {r["step"]: r["loss"] for r in metrics.read_metrics(str(workdir)) if "loss" in r}


def _committed(workdir):
    c = checkpoint.TrainCheckpoints(str(workdir), read_only=True)
    try:
        return c.steps()
    finally:
        c.close()


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """An uninterrupted in-process run of 12 steps (checkpoints at 4, 8, 12) and its losses."""
    workdir = tmp_path_factory.mktemp("reference")
    result = train_lib.train(_cfg(corpus), str(workdir))
    assert result.step == 12 and result.interrupted_by is None
    return workdir, _losses(workdir)


# ----------------------------------------------------------------------------- signals


def _metric_lines(workdir):
    try:
        with open(os.path.join(workdir, metrics.METRICS)) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def test_signals_at_random_moments_always_save_the_reported_step(corpus, tmp_path):
    """At least 20 SIGTERM / SIGINT, sent from this process at random moments of a chain of train.py
    runs (each resumes the one before): while Python imports, while the steps compile, while the
    device is waited on, during evaluation and during saves, sometimes twice. Each trial must exit
    128 + signal and name a step whose checkpoint is committed, and the next trial must resume from
    it; at the end the losses of every step equal those of one uninterrupted run, bit for bit."""
    rng = random.Random(29)
    env, steps = _env(tmp_path / "jax-cache"), 2000  # far more steps than the chain reaches
    workdir = tmp_path / "chain"
    flags = _flags(corpus, workdir, steps, every=7, eval_every=5)
    valid, first_step_after, saved, phases = 0, None, None, []
    for trial in range(40):
        if valid >= 20:
            break
        before, committed_before = _metric_lines(workdir), _committed(workdir)
        begun = time.monotonic()
        proc = subprocess.Popen([sys.executable, "train.py", *flags], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        signum = rng.choice([signal.SIGTERM, signal.SIGINT])
        during_steps = first_step_after is None or rng.random() < 0.5
        if during_steps:  # during the steps, 0-4 after the first
            target = before + 1 + rng.randint(0, 4)
            while _metric_lines(workdir) <= before and proc.poll() is None:
                time.sleep(0.005)
            first_step_after = time.monotonic() - begun
            while _metric_lines(workdir) < target and proc.poll() is None:
                time.sleep(0.005)
        else:  # any moment from the interpreter's start to about the first step
            time.sleep(rng.uniform(0.05, first_step_after))
        proc.send_signal(signum)
        twice = rng.random() < 0.3
        if twice:  # a second signal, often while the first one's save runs
            time.sleep(rng.uniform(0.0, 0.3))
            proc.send_signal(rng.choice([signal.SIGTERM, signal.SIGINT]))
        out, err = proc.communicate(timeout=300)
        if proc.returncode < 0 and not out:
            # Killed while the interpreter itself started, before train.py's first line could
            # take the signal: nothing began, so nothing may have changed.
            assert _committed(workdir) == committed_before
            continue
        assert proc.returncode in (128 + signal.SIGINT, 128 + signal.SIGTERM), (
            trial, proc.returncode, err[-3000:])
        assert "Traceback" not in err, err[-3000:]
        if "nothing was saved" in out:  # a fresh run stopped before its first step
            assert saved is None and _committed(workdir) == []
        else:
            reported = int(out.split("the checkpoint of step ")[1].split()[0])
            assert reported in _committed(workdir), (trial, reported)
            if saved is not None:
                assert f"Resuming from the checkpoint at step {saved} " in out, out
            assert max(_losses(workdir)) == reported  # nothing logged beyond what is saved
            saved = reported
        valid += 1
        phases.append(("steps" if during_steps else "start") + (" twice" if twice else ""))
    print(f"signals: {len(phases)} trials ({', '.join(f'{phases.count(p)} {p}' for p in set(phases))})"
          f"; the chain reached step {saved}")
    assert valid >= 20
    # The chain's last checkpoint and an uninterrupted run of as many steps (stopped past it).
    reference = tmp_path / "reference"
    proc = subprocess.Popen([sys.executable, "train.py", *_flags(corpus, reference, steps, 7, 5)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    while _metric_lines(reference) < _metric_lines(workdir) + 1 and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=300)
    want, got = _losses(reference), _losses(workdir)
    assert sorted(got) == list(range(1, saved + 1))
    assert got == {s: want[s] for s in got}


# ----------------------------------------------------------------------------- resume faults


def test_changed_optimizer_setting_is_refused_and_nothing_moves(corpus, reference, tmp_path):
    """grad_clip=0 drops the clipping state from the optimizer state: the run stops, names the field
    and its saved value, and leaves checkpoints and metrics exactly as they were."""
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    metrics_before = (workdir / metrics.METRICS).read_bytes()
    with pytest.raises(checkpoint.StorageError,
                       match=r"opt_state/.*config\.optim\.grad_clip \(1\.0 in the checkpoint, 0(\.0)? "
                             r"now\).*rerun with the checkpoint's values.*new --workdir"):
        train_lib.train(_cfg(corpus, grad_clip=0.0), str(workdir))
    assert _committed(workdir) == [4, 8, 12]
    assert not (workdir / checkpoint.DAMAGED).exists()
    assert (workdir / metrics.METRICS).read_bytes() == metrics_before


def _flip_bytes(step_dir, item="params"):
    """Overwrites 8 bytes in the middle of the item's largest data file; its size stays."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, item)) for f in fs
             if os.sep + "d" + os.sep in os.path.join(d, f)]
    target = max(files, key=os.path.getsize)
    size = os.path.getsize(target)
    with open(target, "r+b") as f:
        f.seek(size // 2)
        old = f.read(8)
        f.seek(size // 2)
        f.write(bytes(b ^ 0x5A for b in old))
    assert os.path.getsize(target) == size


def test_flipped_bytes_are_caught_and_training_resumes_from_the_previous_step(
        corpus, reference, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    shutil.rmtree(workdir / "checkpoints" / "12")  # as if killed before step 12 was saved
    _flip_bytes(workdir / "checkpoints" / "8")
    result = train_lib.train(_cfg(corpus), str(workdir))
    err = capsys.readouterr().err
    assert "Checkpoint step 8" in err and "damaged" in err, err
    assert result.step == 12
    assert [d.split("-")[0] for d in os.listdir(workdir / checkpoint.DAMAGED)] == ["8"]
    assert _losses(workdir) == reference[1]  # resumed from step 4, identical losses


def test_all_checkpoints_damaged_stops_and_never_silently_starts_over(corpus, reference, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    for step in (4, 8, 12):
        _flip_bytes(workdir / "checkpoints" / str(step))
    with pytest.raises(checkpoint.StorageError, match=r"All 3 checkpoints .* are damaged .*--from_scratch"):
        train_lib.train(_cfg(corpus), str(workdir))
    with pytest.raises(checkpoint.StorageError, match=r"holds no readable checkpoint but damaged "
                                                      r"checkpoints .*--from_scratch"):
        train_lib.train(_cfg(corpus), str(workdir))
    assert len(metrics.read_metrics(str(workdir))) == len(metrics.read_metrics(str(reference[0])))
    result = train_lib.train(_cfg(corpus), str(workdir), from_scratch=True)
    assert result.step == 12 and _losses(workdir) == reference[1]
    kept = [f for f in os.listdir(workdir) if f.startswith("metrics-before-")]
    assert len(kept) == 1  # the earlier metrics are kept, not overwritten
    with pytest.raises(checkpoint.StorageError, match="holds a readable checkpoint"):
        train_lib.train(_cfg(corpus), str(workdir), from_scratch=True)
    assert len([f for f in os.listdir(workdir) if f.startswith("metrics-before-")]) == 1
    assert _losses(workdir) == reference[1]  # a refused --from_scratch moves nothing


# ----------------------------------------------------------------------------- the lock


def test_second_run_in_the_same_workdir_refuses_and_a_stale_lock_is_taken_over(corpus, tmp_path,
                                                                               capsys):
    workdir = tmp_path / "run"
    env = _env(tmp_path / "jax-cache")
    first = subprocess.Popen([sys.executable, "train.py", *_flags(corpus, workdir, 100000)],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while _metric_lines(workdir) < 1:  # the first run holds the lock and trains
            assert first.poll() is None, first.communicate()[1][-3000:]
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "train.py", *_flags(corpus, workdir, 100000)],
                                cwd=REPO, env=env, capture_output=True, text=True)
        assert second.returncode == 1
        assert second.stderr.strip().splitlines() == [
            f"error: Work directory {workdir} is in use by another training run (pid {first.pid} on "
            f"host {os.uname().nodename}); wait for it to end or pass another --workdir."]
    finally:
        first.kill()  # SIGKILL: no handler runs, the lock file keeps its pid
        first.communicate()
    assert (workdir / checkpoint.LOCK).read_text().split()[0] == str(first.pid)
    lock = checkpoint.WorkdirLock(str(workdir))
    assert f"Took over {workdir / checkpoint.LOCK} from pid {first.pid}" in capsys.readouterr().err
    lock.release()


# ----------------------------------------------------------------------------- storage


def test_workdir_that_is_a_file_is_refused(corpus, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(checkpoint.StorageError, match=r"work directory .*afile is an existing file; "
                                                      r"pass a directory as --workdir"):
        train_lib.train(_cfg(corpus), str(tmp_path / "afile"))


def _mount_tmpfs(path, options):
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True)
    if done.returncode:
        pytest.skip(f"needs root to mount a tmpfs: {done.stderr.decode().strip()}")


def test_read_only_work_and_export_directories_are_refused(corpus, reference, tmp_path):
    ro = tmp_path / "ro"
    _mount_tmpfs(ro, "ro,size=1m")  # read-only even for root, unlike chmod
    try:
        with pytest.raises(checkpoint.StorageError,
                           match=r"work directory .*ro/run cannot be written \(Read-only file "
                                 r"system\); pass a writable --workdir"):
            train_lib.train(_cfg(corpus), str(ro / "run"))
        with pytest.raises(checkpoint.StorageError, match=r"export directory .*ro/export cannot be "
                                                          r"written .*writable disk"):
            checkpoint.export_workdir(str(reference[0]), str(ro / "export"))
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_full_disk_during_training_is_one_sentence_and_keeps_the_last_checkpoint(corpus, tmp_path):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "size=700k")  # room for one checkpoint of this model, not two
    try:
        out = subprocess.run([sys.executable, "train.py", *_flags(corpus, disk / "run", 40)],
                             cwd=REPO, env=_env(tmp_path / "jax-cache"), capture_output=True,
                             text=True)
        assert out.returncode == 1
        assert "Traceback" not in out.stderr, out.stderr[-3000:]
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and "No space left on device" in last, out.stderr[-3000:]
        steps = _committed(disk / "run")
        assert steps, last
        assert f"step {steps[-1]}) is kept" in last or "checkpoints already saved are kept" in last
        cfg, _ = checkpoint.load_model(str(disk / "run"))  # the last good checkpoint reads back
        assert cfg.train.steps == 40
    finally:
        subprocess.run(["umount", str(disk)], check=True)
