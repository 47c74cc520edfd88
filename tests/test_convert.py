"""Hugging Face checkpoint import/export (docs/spec.md §6): all weight formats against a NumPy reference of
docs/spec.md §1, exact round trips, the released configs, and errors that name what is wrong."""
import json
import math
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
from conftest import REPO, rel_err, subprocess_env

from tnllm import config, convert
from tnllm.model import TransNormerLLM


def hf_config(**changes):
    """A small config.json in the released format: 3 heads (not a power of two), LRPE in layers 0, 2."""
    cfg = {
        "architectures": ["TransnormerForCausalLM"], "model_type": "transnormer",
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "vocab_size": 101,
        "use_cache": True, "init_std": 0.02, "decoder_embed_dim": 48, "decoder_layers": 3,
        "decoder_attention_heads": 3, "no_scale_embedding": False, "add_bos_token": False,
        "norm_type": "simplermsnorm", "linear_use_lrpe_list": [1, 0, 1], "hidden_dim": 48,
        "linear_act_fun": "swish", "glu_dim": 80, "bias": False, "torch_dtype": "bfloat16",
    }
    cfg.update(changes)
    return cfg


def released_state_dict(hf, seed=0):
    """Random weights under the released key names and (out, in) shapes of docs/spec.md §6, float32."""
    rng = np.random.default_rng(seed)
    d, h, g, heads = (hf[k] for k in ("decoder_embed_dim", "hidden_dim", "glu_dim",
                                      "decoder_attention_heads"))

    def linear(out_dim, in_dim):
        return (rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)).astype(np.float32)

    sd = {"model.embed_tokens.weight":
          (rng.standard_normal((hf["vocab_size"], d)) / np.sqrt(d)).astype(np.float32)}
    for i, use_lrpe in enumerate(hf["linear_use_lrpe_list"]):
        p = f"model.layers.{i}."
        sd[p + "token_mixer.qkvu_proj.weight"] = linear(4 * h, d)
        sd[p + "token_mixer.out_proj.weight"] = linear(d, h)
        sd[p + "channel_mixer.l1.weight"] = linear(g, d)
        sd[p + "channel_mixer.l2.weight"] = linear(g, d)
        sd[p + "channel_mixer.l3.weight"] = linear(d, g)
        if use_lrpe:
            # The released initial θ, perturbed so that every entry is distinguishable.
            theta = 10000.0 ** (-2.0 * np.arange(h) / h) * rng.uniform(0.5, 1.5, h)
            sd[p + "token_mixer.lrpe.theta"] = theta.reshape(heads, 1, h // heads).astype(np.float32)
    return sd


def numpy_reference(sd, hf, tokens):
    """docs/spec.md §1 in float32 NumPy, computed from the released state dict: tokens [seq] -> [seq, V]."""
    f32 = np.float32
    d, layers, heads, h = (hf[k] for k in ("decoder_embed_dim", "decoder_layers",
                                           "decoder_attention_heads", "hidden_dim"))
    hd, n = h // heads, len(tokens)
    w = {k: v.astype(f32) for k, v in sd.items()}
    t = np.arange(n, dtype=f32)

    def srms(x):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + f32(1e-6))

    def silu(x):
        return x / (f32(1) + np.exp(-x))

    def base_slopes(count):  # docs/spec.md §2
        p = 2 ** int(math.floor(math.log2(count)))
        pow2 = lambda m: [2.0 ** (-8.0 * (i + 1) / m) for i in range(m)]  # noqa: E731
        return np.array(pow2(p) + pow2(2 * p)[0::2][:count - p], f32)

    causal = t[:, None] >= t[None, :]
    distance = np.where(causal, t[:, None] - t[None, :], f32(0))
    x = w["model.embed_tokens.weight"][tokens] * (f32(1) if hf["no_scale_embedding"] else f32(np.sqrt(d)))
    for l in range(layers):
        p = f"model.layers.{l}."
        y = srms(x)
        q, k, v, u = np.split(y @ w[p + "token_mixer.qkvu_proj.weight"].T, 4, axis=-1)
        q, k, v = (z.reshape(n, heads, hd) for z in (q, k, v))
        q, k = silu(q), silu(k)
        if hf["linear_use_lrpe_list"][l]:
            phase = t[:, None, None] * w[p + "token_mixer.lrpe.theta"].reshape(1, heads, hd)
            q, k = (np.concatenate([z * np.cos(phase), z * np.sin(phase)], -1) for z in (q, k))
        s = base_slopes(heads) * f32(1 - l / (layers - 1) + 1e-5)
        decay = np.where(causal, np.exp(-s[:, None, None] * distance), f32(0))  # [H, t, j]
        o = np.einsum("htj,jhd->thd", np.einsum("thd,jhd->htj", q, k) * decay, v).reshape(n, h)
        x = x + (srms(o) * u) @ w[p + "token_mixer.out_proj.weight"].T
        y = srms(x)
        glu = (y @ w[p + "channel_mixer.l1.weight"].T) * (y @ w[p + "channel_mixer.l2.weight"].T)
        x = x + glu @ w[p + "channel_mixer.l3.weight"].T
    return srms(x) @ w["model.embed_tokens.weight"].T


