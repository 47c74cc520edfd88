"""Token store and windows: file discovery, tokenize-once caching, splits, deterministic batches."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import subprocess_env
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
    warnings = [line for line in capsys.readouterr().err.splitlines() if "not UTF-8" in line]
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


# Documents of every kind the readers must keep apart: unicode, newlines, an empty record, a long one.
_RECORDS = ["first document", "", "caf\u00e9 \u4e2d\u6587 \U0001f600", "line one\nline two\n",
            "x" * 100, "last"]


def _write_jsonl(path, records, field="text", opener=open):
    with opener(path, "wb") as f:
        f.write(b"".join(json.dumps({field: r, "id": i}).encode() + b"\n" for i, r in enumerate(records)))


def _write_every_format(root, records, field):
    """The same records as .jsonl, .jsonl.gz, .jsonl.zst (two frames), parquet (two row groups)
    and a saved `datasets` directory; returns their paths."""
    import gzip

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    root.mkdir()
    paths = {s: root / f"corpus{s}" for s in (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")}
    _write_jsonl(paths[".jsonl"], records, field)
    _write_jsonl(paths[".jsonl.gz"], records, field, gzip.open)
    lines = paths[".jsonl"].read_bytes().splitlines(keepends=True)
    half = len(lines) // 2
    paths[".jsonl.zst"].write_bytes(b"".join(zstandard.ZstdCompressor().compress(b"".join(part))
                                              for part in (lines[:half], lines[half:])))
    pq.write_table(pa.table({"id": list(range(len(records))), field: records}), paths[".parquet"],
                   row_group_size=half)
    paths["datasets"] = root / "saved"
    datasets.Dataset.from_dict({field: records}).save_to_disk(str(paths["datasets"]))
    return paths


def _tokens(store):
    return {s: store.splits[s].read().result() for s in data.SPLITS}


def test_every_format_gives_the_tokens_of_the_same_jsonl(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_BLOCK_BYTES", 40)  # blocks end inside every source
    paths = _write_every_format(tmp_path / "corpus", _RECORDS, "content")
    tok = ByteTokenizer()
    # One worker: the blocks are what this test is about; the workers have their own test.
    want = data.TokenStore(_data_cfg(tmp_path, paths[".jsonl"], text_field="content", num_workers=1),
                           tok)
    assert want.meta["documents"] == len(_RECORDS) - 1 and want.meta["skipped_records"]["empty"] == 1
    for name, path in paths.items():
        store = data.TokenStore(_data_cfg(tmp_path, path, text_field="content", num_workers=1,
                                          cache_dir=str(tmp_path / name)), tok)
        for split, tokens in _tokens(want).items():
            np.testing.assert_array_equal(_tokens(store)[split], tokens, err_msg=name)
        assert store.meta["splits"] == want.meta["splits"], name
        read = [block.disk_bytes for block in data._blocks(str(path), "content")]  # the progress bar's
        assert len(read) > 1 and min(read) >= 0 and sum(read) == data._source_size(str(path)), name
    assert sorted(data.find_files(str(tmp_path / "corpus"))) == sorted(str(p) for p in paths.values())


def test_one_and_two_workers_build_identical_stores(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_BLOCK_BYTES", 300)  # many blocks, so both workers get some
    root = tmp_path / "corpus"
    root.mkdir()
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "\u00e9t\u00e9", "\u4e2d"]
    docs = [" ".join(rng.choice(words, rng.integers(0, 60))) for _ in range(120)]
    _write_jsonl(root / "a.jsonl", docs[:80])
    for i, doc in enumerate(docs[80:]):
        (root / f"b{i:02d}.txt").write_text(doc)
    (root / "c.txt").write_bytes(b"\xff\xfe binary")
    stores = {n: data.TokenStore(_data_cfg(tmp_path, root, num_workers=n, val_fraction=0.1,
                                           cache_dir=str(tmp_path / f"cache{n}")), ByteTokenizer())
              for n in (1, 2)}
    for split in data.SPLITS:
        np.testing.assert_array_equal(_tokens(stores[1])[split], _tokens(stores[2])[split])
    assert stores[1].meta == stores[2].meta and stores[1].meta["skipped_files"] == 1
    assert stores[1].key == stores[2].key  # the worker count is no part of what is stored
    with pytest.raises(ValueError, match=r"config.data.num_workers must be 0 \(one per core\) or a "
                                         r"positive integer, got -1"):
        data.TokenStore(_data_cfg(tmp_path, root, num_workers=-1, cache_dir=str(tmp_path / "c")),
                        ByteTokenizer())


def test_skipped_records_get_one_warning_each_kind(tmp_path, capsys):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"text": "ok, a document longer than sixteen bytes"}\n{"text": "caf\xe9"}\n'
                     b'{"text": ""}\n{"text": "\xff"}\n{"text": ""}\n')
    store = data.TokenStore(_data_cfg(tmp_path, path, val_fraction=0.5), ByteTokenizer())
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert len(warnings) == 3, warnings
    assert "skipped 2 records that are not UTF-8 (first " in warnings[0] and "c.jsonl:2" in warnings[0]
    assert "skipped 2 empty records" in warnings[1]
    assert "cut 1 documents longer than config.data.seq_len (16 tokens)" in warnings[2]
    assert store.meta["documents"] == 1


def test_unreadable_sources_are_one_sentence(tmp_path, monkeypatch):
    paths = _write_every_format(tmp_path / "corpus", _RECORDS, "text")
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match=r"corpus.parquet has no column 'body' \(it has id, text\); "
                                         r"set config.data.text_field"):
        data.TokenStore(_data_cfg(tmp_path, paths[".parquet"], text_field="body"), tok)
    with pytest.raises(ValueError, match=r"saved has no column 'body' \(it has text\)"):
        data.TokenStore(_data_cfg(tmp_path, paths["datasets"], text_field="body"), tok)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(paths[".jsonl.gz"].read_bytes()[:-12])
    with pytest.raises(ValueError, match=r"cut.jsonl.gz is damaged .*download or compress it again"):
        data.TokenStore(_data_cfg(tmp_path, cut), tok)
    import datasets

    datasets.DatasetDict(train=datasets.Dataset.from_dict({"text": ["a"]})).save_to_disk(
        str(tmp_path / "dict"))
    with pytest.raises(ValueError, match=r"is a DatasetDict with splits train; point it at one split"):
        data.find_files(str(tmp_path / "dict"))
    monkeypatch.setitem(sys.modules, "zstandard", None)  # as if the data extra were not installed
    with pytest.raises(ValueError, match=r"^Reading .*corpus.jsonl.zst \(a .zst file\) needs the "
                                         r"zstandard package; install tnllm's data extra"):
        data.TokenStore(_data_cfg(tmp_path, paths[".jsonl.zst"]), tok)


class _FailingTokenizer(ByteTokenizer):
    def encode_batch(self, texts):
        raise KeyboardInterrupt  # as Ctrl-C in the middle of tokenization


def test_an_interrupted_build_leaves_no_store_and_the_next_builds_it(tmp_path):
    root, _ = _corpus(tmp_path)
    cfg = _data_cfg(tmp_path, root)
    with pytest.raises(KeyboardInterrupt):
        data.TokenStore(cfg, _FailingTokenizer())
    assert not [d for d in os.listdir(tmp_path / "cache") if d.startswith("tokens-")]
    key = data.store_key(data.find_files(str(root)), cfg, ByteTokenizer())
    killed = tmp_path / "cache" / f"tokens-{key}.tmp-dead"  # what a SIGKILLed build leaves
    (killed / "train").mkdir(parents=True)
    store = data.TokenStore(cfg, ByteTokenizer())
    assert store.built and not killed.exists()


def test_a_second_process_waits_for_the_store_instead_of_building_it(tmp_path):
    root, _ = _corpus(tmp_path)
    cfg = _data_cfg(tmp_path, root)
    files = data.find_files(str(root))
    directory = os.path.join(cfg.cache_dir, f"tokens-{data.store_key(files, cfg, ByteTokenizer())}")
    os.makedirs(cfg.cache_dir)
    script = ("import json, sys; from ml_collections import ConfigDict; from tnllm import data; "
              "from tnllm.tokenizer import ByteTokenizer; "
              "s = data.TokenStore(ConfigDict(json.loads(sys.argv[1])), ByteTokenizer()); "
              "print('built' if s.built else 'waited', s.meta['documents'])")
    with data._build_lock(directory) as exclusive:
        assert exclusive
        other = subprocess.Popen([sys.executable, "-c", script, json.dumps(cfg.to_dict())],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=subprocess_env())
        err = ""
        while "Waiting for another process" not in err:
            line = other.stderr.readline()
            assert line or other.poll() is None, err
            err += line
        data._build_store(files, cfg, ByteTokenizer(), directory)  # the first process's build
    out, err = other.communicate(timeout=120)
    assert other.returncode == 0, err
    assert out.split() == ["waited", "8"]


def test_a_host_reads_only_its_rows_of_each_batch(tmp_path):
    root, _ = _corpus(tmp_path, n=40)
    store = data.TokenStore(_data_cfg(tmp_path, root), ByteTokenizer())
    whole, mine = (data.Loader(store, SEQ, batch_size=8, seed=3) for _ in range(2))
    for _ in range(3):
        np.testing.assert_array_equal(mine.next_rows(range(2, 5)), next(whole)[2:5])
    assert mine.state() == whole.state()
