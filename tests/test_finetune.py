"""Fine-tuning: starting from an export (train.init_from), instruction data with loss masks."""
import json
import os
import signal
import string

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from conftest import REPO
from tokenizers import models, pre_tokenizers
from test_train import _cfg  # the small training config of the training tests

from tnllm import checkpoint, config, generate, instruct, metrics, train_lib
from tnllm.model import TransNormerLLM
from tnllm.tokenizer import ByteTokenizer, load_tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i in range(8):
        (root / f"m{i}.txt").write_text("".join(f"x{i} = {j} * y\n" for j in range(20)))
    return root


def _flat(tree):
    return np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(tree)])


# ------------------------------------------------------------------ instruction data and loss masks

# The task: three lower-case letters -> the same letters in upper case (a short transformation of
# the prompt that the tiny model learns in a few hundred steps and cannot guess before).
TEMPLATE = {"system": "{content}\n", "user": "{content}=", "assistant": "{content}"}


def _task(rng, n):
    words = ["".join(rng.choice(list(string.ascii_lowercase), 3)) for _ in range(n)]
    return [{"prompt": w, "response": w.upper()} for w in words]


def _write(path, records, extra=()):
    with open(path, "w") as f:
        for r in list(records) + list(extra):
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def test_records_render_with_targets_only_on_the_response():
    tok = ByteTokenizer()
    tokens, targets = instruct.encode([("user", "ab"), ("assistant", "CD")], TEMPLATE, tok)
    assert tok.decode(tokens.tolist()) == "ab=CD"
    assert tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id
    np.testing.assert_array_equal(targets, [0, 0, 0, 0, 1, 1, 1])  # BOS a b = | C D EOS
    turns, _ = instruct.parse_record({"messages": [{"role": "system", "content": "s"},
                                                   {"role": "user", "content": "q"},
                                                   {"role": "assistant", "content": "r"}]})
    tokens, targets = instruct.encode(turns, instruct.TEMPLATES["chatml"], tok)
    text = tok.decode(tokens.tolist())
    assert text.endswith("<|im_start|>assistant\nr<|im_end|>\n")
    assert tok.decode(tokens[targets].tolist()) == "r<|im_end|>\n"


def test_bad_records_get_one_warning_that_counts_them(tmp_path):
    good = _task(np.random.default_rng(0), 3)
    path = _write(tmp_path / "d.jsonl", good, ['{"prompt": "x"}', "not json", '{"prompt": "x"}',
                                               json.dumps({"prompt": "y" * 40, "response": "z"})])
    with pytest.warns(UserWarning) as caught:
        encoder = lambda turns: instruct.encode(turns, TEMPLATE, ByteTokenizer())  # noqa: E731
        docs = instruct.read_documents(path, encoder, window=17)
    assert len(caught) == 1 and len(docs) == 3
    message = str(caught[0].message)
    assert "4 record(s) skipped" in message
    assert "2 with a missing prompt or response (first on line 4)" in message
    assert "not valid JSON" in message and "no response token within the window" in message


def test_packing_keeps_documents_whole_and_is_a_function_of_seed_and_step():
    assert instruct.pack([5, 5, 3, 8, 2], range(5), 10) == [[0, 1], [2], [3, 4]]
    tok = ByteTokenizer()
    docs = [instruct.encode([("user", r["prompt"]), ("assistant", r["response"])], TEMPLATE, tok)
            for r in _task(np.random.default_rng(1), 40)]
    batches = instruct.Batches(docs, seq_len=20, pad_id=tok.pad_id)
    a = batches.batch(seed=3, n=7, size=4)
    b = instruct.Batches(docs, seq_len=20, pad_id=tok.pad_id).batch(seed=3, n=7, size=4)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    tokens, weights, segment_ids = a
    assert tokens.shape == (4, 21) and weights.shape == segment_ids.shape == (4, 20)
    # Every window holds whole documents: as many BOS as EOS, and a target count of 4 per record.
    for row in range(4):
        assert np.sum(tokens[row] == tok.bos_id) == np.sum(tokens[row] == tok.eos_id)
        assert weights[row].sum() == 4 * np.sum(tokens[row] == tok.bos_id)
    assert 0 < batches.waste() < 0.5


def _tiny_model():
    cfg = config.model_config(config.load(os.path.join(REPO, "configs", "tiny.py"))).replace(
        num_layers=1, chunk_size=8)
    model = TransNormerLLM(cfg)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
    return model, params


