"""Fine-tuning: starting from an export (train.init_from), instruction data with loss masks."""
import os

import jax
import numpy as np
import pytest
from conftest import REPO

from tnllm import checkpoint, config, train_lib


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i in range(8):
        (root / f"m{i}.txt").write_text("".join(f"x{i} = {j} * y\n" for j in range(20)))
    return root


def _cfg(corpus, **train):
    cfg = config.load(os.path.join(REPO, "configs", "tiny.py"))
    cfg.model.update(d_model=32, num_layers=1, glu_dim=64, attention_impl="reference")
    cfg.data.update(path=str(corpus), cache_dir=str(corpus) + "-cache", val_fraction=0.25, seq_len=16)
    cfg.optim.update(lr=1e-2, warmup_steps=1)
    cfg.train.update(steps=3, batch_size=4, log_every=1, eval_every=3, eval_batches=1, sample_tokens=0)
    cfg.checkpoint.update(every=3, async_save=False)
    cfg.train.update(**train)
    return cfg


def _flat(tree):
    return np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(tree)])


def test_init_from_loads_parameters_only_and_resume_uses_the_run_s_own_checkpoint(corpus, tmp_path):
    train_lib.train(_cfg(corpus), str(tmp_path / "pretrain"))
    export = checkpoint.export_workdir(str(tmp_path / "pretrain"), str(tmp_path / "export"))
    _, exported = checkpoint.load_model(export)
    cfg = _cfg(corpus, init_from=export, seed=1)
    setup = train_lib._Setup(cfg, str(tmp_path / "finetune"))
    try:
        assert setup.resumed_from is None and int(setup.state.step) == 0  # a fresh schedule
        np.testing.assert_array_equal(_flat(setup.state.params), _flat(exported))
        assert not np.any(_flat(setup.state.opt_state))  # fresh AdamW moments (and counts)
    finally:
        setup.checkpoints.close()
    train_lib.train(cfg, str(tmp_path / "finetune"))
    _, tuned = checkpoint.load_model(str(tmp_path / "finetune"))
    assert not np.array_equal(_flat(tuned), _flat(exported))
    resumed = train_lib._Setup(_cfg(corpus, init_from=export, seed=1, steps=5), str(tmp_path / "finetune"))
    try:  # resuming reads the run's own step 3, not the export
        assert resumed.resumed_from == 3
        np.testing.assert_array_equal(_flat(resumed.state.params), _flat(tuned))
    finally:
        resumed.checkpoints.close()


def test_init_from_with_other_shapes_or_no_export_is_one_sentence(corpus, tmp_path):
    train_lib.train(_cfg(corpus, steps=2, eval_every=2), str(tmp_path / "pretrain"))
    export = checkpoint.export_workdir(str(tmp_path / "pretrain"), str(tmp_path / "export"))
    wider = _cfg(corpus, init_from=export)
    wider.model.update(d_model=64)
    with pytest.raises(ValueError, match=r"config.train.init_from.*of shape .* set config.model"):
        train_lib._Setup(wider, str(tmp_path / "a"))
    with pytest.raises(FileNotFoundError, match=r"config.train.init_from = .* is not an export"):
        train_lib._Setup(_cfg(corpus, init_from=str(tmp_path)), str(tmp_path / "b"))
