"""Token store and windows: file discovery, tokenize-once caching, splits, deterministic batches."""
import json
import os

import numpy as np
import pytest

from tnllm import config, data
from tnllm.tokenizer import ByteTokenizer

SEQ = 16


def _data_cfg(tmp_path, path, **changes):
    cfg = config.base_config().data
    cfg.update(path=str(path), cache_dir=str(tmp_path / "cache"), val_fraction=0.25, seq_len=SEQ)
    cfg.update(**changes)
    return cfg


def _corpus(tmp_path, n=8):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    texts = [f"document {i}: " + "abcdefgh"[i % 8] * (40 + i) for i in range(n)]
    for i, text in enumerate(texts):
        (root / ("sub" if i % 2 else "") / f"d{i:02d}.txt").write_text(text)
    (root / "notes.md").write_text("not data")
    return root, texts


class _NoEncoding(ByteTokenizer):
    def encode_batch(self, texts):
        raise AssertionError("the corpus was tokenized again")


def test_find_files_file_directory_glob_and_missing(tmp_path):
    root, _ = _corpus(tmp_path)
    found = data.find_files(str(root))
    assert [os.path.basename(f) for f in found] == [f"d{i:02d}.txt" for i in (0, 2, 4, 6, 1, 3, 5, 7)]
    assert data.find_files(str(root / "d00.txt")) == [str(root / "d00.txt")]
    assert len(data.find_files(str(root / "**" / "*.txt"))) == 8
    with pytest.raises(FileNotFoundError, match="config.data.path"):
        data.find_files(str(tmp_path / "nothing*"))


def test_stdlib_corpus_is_sorted_python_sources():
    files = data.stdlib_files()
    assert len(files) > 100 and files == sorted(files)
    assert all(f.endswith(".py") and "site-packages" not in f for f in files)


def test_jsonl_records_and_missing_field(tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "id": 2}) + "\n")
    assert list(data.read_documents(str(good), "text")) == ["one", "two"]
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"b.jsonl:1 has no string field 'text'.*text_field"):
        list(data.read_documents(str(bad), "text"))


def test_documents_shorter_than_seq_len_are_split_whole_with_eos(tmp_path):
    root, _ = _corpus(tmp_path)
    cfg = _data_cfg(tmp_path, root, seq_len=64)  # longer than every document
    tok = ByteTokenizer()
    store = data.TokenStore(cfg, tok)
    assert store.built
    texts = [open(f).read() for f in data.find_files(str(root))]
    for split, want in (("train", False), ("val", True)):
        docs = [t for i, t in enumerate(texts) if data.is_validation(i, 0.25) == want]
        expected = np.concatenate([np.array(tok.encode(t) + [tok.eos_id]) for t in docs])
        np.testing.assert_array_equal(store.splits[split].read().result(), expected)
        assert store.meta["splits"][split]["pieces"] == len(docs)
    assert store.meta["splits"]["val"]["pieces"] == 2 and store.meta["documents"] == 8
    assert 0 < store.meta["unigram_entropy"] < np.log(tok.vocab_size)


@pytest.mark.parametrize("val_fraction,train,val", [
    # Pieces of 3 tokens: abc def ghi jkl m | xy. At f = 1/4 piece 3 (jkl) is held out; the text jumps
    # only around it, so abc def ghi stay joined, and EOS ends each document.
    (0.25, ["abcdefghi", "m", "xy"], ["jkl"]),
    # At f = 1/2 every second piece (def, jkl, xy) is held out.
    (0.5, ["abc", "ghi", "m"], ["def", "jkl", "xy"]),
])
def test_documents_are_cut_into_pieces_of_seq_len_before_the_split(tmp_path, val_fraction, train, val):
    (tmp_path / "a.txt").write_text("abcdefghijklm")
    (tmp_path / "b.txt").write_text("xy")
    tok = ByteTokenizer()
    store = data.TokenStore(_data_cfg(tmp_path, tmp_path / "*.txt", seq_len=3,
                                      val_fraction=val_fraction), tok)
    for split, parts in (("train", train), ("val", val)):
        expected = sum((tok.encode(p) + [tok.eos_id] for p in parts), [])
        np.testing.assert_array_equal(store.splits[split].read().result(), expected)
    assert sum(store.meta["splits"][s]["bytes"] for s in data.SPLITS) == 15