def _torch(sd):
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}


def _shards(sd, count):
    keys = sorted(sd)
    return [{k: sd[k] for k in keys[i::count]} for i in range(count)]


def _write_index(path, shards, names):
    weight_map = {k: name for shard, name in zip(shards, names) for k in shard}
    with open(path, "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def write_checkpoint(directory, hf, sd, fmt):
    """Writes config.json and `sd` in one of the released weight formats."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf, f)
    if fmt == "bin":  # the released .bin files also hold the tied head
        torch.save(_torch({**sd, "lm_head.weight": sd["model.embed_tokens.weight"]}),
                   os.path.join(directory, "pytorch_model.bin"))
    elif fmt == "sharded-bin":
        shards = _shards(sd, 3)
        names = [f"pytorch_model-0000{i + 1}-of-00003.bin" for i in range(3)]
        for shard, name in zip(shards, names):
            torch.save(_torch(shard), os.path.join(directory, name))
        _write_index(os.path.join(directory, "pytorch_model.bin.index.json"), shards, names)
    elif fmt == "safetensors":
        safetensors.numpy.save_file(sd, os.path.join(directory, "model.safetensors"))
    elif fmt.startswith("sharded-safetensors"):
        shards = _shards(sd, 2)
        names = [f"model-0000{i + 1}-of-00002.safetensors" for i in range(2)]
        for shard, name in zip(shards, names):
            safetensors.numpy.save_file(shard, os.path.join(directory, name))
        if fmt.endswith("index"):
            _write_index(os.path.join(directory, "model.safetensors.index.json"), shards, names)
    else:
        raise ValueError(fmt)


FORMATS = ("bin", "sharded-bin", "safetensors", "sharded-safetensors-index",
           "sharded-safetensors-no-index")


@pytest.mark.parametrize("fmt", FORMATS)
def test_import_matches_numpy_reference(tmp_path, fmt):
    hf = hf_config()
    sd = released_state_dict(hf)
    write_checkpoint(tmp_path, hf, sd, fmt)
    cfg, params = convert.load_hf(str(tmp_path))
    model_cfg = config.model_config(cfg)
    assert model_cfg.lrpe_layers == (0, 2) and model_cfg.num_heads == 3
    tokens = np.random.default_rng(1).integers(0, hf["vocab_size"], (2, 21))
    # Chunks of 8 so that 21 tokens span a partial last chunk.
    logits, _ = TransNormerLLM(model_cfg.replace(chunk_size=8)).apply({"params": params}, tokens)
    for row, row_logits in zip(tokens, logits):
        assert rel_err(row_logits, numpy_reference(sd, hf, row)) <= 1e-5


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_bfloat16_weights_are_read_bit_exactly(tmp_path, fmt):
    hf = hf_config()
    sd = {k: v.astype(ml_dtypes.bfloat16) for k, v in released_state_dict(hf).items()}
    if fmt == "bin":
        write_checkpoint(tmp_path, hf, {}, "safetensors")  # config.json only
        os.remove(tmp_path / "model.safetensors")
        torch.save({k: torch.from_numpy(v.astype(np.float32)).to(torch.bfloat16) for k, v in sd.items()},
                   tmp_path / "pytorch_model.bin")
    else:
        write_checkpoint(tmp_path, hf, sd, fmt)
    read = convert.read_state_dict(str(tmp_path))
    assert read.keys() == sd.keys()
    for k, v in sd.items():
        assert read[k].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(read[k].view(np.uint16), v.view(np.uint16))


def _random_params(model_cfg, seed=0):
    variables = TransNormerLLM(model_cfg).init(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32))
    # Random θ too: its initial value would hide a transposition.
    params = jax.tree.map(np.asarray, nn.meta.unbox(variables["params"]))
    rng = np.random.default_rng(seed)
    for i in model_cfg.lrpe_layers:
        theta = params[f"layers_{i}"]["token_mixer"]["theta"]
        params[f"layers_{i}"]["token_mixer"]["theta"] = rng.standard_normal(theta.shape, np.float32)
    return params


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_then_import_gives_identical_arrays(tmp_path, dtype):
    """Param trees: 3 heads, LRPE in two layers, weights through a .safetensors file."""
    model_cfg = convert.model_config_from_hf(hf_config())
    params = jax.tree.map(lambda p: p.astype(jnp.dtype(dtype)), _random_params(model_cfg))
    hf = convert.hf_config_from_model(model_cfg, dtype=dtype)
    write_checkpoint(tmp_path, hf, convert.state_dict_from_params(params, model_cfg, dtype),
                     "safetensors")
    cfg, back = convert.load_hf(str(tmp_path), dtype)
    assert config.model_config(cfg) == model_cfg.replace(dtype=dtype, param_dtype=dtype)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def test_layout_places_heads_and_rows_like_the_released_code():
    """A qkvu row of the released weight is (part, head, feature); out_proj columns are (head, feature)."""
    hf = hf_config()
    sd = released_state_dict(hf)
    model_cfg = convert.model_config_from_hf(hf)
    params = convert.params_from_state_dict(sd, model_cfg)
    w = sd["model.layers.1.token_mixer.qkvu_proj.weight"]  # (4h, d)
    kernel = params["layers_1"]["token_mixer"]["qkvu_proj"]["kernel"]  # (d, 4, H, hd)
    part, head, feature, hd = 2, 1, 5, model_cfg.head_dim  # v of head 1
    np.testing.assert_array_equal(kernel[:, part, head, feature],
                                  w[part * model_cfg.hidden_dim + head * hd + feature])
    out = params["layers_1"]["token_mixer"]["out_proj"]["kernel"]  # (H, hd, d)
    np.testing.assert_array_equal(out[head, feature], sd["model.layers.1.token_mixer.out_proj.weight"][
        :, head * hd + feature])


# The released models' config.json values (docs/spec.md §5, §6).
RELEASED = {
    "385m": (dict(decoder_embed_dim=1024, decoder_layers=24, decoder_attention_heads=8, hidden_dim=1024,
                  glu_dim=2816, no_scale_embedding=False), 398_984_192),
    "1b": (dict(decoder_embed_dim=2048, decoder_layers=16, decoder_attention_heads=16, hidden_dim=2048,
                glu_dim=5632, no_scale_embedding=False), 1_020_266_496),
    "3b": (dict(decoder_embed_dim=2560, decoder_layers=32, decoder_attention_heads=20, hidden_dim=2560,
                glu_dim=6912, no_scale_embedding=True), 2_911_111_680),
    "7b": (dict(decoder_embed_dim=4096, decoder_layers=30, decoder_attention_heads=32, hidden_dim=4096,
                glu_dim=11008, no_scale_embedding=True), 6_836_719_616),
}


def _parameter_count(model_cfg):
    shapes = jax.eval_shape(lambda: TransNormerLLM(model_cfg).init(jax.random.PRNGKey(0),
                                                                   jnp.zeros((1, 4), jnp.int32)))
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nn.meta.unbox(shapes["params"])))


@pytest.mark.parametrize("name", RELEASED)
def test_released_configs_map_to_the_project_configs(name):
    fields, count = RELEASED[name]
    hf = hf_config(vocab_size=64000, linear_use_lrpe_list=[1] + [0] * (fields["decoder_layers"] - 1),
                   **fields)
    mapped = convert.model_config_from_hf(hf)
    ours = config.model_config(config.load(f"configs/{name}.py"))
    # The architecture matches; dtype and loss_chunk are how to compute it, not in the HF config.
    assert mapped == ours.replace(dtype=mapped.dtype, loss_chunk=mapped.loss_chunk)
    assert _parameter_count(mapped) == count
    assert sum(math.prod(t.hf_shape) for t in convert.layout(mapped)) == count
    assert convert.model_config_from_hf(convert.hf_config_from_model(mapped)) == mapped


def test_missing_defaults_and_shorthands_follow_the_released_code():
    hf = hf_config(glu_dim=-1, linear_use_lrpe_list=[], linear_use_lrpe=1)
    del hf["init_std"]
    cfg = convert.model_config_from_hf(hf)
    assert cfg.glu_dim == 48 and cfg.lrpe_layers == (0, 1, 2) and cfg.init_std == 0.02


@pytest.mark.parametrize("changes,message", [
    (dict(bias=True), r"bias: true"),
    (dict(norm_type="layernorm"), r"norm_type 'layernorm'; tnllm implements only 'simplermsnorm'"),
    (dict(linear_act_fun="relu"), r"linear_act_fun 'relu'; tnllm implements only swish or silu"),
    (dict(model_type="tnl-moe"), r"model_type 'tnl-moe'"),
    (dict(linear_use_lrpe_list=[1, 0]), r"linear_use_lrpe_list has 2 entries for decoder_layers=3"),
    (dict(decoder_attention_heads=5), r"config.json describes an invalid model: .*divisible"),
])
def test_unsupported_config_values_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        convert.model_config_from_hf(hf_config(**changes))


def test_mismatched_weights_are_listed_by_name(tmp_path):
    hf = hf_config()
    sd = released_state_dict(hf)
    del sd["model.layers.2.token_mixer.lrpe.theta"]
    sd["model.layers.0.token_mixer.norm.weight"] = np.ones(48, np.float32)
    sd["model.layers.1.channel_mixer.l3.weight"] = np.zeros((80, 48), np.float32)
    write_checkpoint(tmp_path, hf, sd, "safetensors")
    with pytest.raises(ValueError) as e:
        convert.load_hf(str(tmp_path))
    assert str(e.value) == (
        "The checkpoint's tensors do not match the model config: missing model.layers.2.token_mixer.lrpe.theta; "
        "unexpected model.layers.0.token_mixer.norm.weight; shape mismatches: "
        "model.layers.1.channel_mixer.l3.weight (expected (48, 80), found (80, 48)); "
        "check that config.json belongs to these weights.")


def test_untied_lm_head_is_refused():
    hf = hf_config()
    sd = released_state_dict(hf)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"] + 1
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens.weight"):
        convert.params_from_state_dict(sd, convert.model_config_from_hf(hf))


def test_params_of_another_config_are_refused_on_export():
    model_cfg = convert.model_config_from_hf(hf_config())
    params = _random_params(model_cfg.replace(lrpe_layers=(0,)))
    with pytest.raises(ValueError, match=r"The parameters do not match the model config: missing layers_2/token_mixer/theta;"):
        convert.state_dict_from_params(params, model_cfg)


@pytest.mark.parametrize("changes,message", [
    (dict(norm_eps=1e-5), r"norm_eps is 1e-05, but the released code fixes it at 1e-06"),
    (dict(num_layers=1, lrpe_layers=(0,)), r"num_layers is 1"),
    (dict(hidden_dim=96), r"hidden_dim \(96\) differs from d_model \(48\) in a model with LRPE"),
])
def test_models_the_released_code_cannot_run_are_not_exported(changes, message):
    model_cfg = convert.model_config_from_hf(hf_config()).replace(**changes)
    with pytest.raises(ValueError, match=message):
        convert.hf_config_from_model(model_cfg)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        convert.load_hf(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="has no config.json"):  # not its tokenizer first
        convert.import_hf(str(tmp_path / "absent"), str(tmp_path / "out"))
    write_checkpoint(tmp_path, hf_config(), {}, "safetensors")
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="No weights in"):
        convert.load_hf(str(tmp_path))
    write_checkpoint(tmp_path, hf_config(), released_state_dict(hf_config()), "sharded-bin")
    os.remove(tmp_path / "pytorch_model-00002-of-00003.bin")
    with pytest.raises(FileNotFoundError, match="lists weight files pytorch_model-00002-of-00003.bin"):
        convert.load_hf(str(tmp_path))


def test_bin_without_torch_says_how_to_fix_it(tmp_path, monkeypatch):
    write_checkpoint(tmp_path, hf_config(), released_state_dict(hf_config()), "bin")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(ImportError, match=r"needs PyTorch: install tnllm's hf extra"):
        convert.load_hf(str(tmp_path))


def _sentencepiece_model(path):
    """A small SentencePiece model (vocabulary 60 < the test config's 101) trained on a few lines."""
    import sentencepiece

    lines = [f"the model {w} generates text {i} from its state" for i, w in
             enumerate("alpha beta gamma delta epsilon zeta eta theta iota kappa".split())] * 20
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(path), vocab_size=60, model_type="bpe",
        character_coverage=1.0, minloglevel=2)
    return f"{path}.model"


def _run(*args, ok=True):
    out = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                         env=subprocess_env())
    if ok:
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout
    assert out.returncode != 0
    return out.stderr.strip()


