"""Generation: prefill + recurrent decode equals one forward pass; batching, EOS, compile-once."""
import functools
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, assert_prefill_then_decode_matches_forward, rel_err, subprocess_env

from tnllm import config
from tnllm import generate as generate_module
from tnllm.decode import (DecodeOptions, Sampling, decode, decode_step, left_pad, loop, prefill,
                          prompt_bucket)
from tnllm.decode.step import carried_states
from tnllm.generate import _read_prompts, complete, generate, request_bytes, serving_params
from tnllm.model import TransNormerLLM, state_specs
from tnllm.sampling import Temperature, TopK

# A larger init_std than training's 0.02 so that a random tiny model does not just repeat its input.
CFG = config.model_config(config.load("configs/tiny.py")).replace(chunk_size=8, init_std=0.3)
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [200, 17, 45, 3, 99, 128], [42]]
CHUNK = 8  # prefill segment: the 16-token bucket of PROMPTS runs as two segments
NEW = 8  # max_new_tokens: one value, so that tests share compiled functions


@pytest.fixture(scope="module")
def params():
    variables = jax.jit(TransNormerLLM(CFG).init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    return nn.unbox(variables)["params"]


@functools.partial(jax.jit, static_argnames="cfg")
def forward(params, tokens, cfg=CFG):
    """Unpadded forward pass: tokens [batch, t] -> logits [batch, t, vocab] f32."""
    return TransNormerLLM(cfg).apply({"params": params}, tokens)[0]


@pytest.mark.parametrize("impl", ["reference", "blockwise", "recurrent", "pallas"])
def test_prefill_then_decode_steps_match_one_forward_pass(params, impl):
    # The Pallas kernels take chunks of 16 tokens or more (interpret mode on a CPU).
    cfg = CFG.replace(attention_impl=impl, chunk_size=16 if impl == "pallas" else CFG.chunk_size)
    assert_prefill_then_decode_matches_forward(params, cfg, PROMPTS, CHUNK)


@pytest.mark.parametrize("prompts", [PROMPTS, PROMPTS[:1]], ids=["batch3", "batch1"])
def test_greedy_tokens_and_logprobs_are_those_of_a_forward_pass(params, prompts):
    """Also at batch 1, which decodes as two copies of the row (tnllm.decode.step)."""
    out = generate(params, CFG, prompts, max_new_tokens=NEW, return_logprobs=True, prefill_chunk=CHUNK)
    assert out.tokens.shape == out.logprobs.shape == (len(prompts), NEW)
    assert out.lengths.tolist() == [NEW] * len(prompts)
    for row, prompt in enumerate(prompts):
        n = len(prompt)
        logits = forward(params, jnp.asarray([prompt + out.tokens[row].tolist()]))[0]
        logprobs = jax.nn.log_softmax(logits[n - 1:-1])
        np.testing.assert_array_equal(out.tokens[row], np.argmax(logprobs, axis=-1))
        np.testing.assert_allclose(
            out.logprobs[row], np.take_along_axis(logprobs, out.tokens[row][:, None], -1)[:, 0],
            rtol=1e-5, atol=1e-5)
    assert len(np.unique(out.tokens)) > 3  # the model does not just repeat one token


def test_serving_params_are_bf16_weights_with_the_same_outputs():
    cfg = CFG.replace(dtype="bfloat16")
    variables = jax.jit(TransNormerLLM(cfg).init)(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))
    params = nn.unbox(variables)["params"]
    served = serving_params(params, cfg)
    kinds = {}
    for path, x in jax.tree_util.tree_leaves_with_path(served):
        kinds.setdefault(path[-1].key, set()).add(str(x.dtype))
    assert kinds["kernel"] == kinds["embedding"] == {"bfloat16"}
    assert kinds["theta"] == {"float32"}  # LRPE angles: used in float32 by the model
    tokens = jnp.asarray([[5, 9, 200, 3, 77, 1, 64, 12]])
    full, cast = (TransNormerLLM(cfg).apply({"params": p}, tokens)[0] for p in (params, served))
    np.testing.assert_array_equal(np.asarray(full), np.asarray(cast))
    # float32 compute: nothing to cast.
    assert all(a is b for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(serving_params(params, CFG))))