def test_one_file_corpus_has_a_validation_split(tmp_path):
    """One document: a twentieth of its windows, spread evenly, holds out at the default fraction."""
    text = "".join(f"line {i}: the quick brown fox\n" for i in range(200))
    (tmp_path / "big.txt").write_text(text)
    tok = ByteTokenizer()
    store = data.TokenStore(_data_cfg(tmp_path, tmp_path / "big.txt", val_fraction=0.05), tok)
    val = store.splits["val"].read().result()
    pieces = -(-len(text) // SEQ)
    assert store.meta["splits"]["val"]["pieces"] == pieces // 20
    assert len(val) == (SEQ + 1) * (pieces // 20)  # whole pieces, each ending in EOS
    assert data.Windows(store.splits["val"], SEQ, "val").num_windows >= 1
    train = store.splits["train"].read().result()
    assert (np.concatenate([train, val]) != tok.eos_id).sum() == len(text)  # every byte, once


def test_old_store_format_is_not_reused(tmp_path, monkeypatch):
    root, _ = _corpus(tmp_path)
    cfg = _data_cfg(tmp_path, root)
    monkeypatch.setattr(data, "STORE_VERSION", data.STORE_VERSION - 1)
    old = data.TokenStore(cfg, ByteTokenizer())
    monkeypatch.undo()
    new = data.TokenStore(cfg, ByteTokenizer())
    assert new.built and new.directory != old.directory


def test_second_run_reuses_the_store_and_changes_rebuild_it(tmp_path):
    root, _ = _corpus(tmp_path)
    cfg = _data_cfg(tmp_path, root)
    first = data.TokenStore(cfg, ByteTokenizer())
    again = data.TokenStore(cfg, _NoEncoding())
    assert not again.built and again.directory == first.directory
    np.testing.assert_array_equal(again.splits["train"].read().result(),
                                  first.splits["train"].read().result())
    (root / "d00.txt").write_text("changed text, a different length")
    assert data.TokenStore(cfg, ByteTokenizer()).built


def test_empty_data_is_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="hold no text"):
        data.TokenStore(_data_cfg(tmp_path, tmp_path / "empty.txt"), ByteTokenizer())
    assert not [d for d in os.listdir(tmp_path / "cache") if d.startswith("tokens-")]


def test_windows_are_a_pure_function_of_seed_and_index(tmp_path):
    root, _ = _corpus(tmp_path)
    store = data.TokenStore(_data_cfg(tmp_path, root), ByteTokenizer())
    tokens = store.splits["train"].read().result()
    windows = data.Windows(store.splits["train"], SEQ)
    n = windows.num_windows
    assert n == (len(tokens) - 1) // SEQ
    every = [tuple(tokens[w * SEQ:(w + 1) * SEQ + 1]) for w in range(n)]
    b = windows.batch(seed=3, index=5, batch_size=4)
    np.testing.assert_array_equal(b, data.Windows(store.splits["train"], SEQ).batch(3, 5, 4))
    assert not np.array_equal(b, windows.batch(seed=4, index=5, batch_size=4))
    assert all(tuple(row) in set(every) for row in b)  # contiguous windows at multiples of seq_len
    epoch = [tuple(windows.batch(0, i, 1)[0]) for i in range(n)]
    assert sorted(epoch) == sorted(every)  # one epoch visits each window once


def test_loader_position_round_trips(tmp_path):
    root, _ = _corpus(tmp_path)
    store = data.TokenStore(_data_cfg(tmp_path, root), ByteTokenizer())
    loader = data.Loader(store, SEQ, batch_size=2, seed=1)
    for _ in range(3):
        next(loader)
    saved = loader.state()
    expected = next(loader)
    resumed = data.Loader(store, SEQ, batch_size=2, seed=1)
    assert resumed.restore(saved) == []
    np.testing.assert_array_equal(next(resumed), expected)
    other = data.Loader(store, SEQ, batch_size=2, seed=2)
    assert any("seed" in w for w in other.restore(saved))


def test_too_small_split_is_refused(tmp_path):
    root, _ = _corpus(tmp_path)
    store = data.TokenStore(_data_cfg(tmp_path, root), ByteTokenizer())
    with pytest.raises(ValueError, match="val split .* seq_len"):
        data.Windows(store.splits["val"], 10_000, "val")


def test_files_that_are_not_utf8_text_are_skipped_with_one_warning(tmp_path, capsys):
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.txt").write_text("plain text, the only document")
    (root / "b.txt").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    (root / "c.txt").write_bytes("caf\u00e9 in latin-1".encode("latin-1"))
    (root / "d.txt").write_bytes("UTF-16 text".encode("utf-16"))  # valid UTF-8 bytes, but NULs
    tok = ByteTokenizer()
    store = data.TokenStore(_data_cfg(tmp_path, root, val_fraction=0.5), tok)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "skipped 3 of the 4 data files" in warnings[0]
    assert "b.txt" in warnings[0] and "config.data.path" in warnings[0]
    tokens = np.concatenate([store.splits[s].read().result() for s in data.SPLITS])
    assert bytes(int(t) for t in tokens if t < 256) == b"plain text, the only document"
    assert store.meta["skipped_files"] == 3
    with pytest.raises(data.NotText, match="b.txt is not UTF-8 text"):
        list(data.read_documents(str(root / "b.txt"), "text"))


def test_a_corpus_of_only_binary_files_is_refused(tmp_path):
    (tmp_path / "x.txt").write_bytes(b"\x00\x01\xff\xfe" * 100)
    with pytest.raises(ValueError, match=r"1 not UTF-8 text\) hold no text"):
        data.TokenStore(_data_cfg(tmp_path, tmp_path / "x.txt"), ByteTokenizer())


def test_jsonl_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "c.jsonl"
    bad.write_bytes(json.dumps({"text": "ok"}).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"c.jsonl:2 is not UTF-8 text"):
        list(data.read_documents(str(bad), "text"))
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + '{"text": "unterminated\n')
    with pytest.raises(ValueError, match=r"c.jsonl:2 is not a JSON object"):
        list(data.read_documents(str(bad), "text"))