def test_loss_mask_excludes_prompt_tokens_and_packed_losses_equal_each_document_alone():
    tok = ByteTokenizer()
    docs = [instruct.encode([("user", r["prompt"]), ("assistant", r["response"])], TEMPLATE, tok)
            for r in _task(np.random.default_rng(2), 3)]
    tokens, weights, segment_ids = instruct.Batches(docs, 30, tok.pad_id).arrays([[0, 1, 2]])
    model, params = _tiny_model()
    inputs, labels = jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:])

    def loss(labels, weights=weights):
        return float(train_lib._run_loss(model, params, inputs, labels, jnp.asarray(weights), None,
                                         None, jnp.asarray(segment_ids))[1])

    base = loss(labels)
    prompt_at = np.flatnonzero(weights[0] == 0)[:12]
    assert loss(labels.at[0, prompt_at].set(ord("Q"))) == base  # prompt targets changed: same loss
    target_at = np.flatnonzero(weights[0])[0]
    assert loss(labels.at[0, target_at].set(ord("Q"))) != base
    # Each document's loss within the packed window equals its loss run alone.
    start = 0
    for doc_tokens, doc_targets in docs:
        n = len(doc_tokens)
        alone = train_lib.weighted_loss(model, params, jnp.asarray(doc_tokens[None]),
                                        jnp.asarray(doc_targets[None, 1:], jnp.float32))
        only = np.zeros_like(weights)
        only[0, start:start + n - 1] = weights[0, start:start + n - 1]
        assert abs(loss(labels, only) - float(alone)) <= 1e-5 * abs(float(alone))
        start += n
    # Run in segments of 8 positions, the state carried across them, the loss is the same.
    segmented = TransNormerLLM(model.cfg.replace(train_segment=8))
    by_segments = train_lib.weighted_loss(segmented, params, jnp.asarray(tokens), jnp.asarray(weights),
                                          jnp.asarray(segment_ids))
    assert abs(float(by_segments) - base) <= 1e-5 * base


def _exact_match(params, model_cfg, records):
    tok = ByteTokenizer()
    # BOS and the rendered prompt, without the EOS that closes a record.
    prompts = [instruct.encode([("user", r["prompt"])], TEMPLATE, tok)[0][:-1].tolist() for r in records]
    out = generate.generate(params, model_cfg, prompts, max_new_tokens=5, eos_id=tok.eos_id,
                            pad_id=tok.pad_id)
    answers = [tok.decode(out.tokens[i, :int(out.lengths[i])].tolist()) for i in range(len(records))]
    hits = [a == r["response"] and out.tokens[i, int(out.lengths[i]) - 1] == tok.eos_id
            for i, (a, r) in enumerate(zip(answers, records))]
    return float(np.mean(hits))


def _model_cfg(cfg, **train):
    """The tiny model of the end-to-end test (2 layers of width 64, the CPU's form)."""
    cfg.model.update(d_model=64, num_layers=2, glu_dim=128, attention_impl="auto")
    cfg.train.update(**train)
    return cfg


@pytest.fixture(scope="module")
def export(corpus, tmp_path_factory):
    """The tiny model pretrained briefly on the text corpus, exported."""
    root = tmp_path_factory.mktemp("pretrain")
    pretrain = _model_cfg(_cfg(corpus, steps=20, eval_every=20))
    pretrain.optim.update(lr=3e-3, warmup_steps=5)
    train_lib.train(pretrain, str(root / "run"))
    return checkpoint.export_workdir(str(root / "run"), str(root / "export"))


def _instruct_cfg(corpus, tmp_path, records, **train):
    template = tmp_path / "template.json"
    template.write_text(json.dumps(TEMPLATE))
    cfg = _model_cfg(_cfg(corpus), **train)
    cfg.data.update(path=_write(tmp_path / "task.jsonl", records), template=str(template),
                    packing="documents", seq_len=32, val_fraction=0.05)
    cfg.checkpoint.update(every=cfg.train.steps)
    return cfg


@pytest.mark.slow
def test_pretrain_export_then_finetune_learns_the_task_on_held_out_prompts(corpus, export, tmp_path):
    rng = np.random.default_rng(0)
    records = _task(rng, 1200)
    held_out = [r for r in _task(rng, 400) if r not in records][:100]
    cfg, params = checkpoint.load_model(export)
    model_cfg = config.model_config(cfg)
    before = _exact_match(params, model_cfg, held_out)
    tune = _instruct_cfg(corpus, tmp_path, records, init_from=export, steps=400, eval_every=400,
                         batch_size=16, log_every=50)
    tune.optim.update(lr=3e-3, warmup_steps=20)
    result = train_lib.train(tune, str(tmp_path / "finetune"))
    assert result.step == 400
    _, tuned = checkpoint.load_model(str(tmp_path / "finetune"))
    after = _exact_match(tuned, model_cfg, held_out)
    assert before < 0.1 and after >= 0.9, (before, after)