def test_greedy_is_deterministic_and_equals_top_1_sampling(params):
    runs = [generate(params, CFG, PROMPTS, max_new_tokens=NEW, seed=s, prefill_chunk=CHUNK).tokens
            for s in (0, 1)]
    np.testing.assert_array_equal(runs[0], runs[1])
    top1 = generate(params, CFG, PROMPTS, max_new_tokens=NEW, sampler=TopK(1), seed=3, prefill_chunk=CHUNK)
    np.testing.assert_array_equal(top1.tokens, runs[0])


def test_sampling_follows_the_seed(params):
    run = lambda seed: generate(params, CFG, PROMPTS, max_new_tokens=NEW,  # noqa: E731
                                sampler=Temperature(1.0), seed=seed, prefill_chunk=CHUNK).tokens
    np.testing.assert_array_equal(run(5), run(5))
    assert (run(5) != run(6)).any()


def test_eos_stops_its_row_while_the_others_continue(params):
    free = generate(params, CFG, PROMPTS, max_new_tokens=NEW, prefill_chunk=CHUNK).tokens
    # An EOS that row 0 emits at step `stop` and that neither row 0 before it nor row 1 ever emits.
    stop = next(i for i in range(1, NEW)
                if free[0, i] not in free[0, :i] and free[0, i] not in free[1])
    eos, pad = int(free[0, stop]), 255
    out = generate(params, CFG, PROMPTS, max_new_tokens=NEW, eos_id=eos, pad_id=pad, prefill_chunk=CHUNK,
                   return_logprobs=True)
    assert out.lengths[0] == stop + 1
    np.testing.assert_array_equal(out.tokens[0, :stop + 1], free[0, :stop + 1])
    assert (out.tokens[0, stop + 1:] == pad).all() and (out.logprobs[0, stop + 1:] == 0).all()
    assert out.lengths[1] == NEW
    np.testing.assert_array_equal(out.tokens[1], free[1])


@pytest.mark.parametrize("variant", [DecodeOptions(steps_per_iteration=1),
                                     DecodeOptions(steps_per_iteration=3),
                                     DecodeOptions(fold_norms=False)], ids=["1", "3", "unfolded"])
def test_loop_splits_and_folded_norms_do_not_change_the_generation(params, variant):
    """Several steps per loop iteration (default 4) with the single-step remainder after them, and
    the norms folded into the products (the default at batch > 1): the same tokens and lengths as
    other splits and the released order, and log-probabilities to float32 rounding, also when
    rows stop at EOS mid-way."""
    tokens, mask = left_pad(PROMPTS, prompt_bucket(13, CHUNK))
    prefilled = prefill(params, tokens, mask, cfg=CFG, prefill_chunk=CHUNK)
    free = jax.device_get(decode(params, prefilled, jax.random.key(5), cfg=CFG,
                                 sampling=Sampling(NEW, Temperature(1.0))).tokens)
    sampling = Sampling(NEW, Temperature(1.0), eos_id=int(free[0, 2]), pad_id=255, return_logprobs=True)
    run = lambda options: jax.device_get(decode(  # noqa: E731
        params, prefilled, jax.random.key(5), cfg=CFG, sampling=sampling, options=options))
    default, split = run(DecodeOptions()), run(variant)
    assert min(default.lengths) < NEW  # an EOS stopped a row early
    np.testing.assert_array_equal(default.tokens, split.tokens)
    np.testing.assert_array_equal(default.lengths, split.lengths)
    # Another compiled program rounds the float32 log-probabilities differently: in the last place
    # for another loop split, by a few ulps for the released order's arithmetic (H200: 1 ulp and
    # 1.7e-6 relative).
    tol = 1e-5 if variant.fold_norms is False else 1e-6
    np.testing.assert_allclose(default.logprobs, split.logprobs, rtol=tol, atol=tol)


