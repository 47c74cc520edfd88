"""Fine-tuning TransNormerLLM-385M on an instruction file, from an export (docs/finetune.md).

Set the three paths on the command line:

    python train.py --config=configs/finetune_385m.py --workdir=runs/ft385m \
        --config.train.init_from=EXPORT_DIR --config.data.tokenizer=EXPORT_DIR/tokenizer.model \
        --config.data.path=instructions.jsonl
"""
import os

from tnllm.config import load


def get_config():
    cfg = load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "385m.py"))
    # JSON-lines {"prompt", "response"} or {"messages": [...]} records, whole ones per window, the
    # loss on the responses only.
    cfg.data.update(path="instructions.jsonl", tokenizer="tokenizer.model", packing="documents",
                    template="plain", seq_len=2048, val_fraction=0.02)
    cfg.train.update(init_from="export", steps=2000, eval_every=200, sample_tokens=0)
    # A small peak rate and no weight decay: the weights should move little from the release.
    cfg.optim.update(lr=2e-5, warmup_steps=100, min_lr_ratio=0.1, weight_decay=0.0)
    cfg.checkpoint.update(every=500)
    return cfg