@pytest.mark.slow
def test_init_from_loads_parameters_only_and_a_stopped_run_resumes_from_its_own_checkpoint(
        corpus, export, tmp_path, monkeypatch):
    """Fresh optimizer and schedule on the export's parameters; a run stopped by SIGTERM resumes
    from its own checkpoint with the losses of an uninterrupted run (packed windows are a pure
    function of (seed, step))."""
    cfg = _instruct_cfg(corpus, tmp_path, _task(np.random.default_rng(3), 200), init_from=export,
                        steps=5, eval_every=5)
    _, exported = checkpoint.load_model(export)
    setup = train_lib._Setup(cfg, str(tmp_path / "whole"))
    try:
        assert setup.resumed_from is None and int(setup.state.step) == 0  # a fresh schedule
        np.testing.assert_array_equal(_flat(setup.state.params), _flat(exported))
        assert not np.any(_flat(setup.state.opt_state))  # fresh AdamW moments (and counts)
    finally:
        setup.checkpoints.close()
    train_lib.train(cfg, str(tmp_path / "whole"))
    real_next = instruct.Loader.next_rows

    def next_then_sigterm(loader, rows):
        if loader.next_batch == 2:
            signal.raise_signal(signal.SIGTERM)
        return real_next(loader, rows)

    monkeypatch.setattr(instruct.Loader, "next_rows", next_then_sigterm)
    assert train_lib.train(cfg, str(tmp_path / "resumed")).step == 3
    monkeypatch.setattr(instruct.Loader, "next_rows", real_next)
    assert train_lib.train(cfg, str(tmp_path / "resumed")).step == 5

    def losses(workdir):
        return {r["step"]: r["loss"] for r in metrics.read_metrics(str(workdir)) if "loss" in r}

    assert losses(tmp_path / "resumed") == losses(tmp_path / "whole")


def test_init_from_with_other_shapes_or_no_export_is_one_sentence(corpus, export, tmp_path):
    wider = _model_cfg(_cfg(corpus, init_from=export))
    wider.model.update(d_model=128)
    with pytest.raises(ValueError, match=r"config.train.init_from.*of shape .* set config.model"):
        train_lib._Setup(wider, str(tmp_path / "a"))
    with pytest.raises(FileNotFoundError, match=r"config.train.init_from = .* is not an export"):
        train_lib._Setup(_cfg(corpus, init_from=str(tmp_path)), str(tmp_path / "b"))


def test_the_example_config_is_a_valid_fine_tuning_config():
    cfg = config.load(os.path.join(REPO, "configs", "finetune_385m.py"))
    config.check(cfg)
    assert cfg.data.packing == "documents" and cfg.train.init_from
    instruct.load_template(cfg.data.template)
    cfg.data.update(packing="concat")
    with pytest.raises(ValueError, match="set config.data.packing = 'documents' with config.data.template"):
        config.check(cfg)


def test_plain_text_documents_pack_whole_and_train(corpus, tmp_path):
    """data.packing = "documents" without a template: every token of a text is a target, long texts
    are cut into window-sized documents, and training runs on the packed windows."""
    short = tmp_path / "texts"
    short.mkdir()
    for i in range(10):
        (short / f"t{i}.txt").write_text("a" * (i + 1))
    (short / "long.txt").write_text("z" * 50)
    cfg = _cfg(corpus, steps=3)
    cfg.data.update(path=str(short), packing="documents", seq_len=16)
    docs = instruct.text_documents(cfg.data, ByteTokenizer(), window=17)
    # BOS + text + EOS: the short texts whole, the long one (52 tokens) in pieces that overlap by
    # one token, each piece's first token only context: 17 + 17 + 17 + 4.
    want = [i + 3 for i in range(10)] + [17, 17, 17, 4]
    assert sorted(len(t) for t, _ in docs) == sorted(want)
    assert sum(m.sum() for _, m in docs) == sum(len(t) - 1 for t, _ in docs) == sum(w - 1 for w in want)
    assert all(len(t) <= 17 and not m[0] and m[1:].all() for t, m in docs)
    result = train_lib.train(cfg, str(tmp_path / "run"))
    assert result.step == 3 and np.isfinite(result.val_loss)


def test_the_tokenizer_s_chat_template_renders_records_with_targets_on_the_answers(tmp_path):
    """config.data.template = "tokenizer": the chat_template of a Hugging Face tokenizer_config.json."""
    words = ["[UNK]", "the", "fox", "dog", "lazy", "user", "assistant", "<s>", "</s>", "<|im_start|>",
             "<|im_end|>"]
    tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(words[7:])
    tok.save(str(tmp_path / "tokenizer.json"))
    chat = ("{{ bos_token }}{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} "
            "<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": chat}))
    data_cfg = config.base_config().data
    data_cfg.update(tokenizer=str(tmp_path / "tokenizer.json"), template="tokenizer")
    hf = load_tokenizer(data_cfg.tokenizer)
    encoder = instruct.make_encoder(data_cfg, hf)
    tokens, targets = encoder([("user", "the fox"), ("assistant", "lazy dog"), ("user", "fox"),
                               ("assistant", "the")])
    spelled = [words[i] for i in tokens]
    assert spelled[:3] == ["<s>", "<|im_start|>", "user"]
    assert [w for w, t in zip(spelled, targets) if t] == ["lazy", "dog", "<|im_end|>", "the", "<|im_end|>"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ValueError, match="needs a chat_template in"):
        instruct.make_encoder(data_cfg, hf)