@jax.jit
def model_step(params, token, position, states):
    """The model's forward pass over one token per row after `states`."""
    return TransNormerLLM(CFG).apply({"params": params}, token[:, None], positions=position[:, None],
                                     initial_states=states)


@pytest.fixture(scope="module")
def after_prompt(params):
    """Two rows' states after 11 prompt tokens through the model, and the next token and position."""
    cfg = CFG.replace(attention_impl="recurrent")
    tokens = jax.random.randint(jax.random.key(11), (2, 12), 0, CFG.vocab_size)
    _, states = jax.jit(TransNormerLLM(cfg).apply)({"params": params}, tokens[:, :11])
    return tokens[:, 11], jnp.full((2,), 11), states


@pytest.mark.parametrize("batch, copies", [(2, 1), (1, 1), (1, 2)])
@pytest.mark.parametrize("fold_norms", [False, True])
def test_the_decoding_step_is_the_models_step(params, after_prompt, batch, copies, fold_norms):
    """TNL's step as decoding writes it (the norms folded or not, a row run once or as two copies
    with one state row) against the model's forward pass over the same token, in float32."""
    token, position, states = after_prompt
    token, position, states = token[:batch], position[:batch], tuple(s[:batch] for s in states)
    want, want_states = model_step(params, token, position, states)
    got, got_states = decode_step(params, token, position, states, cfg=CFG, fold_norms=fold_norms,
                                  copies=copies)
    assert got.shape == (batch, CFG.vocab_size)
    assert rel_err(got, want[:, 0]) <= 1e-5
    for g, w in zip(got_states, want_states):
        assert g.shape == w.shape and rel_err(g, w) <= 1e-5


def test_folded_norms_in_bf16_are_as_close_to_float32_as_the_papers_order(params, after_prompt):
    token, position, states = after_prompt
    want = decode_step(params, token, position, states, cfg=CFG)[0]
    bf16 = CFG.replace(dtype="bfloat16")
    paper, folded = (decode_step(params, token, position, states, cfg=bf16, fold_norms=fold)[0]
                     for fold in (False, True))
    assert folded.dtype == jnp.float32
    assert 0 < rel_err(folded, want) <= 1.5 * rel_err(paper, want)


def test_cosformer_decodes_one_row_as_two_copies_of_its_state():
    cfg = CFG.replace(token_mixer="cosformer")
    variables = jax.jit(TransNormerLLM(cfg).init)(jax.random.key(2), jnp.zeros((1, 4), jnp.int32))
    params = nn.unbox(variables)["params"]
    # Sums of positive features over earlier tokens, as cosFormer's states hold.
    states = tuple(jnp.abs(jax.random.normal(jax.random.key(i), s.shape)) for i, s in
                   enumerate(state_specs(cfg, 1)))
    token, position = jnp.asarray([17]), jnp.asarray([9])
    alone, alone_states = decode_step(params, token, position, states, cfg=cfg)
    twice, twice_states = decode_step(params, token, position, carried_states(cfg, states, 2),
                                      cfg=cfg, copies=2)
    assert twice.shape == alone.shape and rel_err(twice, alone) <= 1e-6
    for a, t in zip(alone_states, twice_states):
        assert t.shape == (2,) + a.shape[1:] and rel_err(t[:1], a) <= 1e-6 and rel_err(t[1:], a) <= 1e-6


def test_decode_options_resolve_to_one_step(params):
    """On this machine (no GPU compiles the kernels), as on any: each None decided once."""
    bf16 = CFG.replace(dtype="bfloat16")
    one, many = DecodeOptions().resolve(bf16, 1), DecodeOptions().resolve(bf16, 4)
    assert many.fused is False and many.fold_norms is True and many.kernels is None
    assert one.fold_norms is False  # folded norms did not pay at one row
    assert one.fused == (jax.default_backend() == "gpu")
    fused = DecodeOptions(fused=True).resolve(bf16, 1)
    assert fused.fused and fused.kernels in ("hopper", "triton") and fused.fold_norms is False
    assert DecodeOptions(fold_norms=True).resolve(CFG.replace(token_mixer="softmax"), 4).fold_norms is False
    with pytest.raises(ValueError, match="the batch has 4 rows"):
        DecodeOptions(fused=True).resolve(bf16, 4)
    with pytest.raises(ValueError, match="DecodeOptions.kernels is 'cuda'"):
        DecodeOptions(kernels="cuda")
    with pytest.raises(ValueError, match="steps_per_iteration must be a positive integer"):
        DecodeOptions(steps_per_iteration=0)


