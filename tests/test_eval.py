"""Evaluation: log-likelihoods against one forward pass, perplexity against training's validation
loss, and the lm-evaluation-harness model end to end on a local task."""
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lm_eval.api.instance import Instance

from tnllm import checkpoint, config, train_lib
from tnllm.eval import perplexity
from tnllm.eval.harness import TnllmLM
from tnllm.eval.score import continuation_logprobs, stream_logprobs
from tnllm.generate import complete, complete_ids
from tnllm.model import TransNormerLLM
from tnllm.sampling import Greedy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["def add(a, b):\n    return a + b\n" * 3, "x = 1\n", "print('hello, world')  # é\n"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model trained for a few steps on a small corpus: (work dir, its Result)."""
    root = tmp_path_factory.mktemp("eval")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"m{i}.txt").write_text("".join(
            f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(20)))
    cfg = config.load(os.path.join(REPO, "configs", "tiny.py"))
    cfg.model.update(d_model=32, num_layers=2, num_heads=2, glu_dim=64, lrpe_layers=[0],
                     attention_impl="reference")
    cfg.data.update(path=str(corpus), cache_dir=str(root / "cache"), val_fraction=0.2, seq_len=24)
    cfg.optim.update(lr=1e-2, warmup_steps=2)
    cfg.train.update(steps=40, batch_size=4, log_every=10, eval_every=40, eval_batches=2,
                     sample_tokens=0)
    cfg.checkpoint.update(every=40)
    result = train_lib.train(cfg, str(root / "run"))
    return str(root / "run"), result


@pytest.fixture(scope="module")
def model(run):
    full, params = checkpoint.load_model(run[0])
    return full, params, config.model_config(full), TnllmLM(checkpoint=run[0], batch_size=3)


PADDED = 128  # every reference sequence is right-padded to this: one compiled forward pass


def _forward_pass(params, cfg, sequences):
    """For each token list: (log p(tokens[i + 1] | tokens[:i + 1]), whether tokens[i + 1] is the
    argmax), from one forward pass over all of them, right-padded (causal: padding changes nothing
    before it)."""
    tokens = np.zeros((len(sequences), PADDED), np.int32)
    for row, seq in enumerate(sequences):
        tokens[row, :len(seq)] = seq
    logits = np.asarray(_APPLY(params, jnp.asarray(tokens), cfg=cfg))
    out = []
    for row, seq in enumerate(sequences):
        n = len(seq) - 1
        logprobs = jax.nn.log_softmax(logits[row, :n])
        out.append((np.asarray(logprobs)[np.arange(n), seq[1:]],
                    logits[row, :n].argmax(-1) == np.asarray(seq[1:])))
    return out


_APPLY = jax.jit(lambda params, tokens, cfg: TransNormerLLM(cfg).apply({"params": params}, tokens)[0],
                 static_argnames="cfg")


def _perplexity_cli(*args):
    from absl import flags

    if "split" not in flags.FLAGS:
        perplexity._define_flags()
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["perplexity", *args])
    perplexity.main([])


@pytest.mark.parametrize("reuse_context", [True, False])
def test_loglikelihood_equals_one_forward_pass(model, reuse_context):
    full, params, cfg, lm = model
    lm.reuse_context = reuse_context
    rng = np.random.default_rng(1)
    # Contexts and continuations of different lengths in one batch, two contexts shared by
    # several choices, an empty context (the prefix token then), a batch filled up at the end.
    pairs = [("def f(x):", " return"), ("def f(x):", " x"), ("", "import os"),
             ("x = 1\ny", " = 2\n"), ("x = 1\ny", "z")]
    pairs += [("".join(rng.choice(list("abc ()\n"), 2 + 3 * i)) + "x", " q" * (i + 1))
              for i in range(3)]
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)],
                           disable_tqdm=True)
    tok = lm.tokenizer_
    encoded = [(tok.encode(ctx) or [tok.eos_id], tok.encode(cont)) for ctx, cont in pairs]
    reference = _forward_pass(params, cfg, [c + x for c, x in encoded])
    for (_, cont), (logprobs, argmax), (logprob, greedy) in zip(encoded, reference, got):
        assert logprob == pytest.approx(float(logprobs[-len(cont):].sum()), abs=1e-5 * len(cont))
        assert greedy == bool(argmax[-len(cont):].all())
    lm.reuse_context = None


def test_carried_state_equals_one_forward_pass(model):
    _, params, cfg, _ = model
    rng = np.random.default_rng(2)
    streams = [rng.integers(0, cfg.vocab_size, n).astype(np.int32) for n in (61, 17, 2)]
    got = stream_logprobs(params, cfg, streams, context=16, batch_size=2)
    for g, (want, _) in zip(got, _forward_pass(params, cfg, streams)):
        np.testing.assert_allclose(g, want, atol=2e-5)


def test_loglikelihood_rolling_equals_perplexity_cli_total(model, tmp_path):
    full, params, cfg, lm = model
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "ppl.json"
    # Windows of 16 tokens: the first text spans several, carrying the state.
    _perplexity_cli(f"--checkpoint={lm.checkpoint_path}", f"--data={path}", "--split=documents",
                    "--context=16", f"--out={out}")
    result = json.loads(out.read_text())
    lm._max_length = 16
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i)
                                        for i, t in enumerate(TEXTS)], disable_tqdm=True)
    assert result["total_nats"] == pytest.approx(-sum(rolling), rel=1e-6)
    tok = lm.tokenizer_
    for text, value in zip(TEXTS, rolling):  # the whole text is context: one forward pass
        [(want, _)] = _forward_pass(params, cfg, [[tok.eos_id] + tok.encode(text)])
        assert value == pytest.approx(float(want.sum()), abs=1e-4)
    n_bytes = sum(len(t.encode()) for t in TEXTS)
    assert result["tokens"] == sum(len(tok.encode(t)) for t in TEXTS)
    assert result["bits_per_byte"] == pytest.approx(-sum(rolling) / n_bytes / math.log(2))
    assert result["perplexity"] == pytest.approx(math.exp(-sum(rolling) / result["tokens"]))


def test_perplexity_cli_reproduces_training_validation_loss(run, tmp_path):
    workdir, result = run
    out = tmp_path / "val.json"
    # Training evaluated eval_batches x batch_size = 8 windows spread over the validation split.
    _perplexity_cli(f"--checkpoint={workdir}", "--windows=8", f"--out={out}")
    got = json.loads(out.read_text())
    assert got["windows"] == 8 and got["split"] == "val"
    assert got["loss_per_token"] == pytest.approx(result.val_loss, abs=1e-4)
    assert got["nats_per_byte"] == pytest.approx(result.val_nats_per_byte, abs=1e-4)


def test_generate_until_stops_at_stop_sequences_and_equals_greedy_generate(model):
    full, params, cfg, lm = model
    prompts = ["x = 1\nprint(x", "def f"]
    tok = lm.tokenizer_
    # Three prompts: the model's batch size, so both run one compiled program.
    greedy = [c.text for c in complete(params, cfg, tok, prompts + ["y"], max_new_tokens=12,
                                       sampler=Greedy(), add_bos=False, batch_size=3)]
    stops = [greedy[0][2:4], "\x00never"]  # one stop inside the first greedy text
    assert greedy[0].index(stops[0]) > 0  # so the cut text is not empty
    got = lm.generate_until([Instance("generate_until", {}, (p, dict(until=s, max_gen_toks=12)), i)
                             for i, (p, s) in enumerate(zip(prompts, stops))], disable_tqdm=True)
    assert got == [greedy[0][:greedy[0].index(stops[0])], greedy[1]]
    assert lm.generate_until([Instance("generate_until", {}, (prompts[1], dict(
        max_gen_toks=12, do_sample=False)), 0)], disable_tqdm=True) == [greedy[1]]


def test_generate_until_keeps_request_order_max_gen_toks_and_the_models_eos(model, monkeypatch):
    full, params, cfg, lm = model
    tok = lm.tokenizer_
    prompts = ["y", "def f", "x = 1\nprint(x"]  # shortest first: batched longest first
    # Greedy continuations that no EOS stops, from one batch in request order.
    ref = [c.tokens for c in complete_ids(params, cfg, tok, [tok.encode(p) for p in prompts],
                                          max_new_tokens=12, eos_id=None, batch_size=3)]
    # An end-of-text id of the model's own choosing: a token some row generates after others.
    row, j = next((r, j) for r in range(3) for j in range(1, 4) if ref[r][j] not in ref[r][:j])
    eot = ref[row][j]
    monkeypatch.setattr(TnllmLM, "eot_token_id", property(lambda self: eot))
    got = lm.generate_until([Instance("generate_until", {}, (p, dict(until=["\x00never"],
                                                                     max_gen_toks=4)), i)
                             for i, p in enumerate(prompts)], disable_tqdm=True)
    want = []
    for ids in ref:
        ids = ids[:4]  # max_gen_toks
        want.append(tok.decode(ids[:ids.index(eot)] if eot in ids else ids))
    assert got == want and got[row] == tok.decode(ref[row][:j])


def test_multiple_choice_task_end_to_end_through_lm_eval(model, tmp_path, monkeypatch):
    full, params, cfg, lm = model
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rng = np.random.default_rng(3)
    docs = [dict(question=f"def f{i}(x):\n    return x *", choices=[f"{rng.integers(9)}", "y", f"{i} + 1",
                                                                  ")"],
                 answer=int(rng.integers(4))) for i in range(6)]
    data_file = tmp_path / "choice.jsonl"
    data_file.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tiny_choice.yaml").write_text(
        "task: tiny_choice\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data_file}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n")
    out = tmp_path / "results"
    from tnllm.eval import harness

    harness.cli(["--model", "tnllm", "--model_args", f"checkpoint={lm.checkpoint_path},batch_size=4",
                 "--tasks", "tiny_choice", "--include_path", str(tmp_path),
                 "--output_path", str(out)])
    [path] = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f.startswith("results")]
    reported = json.load(open(path))["results"]["tiny_choice"]["acc,none"]
    tok = lm.tokenizer_
    # The harness's requests: context = the question, continuation = " " + a choice.
    conts = [tok.encode(" " + c) for d in docs for c in d["choices"]]
    reference = _forward_pass(params, cfg, [tok.encode(d["question"]) + cont for d, cont in
                                            zip(np.repeat(docs, 4), conts)])
    scores = np.array([lp[-len(c):].sum() for (lp, _), c in zip(reference, conts)]).reshape(-1, 4)
    correct = sum(int(np.argmax(s) == d["answer"]) for s, d in zip(scores, docs))
    assert reported == pytest.approx(correct / len(docs))


@pytest.mark.parametrize("mixer", ["cosformer", "softmax"])
def test_other_mixers_loglikelihood_equals_one_forward_pass(mixer):
    """cosFormer reuses each context's prefill (its state carries the context); the softmax
    baseline recomputes every context and refuses to carry a state it does not have."""
    cfg = config.ModelConfig(vocab_size=259, d_model=32, num_layers=1, num_heads=2, glu_dim=64,
                             token_mixer=mixer, max_cache_len=64, attention_impl="reference")
    params = nn.unbox(TransNormerLLM(cfg).init(jax.random.key(0),
                                               jnp.zeros((1, 1), jnp.int32))["params"])
    pairs = [([1, 2, 3, 4, 5], [6, 7]), ([9], [10, 11, 12]), ([1, 2, 3, 4, 5], [8])]
    got = continuation_logprobs(params, cfg, pairs, batch_size=2)
    for (ctx, cont), (logprob, _), (want, _) in zip(pairs, got, _forward_pass(
            params, cfg, [c + x for c, x in pairs])):
        assert logprob == pytest.approx(float(want[-len(cont):].sum()), abs=1e-5)
    if mixer == "softmax":
        with pytest.raises(ValueError, match="softmax baseline carries no state"):
            stream_logprobs(params, cfg, [np.arange(40, dtype=np.int32)], context=16)
        with pytest.raises(ValueError, match="reuse_context"):
            continuation_logprobs(params, cfg, pairs, reuse_context=True)


def test_bad_input_is_one_sentence(run, tmp_path):
    workdir, _ = run
    for args, message in [(["--checkpoint=" + str(tmp_path)], "neither an export"),
                          ([f"--checkpoint={workdir}", "--split=documents", "--nocarry_state"],
                           "drop --nocarry_state"),
                          ([f"--checkpoint={workdir}", "--context=0"], "--context must be")]:
        with pytest.raises(SystemExit) as exit_:
            _perplexity_cli(*args)
        assert str(exit_.value).startswith("error: ") and message in str(exit_.value)
    with pytest.raises(ValueError, match="needs a checkpoint"):
        TnllmLM.create_from_arg_string("batch_size=2")
    with pytest.raises(ValueError, match="no argument 'checkpont'"):
        TnllmLM.create_from_arg_string(f"checkpont={workdir}")
    with pytest.raises(ValueError, match="The tnllm model argument batch_size must be a positive "
                                         "integer, got 'auto'; set it to 1 or more"):
        TnllmLM.create_from_arg_string(f"checkpoint={workdir}", {"batch_size": "auto"})
