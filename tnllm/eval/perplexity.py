"""Perplexity of a checkpoint on text: `python -m tnllm.eval perplexity --checkpoint DIR --data PATH`.

The text is read as training reads it (`tnllm.data`): `--data` names .txt/.jsonl files, a directory
or a glob ("" = the Python standard library's sources), tokenized with the checkpoint's tokenizer.

  --split=val, train  a split of the token store that training builds with the checkpoint's
                      data settings (seq_len, val_fraction), scored as training's validation loss
                      is: windows of seq_len + 1 tokens, each run fresh (`--windows` of them,
                      spread evenly as training spreads them; default all). With --carry_state
                      the split is one stream instead, the state carried across windows.
  --split=documents   every document of the files on its own, after one prefix token (EOS, as
                      in the training stream, where a document follows the previous one's EOS),
                      its windows carrying the state: what lm-evaluation-harness's
                      loglikelihood_rolling scores.

Reports nats per token, perplexity, nats and bits per byte, and writes them as JSON (`--out`).
"""
from __future__ import annotations

import json
import math
import sys
from typing import List, Optional, Sequence

import numpy as np
from absl import flags, logging

from tnllm import config as config_lib
from tnllm import data
from tnllm.checkpoint import load_model
from tnllm.eval.score import stream_logprobs
from tnllm.tokenizer import load_tokenizer

SPLITS = ("val", "train", "documents")


def summarize(total_nats: float, tokens: int, num_bytes: float, **extra) -> dict:
    """Loss per token and per byte (nats), bits per byte and perplexity of `tokens` scored tokens
    whose log-probabilities sum to -total_nats over a text of num_bytes UTF-8 bytes."""
    per_token = total_nats / tokens
    per_byte = total_nats / num_bytes
    return dict(extra, tokens=int(tokens), bytes=float(num_bytes), total_nats=float(total_nats),
                loss_per_token=per_token, perplexity=math.exp(per_token), nats_per_byte=per_byte,
                bits_per_byte=per_byte / math.log(2))


def document_tokens(texts: Sequence[str], tokenizer, prefix_id: int) -> List[np.ndarray]:
    """Each text's tokens after the prefix token, as int32 arrays."""
    return [np.asarray([prefix_id] + list(ids), np.int32)
            for ids in tokenizer.encode_batch(list(texts))]


def score_documents(params, cfg, texts: Sequence[str], tokenizer, *, context: int,
                    prefix_id: Optional[int] = None, batch_size: int = 8,
                    progress: bool = False) -> dict:
    """Every text on its own, after the prefix token (default EOS), its windows carrying the
    state (`summarize`'s keys, plus `documents` and `per_document`, each text's total
    log-probability; 0 for an empty text)."""
    streams = document_tokens(texts, tokenizer,
                              tokenizer.eos_id if prefix_id is None else prefix_id)
    kept = [i for i, s in enumerate(streams) if len(s) > 1]
    logprobs = stream_logprobs(params, cfg, [streams[i] for i in kept], context=context,
                               carry=True, batch_size=batch_size, progress=progress,
                               desc="documents")
    per_document = [0.0] * len(texts)
    for i, lp in zip(kept, logprobs):
        per_document[i] = float(lp.astype(np.float64).sum())
    return summarize(-sum(per_document), sum(len(s) - 1 for s in streams),
                     sum(len(t.encode("utf-8")) for t in texts), documents=len(texts),
                     per_document=per_document)


def score_split(params, cfg, store, split: str, *, seq_len: int, context: int, carry: bool,
                windows: Optional[int] = None, batch_size: int = 8, progress: bool = False) -> dict:
    """A split of a `tnllm.data.TokenStore`: training's validation windows, or with `carry` the
    whole split as one stream. Per byte uses the split's tokens per byte, as training does."""
    if carry:
        stream = store.splits[split].read().result().astype(np.int32)
        logprobs = stream_logprobs(params, cfg, [stream], context=context, carry=True,
                                   batch_size=1, progress=progress, desc=split)[0]
        extra = dict(windows=None)
    else:
        spans = data.Windows(store.splits[split], seq_len, split)
        ids = spans.spread(spans.num_windows if windows is None else windows)
        logprobs = np.concatenate(stream_logprobs(
            params, cfg, list(spans.read(ids)), context=context, carry=False,
            batch_size=batch_size, progress=progress, desc=split))
        extra = dict(windows=len(ids))
    total, tokens = -float(logprobs.astype(np.float64).sum()), logprobs.size
    return summarize(total, tokens, tokens / store.tokens_per_byte(split), **extra)


