"""Tokenization throughput: MB of corpus per second into a token store, for each worker count.

    python -m bench.tokenization                      # a 200 MB .jsonl corpus, 1 and 2 workers
    python -m bench.tokenization --mb=1000 --workers=1,4,8 --tokenizer=tokenizer.model
    python -m bench.tokenization --smoke              # 2 MB, small blocks: checks the script runs

The corpus: the Python standard library's sources as JSON lines of 2,000 characters, repeated to the
size asked for. The default tokenizer is a SentencePiece model (vocabulary up to 8000, as the
releases use) trained on the corpus's first 2 MB. Each worker count builds the store from scratch,
and the stores must agree bit for bit. (Named tokenization so that it cannot shadow `tokenize`.)
"""
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

from absl import app, flags

from bench import report
from tnllm import config, data
from tnllm.tokenizer import load_tokenizer

flags.DEFINE_integer("mb", 200, "Corpus size in MB (10^6 bytes).")
flags.DEFINE_list("workers", ["1", "2"], "Worker counts to time.")
flags.DEFINE_string("tokenizer", "", "'byte', a .model or tokenizer.json; '' = train SentencePiece.")
flags.DEFINE_string("out", "", "Directory for the corpus, tokenizer and stores (default: a temporary "
                               "one, removed at the end).")
flags.DEFINE_bool("smoke", False, "A 2 MB corpus in 64 kB blocks, the byte tokenizer.")
FLAGS = flags.FLAGS

_DOCUMENT_CHARS = 2000


def write_corpus(path: str, size: int) -> int:
    """Writes a .jsonl corpus of at least `size` bytes from the standard library's sources."""
    written = 0
    with open(path, "w", encoding="utf-8") as out:
        while written < size:
            for source in data.stdlib_files():
                try:
                    text = Path(source).read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    continue
                for start in range(0, len(text), _DOCUMENT_CHARS):
                    # json.dumps writes ASCII: as many bytes as characters.
                    written += out.write(json.dumps({"text": text[start:start + _DOCUMENT_CHARS]}) + "\n")
                if written >= size:
                    break
    return written


def train_sentencepiece(corpus: str, prefix: str) -> str:
    import sentencepiece

    sample = prefix + ".sample.txt"
    with open(corpus, encoding="utf-8") as f, open(sample, "w", encoding="utf-8") as out:
        while out.tell() < 2 << 20:
            out.write(json.loads(f.readline())["text"])
    sentencepiece.SentencePieceTrainer.train(
        input=sample, model_prefix=prefix, vocab_size=8000, hard_vocab_limit=False,
        model_type="unigram", max_sentence_length=1 << 16, minloglevel=2)
    return prefix + ".model"


def run(out: str) -> None:
    if FLAGS.smoke:
        data._BLOCK_BYTES = 1 << 16  # several blocks, so that two workers share the work
    corpus = os.path.join(out, "corpus.jsonl")
    size = write_corpus(corpus, (2 if FLAGS.smoke else FLAGS.mb) * 10**6)
    spec = FLAGS.tokenizer or ("byte" if FLAGS.smoke else train_sentencepiece(
        corpus, os.path.join(out, "sp")))
    tokenizer = load_tokenizer(spec)
    print(f"corpus: {size / 1e6:.0f} MB of JSON lines; tokenizer: {spec}; "
          f"{len(os.sched_getaffinity(0))} cores; load average {os.getloadavg()[0]:.1f}")
    results, first = [], None
    for workers in map(int, FLAGS.workers):
        cfg = config.base_config().data
        cfg.update(path=corpus, cache_dir=os.path.join(out, f"cache-{workers}"), num_workers=workers)
        start, cpu = time.perf_counter(), os.times()
        store = data.TokenStore(cfg, tokenizer)
        seconds, used = time.perf_counter() - start, [b - a for a, b in zip(cpu, os.times())]
        # CPU seconds of this process and of the workers (counted once they have exited): with
        # fewer free cores than processes, the wall time cannot fall however the work is split.
        main_cpu, worker_cpu = used[0] + used[1], used[2] + used[3]  # user + system
        tokens = {s: store.splits[s].read().result() for s in data.SPLITS}
        first = first or tokens
        assert all((tokens[s] == first[s]).all() for s in data.SPLITS), "stores differ"
        results.append(dict(workers=workers, seconds=round(seconds, 2), tokens=sum(map(len, tokens.values())),
                            mb_per_s=round(size / 1e6 / seconds, 2),
                            main_cpu_s=round(main_cpu, 1), worker_cpu_s=round(worker_cpu, 1)))
        print(f"{workers} worker(s): {seconds:.1f} s, {size / 1e6 / seconds:.2f} MB/s, "
              f"{results[-1]['tokens'] / seconds / 1e6:.2f} M tokens/s; CPU s: this process "
              f"{main_cpu:.1f}, workers {worker_cpu:.1f}; load average {os.getloadavg()[0]:.1f}")
    report.write_json(Path(out) / "tokenization.json",
                      dict(corpus_bytes=size, tokenizer=spec, results=results))


def main(argv):
    del argv
    with (contextlib.nullcontext(report.out_dir(FLAGS.out)) if FLAGS.out
          else tempfile.TemporaryDirectory()) as out:
        run(str(out))


if __name__ == "__main__":
    app.run(main)