def test_decode_state_shape_does_not_depend_on_context_length(params):
    shapes = []
    for length in (16, 1024):
        tokens = jnp.zeros((2, length), jnp.int32)
        pre = jax.eval_shape(lambda t: prefill(params, t, t >= 0, cfg=CFG, prefill_chunk=256), tokens)
        shapes.append(jax.tree.map(lambda x: (x.shape, x.dtype), pre))
    assert shapes[0] == shapes[1]
    assert list(shapes[0].states) == [(s.shape, s.dtype) for s in state_specs(CFG, 2)]
    assert shapes[0].states[0][0] == (2, CFG.num_heads, 2 * CFG.head_dim, CFG.head_dim)  # LRPE doubles dk


def test_compiles_once_per_batch_bucket_and_max_new_tokens(params):
    cfg = CFG.replace(chunk_size=4)  # a configuration no other test compiles
    sizes = lambda: (prefill._cache_size(), loop.PROGRAMS[False]._cache_size())  # noqa: E731
    run = lambda prompts: generate(params, cfg, prompts, max_new_tokens=3)  # noqa: E731
    before = sizes()
    run([[1] * 5, [2] * 9])
    assert sizes() == (before[0] + 1, before[1] + 1)
    run([[3] * 16, [4]])  # same batch and bucket (16): nothing new
    assert sizes() == (before[0] + 1, before[1] + 1)
    run([[5] * 17, [6] * 30])  # a new bucket (32) re-traces the prefill only: the state is the same
    assert sizes() == (before[0] + 2, before[1] + 1)


def test_autotuned_decoding_generates_the_same(params):
    """autotune compiles the decoding loop with XLA's GEMM tiling search (GPU only) as a program of
    its own; the tokens are the same."""
    prompts = [[1] * 5, [2] * 9]
    plain = generate(params, CFG, prompts, max_new_tokens=NEW, return_logprobs=True)
    sizes = lambda: tuple(loop.PROGRAMS[tuned]._cache_size() for tuned in (False, True))  # noqa: E731
    before = sizes()
    tuned = generate(params, CFG, prompts, max_new_tokens=NEW, return_logprobs=True,
                     options=DecodeOptions(autotune=True))
    assert sizes() == (before[0], before[1] + 1)
    np.testing.assert_array_equal(tuned.tokens, plain.tokens)
    np.testing.assert_array_equal(tuned.lengths, plain.lengths)
    # Other GEMM tilings sum in another order: float32 rounding apart.
    np.testing.assert_allclose(tuned.logprobs, plain.logprobs, rtol=1e-5, atol=1e-5)


def test_prompt_bucket_and_left_pad():
    assert [prompt_bucket(n) for n in (1, 16, 17, 1000, 2048, 2049)] == [16, 16, 32, 1024, 2048, 4096]
    assert prompt_bucket(3000, prefill_chunk=1000) == 5000
    tokens, mask = left_pad([[7, 8], [9]], 4, pad_id=0)
    assert tokens.tolist() == [[0, 0, 7, 8], [0, 0, 0, 9]]
    assert mask.tolist() == [[False, False, True, True], [False, False, False, True]]


