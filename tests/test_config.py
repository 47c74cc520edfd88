"""Configs: released sizes (docs/spec.md §5) and clear errors for invalid values."""
import subprocess
import sys

import pytest
from absl import flags
from conftest import REPO, param_count, subprocess_env
from ml_collections import config_flags

from tnllm import config

RELEASED = {
    "385m": 398_984_192,
    "1b": 1_020_266_496,
    "3b": 2_911_111_680,
    "7b": 6_836_719_616,
}


@pytest.mark.parametrize("name,count", RELEASED.items())
def test_released_parameter_counts(name, count):
    assert param_count(config.model_config(config.load(f"configs/{name}.py"))) == count


def test_released_values():
    cfg = config.model_config(config.load("configs/3b.py"))
    assert (cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.glu_dim, cfg.vocab_size) == (
        2560, 32, 20, 6912, 64000)
    assert cfg.head_dim == 128 and cfg.lrpe_layers == (0,) and not cfg.scale_embedding


@pytest.mark.parametrize("value", [0, -2, True, 1.5, "3", None])
def test_check_positive_refuses_all_but_integers_from_1_in_one_sentence(value):
    with pytest.raises(ValueError) as error:
        config.check_positive("--batch_size", value)
    assert str(error.value) == (f"--batch_size must be a positive integer, got {value!r}; set it "
                                "to 1 or more.")


def test_check_positive_returns_a_python_int():
    import numpy as np

    got = config.check_positive("max_new_tokens", np.int64(3))
    assert got == 3 and type(got) is int


@pytest.mark.parametrize("changes,message", [
    (dict(d_model=100, num_heads=3), r"hidden_dim \(100\) must be divisible by config.model.num_heads"),
    (dict(lrpe_layers=[5]), r"lrpe_layers holds 5, out of range for num_layers=2"),
    (dict(lrpe_layers=("",)), r"lrpe_layers must hold layer indices.*--config.model.lrpe_layers=0,2"),
    (dict(num_layers=0), r"config.model.num_layers must be a positive integer"),
    (dict(vocab_size=-3), r"config.model.vocab_size must be a positive integer"),
    (dict(attention_impl="flash"), r"config.model.attention_impl: Unknown attention impl 'flash': "
                                   r"choose one of auto, reference, blockwise, recurrent, pallas\."),
    (dict(attention_impl="cudnn"), r"Unknown attention impl 'cudnn'"),  # softmax's, not GLA's
    (dict(token_mixer="softmax", lrpe_layers=[], attention_impl="linear"),
     r"Unknown attention impl 'linear': choose one of auto, reference, blockwise, recurrent, "
     r"pallas, xla, cudnn\."),
    (dict(dtype="float8"), r"config.model.dtype is 'float8'"),
    (dict(remat_policy="sometimes"), r"config.model.remat_policy is 'sometimes'"),
    (dict(widht=3), r"Unknown config.model field\(s\) widht"),
])
def test_invalid_values_name_the_field(changes, message):
    fields = config.load("configs/tiny.py").model.to_dict()
    fields.update(changes)
    with pytest.raises(ValueError, match=message):
        config.ModelConfig.from_dict(fields)



def test_attention_impl_names_the_form_of_the_configured_mixer():
    """One field for every mixer; a GLA form (generation asks every mixer for "recurrent") leaves
    cosFormer and softmax attention on their auto choice."""
    cfg = config.ModelConfig(lrpe_layers=())
    assert cfg.mixer_impl == "auto" and cfg.replace(attention_impl="pallas").mixer_impl == "pallas"
    for mixer, own in (("cosformer", "reference"), ("softmax", "cudnn")):
        mixer_cfg = cfg.replace(token_mixer=mixer)
        assert mixer_cfg.replace(attention_impl=own).mixer_impl == own
        assert mixer_cfg.replace(attention_impl="recurrent").mixer_impl == "auto"

def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        config.load("configs/nope.py")


@pytest.mark.parametrize("args,want", [
    (["--config.model.lrpe_layers=0,1"], (0, 1)),
    (["--config.model.lrpe_layers=(0,1)"], (0, 1)),
    (["--config.model.lrpe_layers=1"], (1,)),
    (["--config.model.lrpe_layers=()"], ()),
    (["--config.model.lrpe_layers=0", "--config.model.lrpe_layers=1"], (0, 1)),
])
def test_lrpe_layers_can_be_set_on_the_command_line(args, want):
    """The spellings train.py's --config flag accepts for the tuple field."""
    argv = ["train.py", "--config=configs/tiny.py", *args]
    flag_values = flags.FlagValues()
    cfg = config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    assert config.model_config(cfg.value).lrpe_layers == want


@pytest.mark.parametrize("data,message", [
    (dict(packing="bogus"), r"^config.data.packing must be one of concat, documents, got 'bogus'\.$"),
    (dict(template="alpaca"), r"^Instruction records are packed as whole documents: set "
                              r"config.data.packing = 'documents' with config.data.template\.$"),
])
def test_packing_is_checked_with_the_config(data, message):
    cfg = config.load("configs/tiny.py")
    cfg.data.update(**data)
    with pytest.raises(ValueError, match=message):
        config.check(cfg)
    cfg.data.update(packing="documents")
    config.check(cfg)  # the fix the sentence names is accepted


def test_train_py_takes_lrpe_layers_and_checks_them():
    out = subprocess.run([sys.executable, "train.py", "--config.model.lrpe_layers=0,5"], cwd=REPO,
                         capture_output=True, text=True, env=subprocess_env())
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1] == (
        "error: config.model.lrpe_layers holds 5, out of range for num_layers=2; use indices 0..1.")
