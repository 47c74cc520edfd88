"""Orbax checkpoints and exports: reload, shape checks, damaged and failed saves."""
import errno
import json
import logging
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO, subprocess_env

from tnllm import checkpoint, config
from tnllm.model import TransNormerLLM


def _cfg():
    cfg = config.load(os.path.join(REPO, "configs", "tiny.py"))
    cfg.model.update(d_model=32, glu_dim=64)
    return cfg


def _params(cfg, seed=0):
    model = TransNormerLLM(config.model_config(cfg))
    return nn.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"])


def _flat(params):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}


def _assert_same(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def _save_steps(workdir, cfg, steps, keep=3):
    """A work directory whose step s holds the params of seed s."""
    ckpts = checkpoint.TrainCheckpoints(str(workdir), keep=keep)
    for s in steps:
        params = _params(cfg, seed=s)
        ckpts.save(s, params, optax.adam(1e-3).init(params), dict(next_batch=s), cfg)
    ckpts.wait()
    return ckpts


def test_export_reloads_identically_in_a_fresh_process(tmp_path):
    cfg, out = _cfg(), tmp_path / "export"
    params = _params(cfg)
    checkpoint.save_export(str(out), cfg, params)
    script = ("import sys, numpy as np\n"
              "sys.path.insert(0, 'tests')  # test modules import conftest, as under pytest\n"
              "from tnllm import checkpoint\n"
              "from tests.test_checkpoint import _flat\n"
              "cfg, params = checkpoint.load_model(sys.argv[1])\n"
              "np.savez(sys.argv[2], **_flat(params))\n")
    subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "p.npz")], check=True,
                   cwd=REPO, env=subprocess_env())
    loaded = np.load(tmp_path / "p.npz")
    want = _flat(params)
    assert sorted(loaded.files) == sorted(want)
    for k, v in want.items():
        np.testing.assert_array_equal(loaded[k], v, err_msg=k)


def test_export_in_bfloat16_copies_the_tokenizer(tmp_path):
    cfg = _cfg()
    tokenizer = tmp_path / "tokenizer.model"
    tokenizer.write_bytes(b"sentencepiece model bytes")
    cfg.data.tokenizer = str(tokenizer)
    params = _params(cfg)
    out = checkpoint.save_export(str(tmp_path / "export"), cfg, params, dtype="bfloat16")
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["data"]["tokenizer"] == "tokenizer.model"  # relative to the export
    shutil.move(out, tmp_path / "moved")  # an export can be moved as a whole
    loaded_cfg, loaded = checkpoint.load_model(str(tmp_path / "moved"))
    assert loaded_cfg.data.tokenizer == str(tmp_path / "moved" / "tokenizer.model")
    assert open(loaded_cfg.data.tokenizer, "rb").read() == b"sentencepiece model bytes"
    assert config.model_config(loaded_cfg) == config.model_config(cfg)
    _assert_same(loaded, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
    with pytest.raises(FileExistsError, match="already exists"):
        checkpoint.save_export(str(tmp_path / "moved"), cfg, params)


def test_export_whose_arrays_do_not_match_its_config_is_refused(tmp_path):
    cfg, out = _cfg(), tmp_path / "export"
    checkpoint.save_export(str(out), cfg, _params(cfg))
    blob = json.loads((out / "config.json").read_text())
    blob["model"]["glu_dim"] = 96
    (out / "config.json").write_text(json.dumps(blob))
    with pytest.raises(ValueError, match=r"params/layers_0/channel_mixer/l1/kernel of shape \(32, 64\)"
                                         r" but the config expects \(32, 96\)"):
        checkpoint.load_model(str(out))
    with pytest.raises(ValueError, match="parameters to export"):
        checkpoint.save_export(str(tmp_path / "other"), _cfg(), _params(_cfg()) | {"extra": jnp.ones(2)})


def test_workdir_loads_and_exports_through_the_cli(tmp_path):
    cfg = _cfg()
    _save_steps(tmp_path / "work", cfg, [1, 2]).close()
    loaded_cfg, params = checkpoint.load_model(str(tmp_path / "work"))
    _assert_same(params, _params(cfg, seed=2))
    assert loaded_cfg.train.steps == cfg.train.steps
    subprocess.run([sys.executable, "-m", "tnllm.checkpoint", "export", "--workdir", str(tmp_path / "work"),
                    "--out", str(tmp_path / "export"), "--dtype", "bfloat16"],
                   check=True, cwd=REPO, env=subprocess_env(), capture_output=True)
    _, exported = checkpoint.load_model(str(tmp_path / "export"))
    _assert_same(exported, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))