@pytest.mark.parametrize("prompts, kwargs, match", [
    ([[1, 2], []], {}, "Prompt 1 must be a non-empty"),
    ("hello", {}, "tokenize text first"),
    ([[1, CFG.vocab_size]], {},
     f"token id {CFG.vocab_size}, outside the model's vocabulary 0..{CFG.vocab_size - 1}"),
    ([[-1]], {}, "token id -1"),
    ([[1]], {"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
    ([[1]], {"eos_id": 300}, "eos_id 300 is outside"),
])
def test_bad_requests_are_refused_with_the_fix(params, prompts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(params, CFG, prompts, **{"max_new_tokens": 2, **kwargs})


def test_the_full_config_is_refused_with_the_fix(params):
    full = config.load("configs/tiny.py")  # what load_model returns beside the params
    with pytest.raises(TypeError, match=r"pass tnllm.config.model_config\(config\)"):
        generate(params, full, [[1, 2]], max_new_tokens=2)
    with pytest.raises(TypeError, match="not a ModelConfig"):
        complete(params, full, ByteStub(), ["a"], max_new_tokens=1)


class ByteStub:
    """The tokenizer interface of `tnllm.tokenizer` over ASCII bytes, for the tiny 256-id model."""

    vocab_size, pad_id, bos_id, eos_id = 256, 0, 1, 2

    def encode(self, text):
        return list(text.encode("ascii"))

    def decode(self, ids):
        return bytes(i for i in ids if i > 2).decode("ascii", errors="replace")


def test_complete_tokenizes_batches_and_decodes(params):
    texts = ["hi", "hello there", "x"]
    got = complete(params, CFG, ByteStub(), texts, max_new_tokens=NEW, batch_size=2, prefill_chunk=CHUNK)
    assert len(got) == len(texts)
    for text, completion in zip(texts, got):
        alone = generate(params, CFG, [[1] + list(text.encode())], max_new_tokens=NEW, eos_id=2,
                         prefill_chunk=CHUNK, return_logprobs=True)
        n = int(alone.lengths[0])
        assert completion.tokens == alone.tokens[0, :n].tolist()
        np.testing.assert_allclose(completion.logprobs, alone.logprobs[0, :n], rtol=1e-5, atol=1e-5)
        assert completion.text == ByteStub().decode(completion.tokens)


def test_complete_refuses_a_tokenizer_larger_than_the_vocabulary(params):
    stub = ByteStub()
    stub.vocab_size = 300
    with pytest.raises(ValueError, match="trained with"):
        complete(params, CFG, stub, ["a"], max_new_tokens=1)


def test_a_batch_holds_no_more_rows_than_prompts(params, monkeypatch):
    """One prompt at --batch_size 8 decodes one row, not eight copies (eight rows' states and
    outputs); five at 2 run as 2, 2 and 2 (the last filled up to reuse the compiled program)."""
    rows = []
    real = generate_module.generate

    def spy(params, cfg, prompts, **kwargs):
        rows.append(len(prompts))
        return real(params, cfg, prompts, **kwargs)

    monkeypatch.setattr(generate_module, "generate", spy)
    # The programs of test_complete_tokenizes_batches_and_decodes.
    complete(params, CFG, ByteStub(), ["one"], max_new_tokens=NEW, batch_size=8, prefill_chunk=CHUNK)
    assert rows == [1]
    rows.clear()
    got = complete(params, CFG, ByteStub(), list("abcde"), max_new_tokens=NEW, batch_size=2,
                   prefill_chunk=CHUNK)
    assert rows == [2, 2, 2] and len(got) == 5
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        complete(params, CFG, ByteStub(), ["one"], max_new_tokens=2, batch_size=0)


def test_max_new_tokens_is_bounded_by_the_memory_for_states_and_outputs(params, monkeypatch):
    """With exactly the memory that NEW tokens of PROMPTS need, NEW runs and NEW + 1 is refused
    with the largest count that fits."""
    monkeypatch.setattr(generate_module, "free_memory_bytes",
                        lambda: request_bytes(CFG, len(PROMPTS), NEW, True))
    out = generate(params, CFG, PROMPTS, max_new_tokens=NEW, return_logprobs=True, prefill_chunk=CHUNK)
    assert out.tokens.shape == (len(PROMPTS), NEW)
    platform = jax.local_devices()[0].platform.upper()  # the message names the device's memory
    with pytest.raises(ValueError, match=f"free on {platform}; lower max_new_tokens to at most "
                                         f"{NEW}\\.$"):
        generate(params, CFG, PROMPTS, max_new_tokens=NEW + 1, return_logprobs=True,
                 prefill_chunk=CHUNK)
    # Without log-probabilities a token takes half the memory: twice as many fit.
    with pytest.raises(ValueError, match=f"at most {2 * NEW}\\.$"):
        generate(params, CFG, PROMPTS, max_new_tokens=2 * NEW + 1, prefill_chunk=CHUNK)
    monkeypatch.setattr(generate_module, "free_memory_bytes", lambda: 1000)  # not even the states
    with pytest.raises(ValueError, match="generate fewer prompts together"):
        generate(params, CFG, PROMPTS, max_new_tokens=1)


def test_max_new_tokens_beyond_int32_positions_is_refused(params):
    with pytest.raises(ValueError, match="lower max_new_tokens to at most 2147483634"):
        generate(params, CFG, PROMPTS, max_new_tokens=3_000_000_000)


def test_prompts_come_from_flags_and_a_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("first line\n\nsecond line\n")
    assert _read_prompts(["flag"], str(path)) == ["flag", "first line", "second line"]
    with pytest.raises(FileNotFoundError, match="--prompt_file"):
        _read_prompts([], str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="--prompt TEXT"):
        _read_prompts([], None)


@pytest.mark.parametrize("flag, sentence", [
    ("--batch_size=0",
     "error: --batch_size must be a positive integer, got 0; set it to 1 or more."),
    ("--max_new_tokens=3000000000",
     "error: max_new_tokens 3000000000 after a prompt of 1 tokens passes the 2147483647 positions "
     "that decoding counts in int32; lower max_new_tokens to at most 2147483646."),
    ("--mesh_context=2",  # the child has one CPU device
     "error: --mesh_data=1 and --mesh_context=2 need 2 devices but 1 are present; lower them so "
     "that their product is at most 1."),
])
def test_the_cli_refuses_bad_numbers_in_one_sentence_before_reading_the_model(tmp_path, flag,
                                                                             sentence):
    out = subprocess.run([sys.executable, "-m", "tnllm.generate", f"--checkpoint={tmp_path}",
                          "--prompt=x", flag], cwd=REPO, capture_output=True, text=True,
                         env=subprocess_env())
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [sentence]


def test_the_cli_names_bad_input_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tnllm.generate", f"--checkpoint={tmp_path / 'absent'}",
                          "--prompt=x"], cwd=REPO, capture_output=True, text=True, env=subprocess_env())
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'absent'} is neither an export (no config.json) nor a training work "
        "directory (no checkpoints/); pass one of those.")


def test_the_cli_splits_prompts_over_a_mesh_and_prints_one_devices_text(params, tmp_path):
    """`--mesh_context=2 --mesh_data=2` on 4 fake CPU devices: a prompt of 23 bytes (a bucket of 32,
    segments of 16 split into slices of 8) prints the greedy text that `complete` gives on one
    device."""
    from tnllm.checkpoint import save_export
    from tnllm.tokenizer import ByteTokenizer

    full = config.load("configs/tiny.py")
    full.model.update(chunk_size=8, init_std=0.3)
    save_export(str(tmp_path / "export"), full, params)
    prompt = "the quick brown fox jum"
    want = complete(params, CFG, ByteTokenizer(), [prompt], max_new_tokens=NEW, prefill_chunk=16)
    out = subprocess.run([sys.executable, "-m", "tnllm.generate", f"--checkpoint={tmp_path / 'export'}",
                          f"--prompt={prompt}", f"--max_new_tokens={NEW}", "--temperature=0",
                          "--prefill_chunk=16", "--mesh_context=2", "--mesh_data=2"],
                         cwd=REPO, capture_output=True, text=True,
                         env=subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=4",
                                            JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout == f"{prompt}{want[0].text}\n\n"
