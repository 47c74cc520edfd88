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


def test_store_holds_documents_split_by_document_with_eos(tmp_path):
    root, _ = _corpus(tmp_path)
    cfg = _data_cfg(tmp_path, root)
    tok = ByteTokenizer()
    store = data.TokenStore(cfg, tok)
    assert store.built
    texts = [open(f).read() for f in data.find_files(str(root))]
    for split, want in (("train", False), ("val", True)):
        docs = [t for i, t in enumerate(texts) if data.is_validation(i, 0.25) == want]
        expected = np.concatenate([np.array(tok.encode(t) + [tok.eos_id]) for t in docs])
        np.testing.assert_array_equal(store.splits[split].read().result(), expected)
        assert store.meta["splits"][split]["documents"] == len(docs)
    assert store.meta["splits"]["val"]["documents"] == 2
    assert 0 < store.meta["unigram_entropy"] < np.log(tok.vocab_size)


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