def test_damaged_latest_checkpoint_is_skipped_for_the_previous_one(tmp_path):
    cfg, work = _cfg(), tmp_path / "work"
    _save_steps(work, cfg, [1, 2]).close()
    shutil.rmtree(work / "checkpoints" / "2" / "params")  # a truncated step directory
    _, params = checkpoint.load_model(str(work))  # a reader skips it and leaves it in place
    _assert_same(params, _params(cfg, seed=1))
    assert (work / "checkpoints" / "2").exists()
    ckpts = checkpoint.TrainCheckpoints(str(work))
    expected = checkpoint.abstract_params(config.model_config(cfg))
    step, items = ckpts.restore_latest(dict(params=expected))
    assert step == 1 and ckpts.steps() == [1]
    _assert_same(items["params"], _params(cfg, seed=1))
    assert [d.split("-")[0] for d in os.listdir(work / "damaged_checkpoints")] == ["2"]
    ckpts.close()


def test_failed_or_interrupted_saves_never_remove_a_good_checkpoint(tmp_path):
    cfg, work = _cfg(), tmp_path / "work"
    ckpts = _save_steps(work, cfg, [1], keep=1)
    params = _params(cfg, seed=5)
    with pytest.raises(TypeError):  # a save that fails part-way (an item cannot be written)
        ckpts.save(2, params, optax.adam(1e-3).init(params), dict(next_batch=object()), cfg)
        ckpts.wait()
    ckpts.close()
    os.makedirs(work / "checkpoints" / "3.orbax-checkpoint-tmp" / "params")  # a killed save
    reopened = checkpoint.TrainCheckpoints(str(work), keep=1)
    assert reopened.steps() == [1]
    expected = checkpoint.abstract_params(config.model_config(cfg))
    step, items = reopened.restore_latest(dict(params=expected))
    assert step == 1
    _assert_same(items["params"], _params(cfg, seed=1))
    reopened.close()


def test_load_model_names_what_it_needs(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an export"):
        checkpoint.load_model(str(tmp_path))


def test_transient_read_errors_are_retried_then_stop_without_moving_anything(tmp_path, monkeypatch):
    cfg, work = _cfg(), tmp_path / "work"
    _save_steps(work, cfg, [1, 2]).close()
    ckpts = checkpoint.TrainCheckpoints(str(work))
    expected = checkpoint.abstract_params(config.model_config(cfg))
    real, calls = ckpts.manager.restore, []

    def flaky(step, args):  # an I/O error on the first two reads, as a busy network disk gives
        calls.append(step)
        if len(calls) <= 2:
            raise OSError(errno.EIO, "Input/output error")
        return real(step, args=args)

    monkeypatch.setattr(ckpts.manager, "restore", lambda step, args: flaky(step, args))
    step, items = ckpts.restore_latest(dict(params=expected))
    assert step == 2 and calls == [2, 2, 2]
    _assert_same(items["params"], _params(cfg, seed=2))
    monkeypatch.setattr(ckpts.manager, "restore", lambda step, args: (_ for _ in ()).throw(
        OSError(errno.EIO, "Input/output error")))
    with pytest.raises(checkpoint.StorageError, match=r"step 2 .* failed 3 times .*nothing was moved"):
        ckpts.restore_latest(dict(params=expected))
    assert ckpts.steps() == [1, 2] and not (work / checkpoint.DAMAGED).exists()
    ckpts.close()


def test_non_finite_parameters_are_refused_as_damaged(tmp_path, capsys):
    """A step whose saved values are NaN (fingerprints agree: it was written so) is set aside."""
    cfg, work = _cfg(), tmp_path / "work"
    ckpts = _save_steps(work, cfg, [1])
    params = jax.tree.map(lambda x: x * jnp.nan, _params(cfg, seed=2))
    ckpts.save(2, params, optax.adam(1e-3).init(params), dict(next_batch=2), cfg)
    ckpts.wait()
    step, _ = ckpts.restore_latest(dict(params=checkpoint.abstract_params(config.model_config(cfg))))
    assert step == 1
    assert "holds NaN or infinite values" in capsys.readouterr().err
    ckpts.close()


def test_reading_a_workdir_logs_no_read_only_warning(tmp_path, caplog):
    cfg, work = _cfg(), tmp_path / "work"
    _save_steps(work, cfg, [1]).close()
    with caplog.at_level(logging.WARNING):
        checkpoint.load_model(str(work))
    assert not [r for r in caplog.records if "read only" in r.getMessage()]


def test_export_cli_parses_absl_flags(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tnllm.checkpoint", "export", "--workdir",
                          str(tmp_path)], cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
    assert out.returncode != 0 and "Flag --out must have a value other than None" in out.stderr
