#!/usr/bin/env bash
# Issue 4, acceptance 6: the 385M config trains at sequence length 2048 for 60 steps on one H100 with
# the Pallas kernels, printing tokens/s and MFU (also in $WORKDIR/metrics.jsonl).
#
#   bash bench/train_h100.sh                                   # Python stdlib corpus, byte tokenizer
#   bash bench/train_h100.sh --config.data.path='corpus/*.jsonl' --config.data.tokenizer=tokenizer.model
#   IMPL=blockwise bash bench/train_h100.sh                    # the XLA form, for comparison
#
# On the offline GPU machine ml_collections comes from the repository's wheel:
#   python -m pip install --no-deps .whl/ml_collections-1.1.0-py3-none-any.whl
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR=${WORKDIR:-$(mktemp -d /tmp/tnllm-385m-XXXX)}  # fresh by default: an old one would resume
python train.py --config=configs/385m.py --workdir="$WORKDIR" \
  --config.model.attention_impl="${IMPL:-pallas}" --config.data.seq_len=2048 \
  --config.train.steps=60 --config.optim.warmup_steps=10 --config.train.log_every=5 \
  --config.train.eval_every=60 --config.train.eval_batches=2 --config.checkpoint.every=60 \
  --config.train.sample_tokens=32 "$@"