def test_imported_model_generates_and_exports_back(tmp_path):
    """Import through the CLI, generate through `python -m tnllm.generate`, then export
    the export back to a Hugging Face checkpoint that imports to the same arrays."""
    hf = hf_config()
    hf_dir, export_dir, back_dir = tmp_path / "hf", tmp_path / "export", tmp_path / "hf-back"
    write_checkpoint(hf_dir, hf, released_state_dict(hf), "safetensors")
    os.replace(_sentencepiece_model(tmp_path / "spm"), hf_dir / "tokenizer.model")

    _run("tnllm.convert", "import", f"--hf_dir={hf_dir}", f"--out={export_dir}")
    text = _run("tnllm.generate", f"--checkpoint={export_dir}", "--prompt=the model alpha",
                "--max_new_tokens=6", "--temperature=0", "--noadd_bos", "--autotune")
    assert "the model alpha" in text

    _run("tnllm.convert", "export", f"--checkpoint={export_dir}", f"--out={back_dir}",
         "--dtype=float32")
    assert (back_dir / "tokenizer.model").is_file()
    _, original = convert.load_hf(str(hf_dir), "float32")
    _, exported = convert.load_hf(str(back_dir), "float32")
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(original)):
        np.testing.assert_array_equal(a, b)


def _truncate(path, keep):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:keep(len(data))])