def _define_flags():
    flags.DEFINE_string("checkpoint", None, "A training work directory or an export.", required=True)
    flags.DEFINE_string("data", None, "Text to score: a .txt or .jsonl file, a directory, a glob, or "
                        "'' for the standard library corpus; default: the checkpoint's "
                        "config.data.path.")
    flags.DEFINE_enum("split", "val", SPLITS, "val or train: that split of the token store, as "
                      "training builds it; documents: every document on its own.")
    flags.DEFINE_integer("context", None, "Tokens per window; default: config.data.seq_len.")
    flags.DEFINE_bool("carry_state", None, "Carry the recurrent state across windows; default: "
                      "on for --split=documents, off (training's windows) for val and train.")
    flags.DEFINE_integer("windows", None, "Score this many windows spread over the split, as "
                         "training's evaluation (config.train.eval_batches x micro-batch); "
                         "default: all.")
    flags.DEFINE_integer("batch_size", 8, "Rows scored together.")
    flags.DEFINE_string("attention_impl", None, "Parallel form (auto, reference, blockwise, pallas); "
                        "default: the checkpoint's config.")
    flags.DEFINE_string("out", None, "Write the result as JSON to this file.")


def main(argv):
    del argv
    try:
        result = _run()
    except (ValueError, FileNotFoundError) as e:  # bad input: one line naming the fix
        raise SystemExit(f"error: {e}") from None
    print(f"{result['tokens']:,} tokens: {result['loss_per_token']:.4f} nats/token, perplexity "
          f"{result['perplexity']:.3f}, {result['bits_per_byte']:.4f} bits/byte")


def _run() -> dict:
    FLAGS = flags.FLAGS
    if not FLAGS["verbosity"].present:  # Orbax logs every checkpoint it opens at INFO
        logging.set_verbosity(logging.WARNING)
    for name in ("context", "windows", "batch_size"):
        if FLAGS[name].value is not None:  # None: the default the flag's help names
            config_lib.check_positive(f"--{name}", FLAGS[name].value)
    config, params = load_model(FLAGS.checkpoint)
    cfg = config_lib.model_config(config)
    if FLAGS.attention_impl:
        cfg = cfg.replace(attention_impl=FLAGS.attention_impl)
    data_cfg = config.data
    if FLAGS.data is not None:
        data_cfg.path = FLAGS.data
    tokenizer = load_tokenizer(data_cfg.tokenizer)
    context = FLAGS.context or data_cfg.seq_len
    carry = FLAGS.split == "documents" if FLAGS.carry_state is None else FLAGS.carry_state
    if FLAGS.split == "documents":
        if not carry:
            raise ValueError("--split=documents scores each document whole; drop --nocarry_state.")
        texts = [t for f in data.find_files(data_cfg.path)
                 for t in data.read_documents(f, data_cfg.text_field)]
        result = score_documents(params, cfg, texts, tokenizer, context=context,
                                 batch_size=FLAGS.batch_size, progress=True)
        del result["per_document"]
    else:
        store = data.TokenStore(data_cfg, tokenizer)
        result = score_split(params, cfg, store, FLAGS.split, seq_len=data_cfg.seq_len,
                             context=context, carry=carry, windows=FLAGS.windows,
                             batch_size=FLAGS.batch_size, progress=True)
    result = dict(checkpoint=FLAGS.checkpoint, data=data_cfg.path, split=FLAGS.split,
                  context=context, carry_state=carry, **result)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"Wrote {FLAGS.out}.", file=sys.stderr)
    return result