def test_unwritable_cache_dir_names_the_field(tmp_path):
    root, _ = _corpus(tmp_path)
    (tmp_path / "a-file").write_text("")  # a cache_dir that is a file is as unwritable as any
    cfg = _data_cfg(tmp_path, root, cache_dir=str(tmp_path / "a-file" / "cache"))
    with pytest.raises(ValueError, match=r"^Cannot write the token store in .*a-file/cache' \(.*\); "
                                         r"set config.data.cache_dir"):
        data.TokenStore(cfg, ByteTokenizer())


def test_training_on_one_txt_file(tmp_path):
    """A one-file corpus trains: its validation split comes from pieces of the one document."""
    from tnllm import train_lib

    (tmp_path / "big.txt").write_text("".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(150)))
    cfg = config.load(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "tiny.py"))
    cfg.model.update(d_model=32, num_layers=1, glu_dim=64, attention_impl="reference")
    cfg.data.update(path=str(tmp_path / "big.txt"), cache_dir=str(tmp_path / "cache"), seq_len=SEQ)
    cfg.optim.update(warmup_steps=1)
    cfg.train.update(steps=3, batch_size=2, log_every=1, eval_every=3, eval_batches=2, sample_tokens=0)
    result = train_lib.train(cfg, str(tmp_path / "run"))
    assert result.step == 3 and np.isfinite(result.val_loss)


def test_damaged_tokenizer_files_are_named(tmp_path):
    import tokenizers
    from tokenizers import models

    from tnllm.tokenizer import load_tokenizer

    (tmp_path / "half.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"half.model' is not a SentencePiece model .*data.tokenizer"):
        load_tokenizer(str(tmp_path / "half.model"))
    (tmp_path / "half.json").write_text('{"version": "1.0", "model": {"type": "Wor')
    with pytest.raises(ValueError, match=r"half.json' is not a Hugging Face tokenizer.json .*data.tok"):
        load_tokenizer(str(tmp_path / "half.json"))
    tokenizers.Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1}, unk_token="[UNK]")).save(
        str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "</s>",\n "bos_token": }')
    with pytest.raises(ValueError, match=r"tokenizer_config.json is not valid JSON \(Expecting value "
                                         r"at line 2\)"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))