def test_truncated_safetensors_is_one_error_line_naming_the_file(tmp_path):
    write_checkpoint(tmp_path, hf_config(), released_state_dict(hf_config()), "safetensors")
    _truncate(tmp_path / "model.safetensors", lambda n: n - 100)
    (tmp_path / "tokenizer.model").write_bytes(b"")  # read after the weights, which fail first
    err = _run("tnllm.convert", "import", f"--hf_dir={tmp_path}", f"--out={tmp_path / 'out'}", ok=False)
    assert err == (f"error: {tmp_path / 'model.safetensors'} cannot be read (Error while deserializing "
                   "header: incomplete metadata, file not fully covered): it is damaged or incomplete, "
                   "for example an interrupted download; download it again.")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep", [lambda n: n // 2, lambda n: 4, lambda n: 0])
def test_truncated_bin_names_the_file(tmp_path, keep):
    write_checkpoint(tmp_path, hf_config(), released_state_dict(hf_config()), "sharded-bin")
    damaged = tmp_path / "pytorch_model-00002-of-00003.bin"
    _truncate(damaged, keep)
    with pytest.raises(ValueError) as e:
        convert.load_hf(str(tmp_path))
    # The reason in brackets is PyTorch's own, which varies between its versions.
    assert re.fullmatch(rf"{re.escape(str(damaged))} cannot be read \(.+\): it is damaged or "
                        "incomplete, for example an interrupted download; download it again.",
                        str(e.value))


def test_damaged_json_files_are_named(tmp_path):
    write_checkpoint(tmp_path, hf_config(), released_state_dict(hf_config()), "sharded-safetensors-index")
    _truncate(tmp_path / "model.safetensors.index.json", lambda n: n - 5)
    with pytest.raises(ValueError, match=r"model.safetensors.index.json is not valid JSON \(.* at line 1\)"):
        convert.load_hf(str(tmp_path))
    (tmp_path / "config.json").write_text('{"vocab_size": 101,\n "bias": fals}')
    with pytest.raises(ValueError, match=r"config.json is not valid JSON \(Expecting value at line 2\)"):
        convert.load_hf(str(tmp_path))


@pytest.mark.parametrize("args,message", [
    ([], "Name one command, import or export, as in `python -m tnllm.convert import --hf_dir=DIR "
         "--out=EXPORT_DIR`; got none."),
    (["import", "export"], "Name one command, import or export, as in `python -m tnllm.convert "
                           "import --hf_dir=DIR --out=EXPORT_DIR`; got import export."),
    (["import", "--hf_dir=x"], "import needs --out."),
    (["export", "--dtype=float32"], "export needs --checkpoint and --out."),
    (["import", "--hf_dir=x", "--out=y", "--checkpoint=z"],
     "import takes no --checkpoint; its flags are --hf_dir, --out, --dtype, --tokenizer."),
])
def test_cli_flags_are_checked_per_command(args, message):
    from absl import flags

    flag_values = flags.FlagValues()
    convert._define_flags(flag_values)
    argv = flag_values(["convert.py", *args])
    with pytest.raises(ValueError) as e:
        convert._command(argv, flag_values)
    assert str(e.value) == message


def test_cli_refuses_a_flag_of_the_other_command(tmp_path):
    assert _run("tnllm.convert", "export", f"--hf_dir={tmp_path}", "--out=x", ok=False) == (
        "error: export takes no --hf_dir; its flags are --checkpoint, --out, --dtype.")
