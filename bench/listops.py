"""ListOps (Long-Range Arena): the encoder classifier with cosFormer and softmax attention, the same
steps, data order and seed for each (`tnllm.listops.train_classifier`); test accuracy next to the
cosFormer paper's.

    python -m bench.listops [--config.train.steps=N] [--token_mixers=softmax] [--smoke]

Writes $OUT/listops.json and listops_loss.png (OUT defaults to ./bench_out).
"""
import os
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Room for XLA's softmax attention should cuDNN's be unavailable (4 GiB of logits per layer).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from bench import report  # noqa: E402
from tnllm import listops  # noqa: E402

# cosFormer paper (arXiv 2202.08791), Long-Range Arena ListOps test accuracy, %.
PAPER = {"cosformer": ("cosFormer", 37.9), "softmax": ("vanilla Transformer", 36.37)}

_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(ROOT, "configs/listops.py"),
                                          "ListOps config file (model, data, train).")
_MIXERS = flags.DEFINE_list("token_mixers", None, "Token mixers to train, in order (config.token_mixers).")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny model, tiny data, a few steps: checks the script.")


def train_and_test(model_cfg, tc, train, test) -> dict:
    """One classifier's metrics and loss curve; a failure (e.g. out of memory) is returned as
    {"error": ...} so that the other token mixer's result still comes out."""
    row = {"token_mixer": model_cfg.token_mixer, "softmax_impl": model_cfg.softmax_impl}
    try:
        params, stats = listops.train_classifier(model_cfg, tc, *train)
    except (jax.errors.JaxRuntimeError, NotImplementedError, RuntimeError) as e:
        print(f"{model_cfg.token_mixer} failed: {e}")
        return dict(row, error=str(e))
    return dict(row, test_accuracy=listops.accuracy(model_cfg, params, *test, tc.batch_size),
                steps=tc.steps, batch_size=tc.batch_size, **stats)


def main(argv):
    del argv
    cfg = _CONFIG.value
    if _SMOKE.value:
        cfg.model.update(num_layers=1, d_model=32, num_heads=2, mlp_dim=64, max_len=64)
        cfg.data.update(min_length=10, max_length=64, num_test=4, workers=1)
        cfg.train.update(steps=2, batch_size=4, warmup_steps=1)
    if _MIXERS.value is not None:
        cfg.token_mixers = tuple(_MIXERS.value)
    if cfg.model.softmax_impl == "cudnn" and jax.default_backend() != "gpu":
        print("cuDNN attention needs a GPU: softmax attention runs on XLA here.")
        cfg.model.softmax_impl = "xla"
    try:
        models = [listops.from_config(listops.ClassifierConfig, {**cfg.model, "token_mixer": m}, "model")
                  for m in cfg.token_mixers]
        tc = listops.from_config(listops.TrainConfig, cfg.train, "train")
        grammar = listops.from_config(listops.Grammar, cfg.data, "data", ("seed", "num_test", "workers"))
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    out = report.out_dir()
    workers = cfg.data.workers or os.cpu_count()

    t0 = time.perf_counter()
    num_train = min(tc.steps * tc.batch_size, listops.SPLITS["train"])
    train, test = listops.generate_splits({"train": num_train, "test": cfg.data.num_test},
                                          seed=cfg.data.seed, grammar=grammar, workers=workers).values()
    data_s = time.perf_counter() - t0
    print(f"data: {num_train} train + {len(test[0])} test examples of up to {train[0].shape[1]} tokens "
          f"in {data_s:.1f} s on {workers} processes; devices: {jax.devices()}")

    summary = dict(report.run_info(), smoke=_SMOKE.value, data_s=data_s, num_train_examples=num_train,
                   config=cfg.to_dict(), paper={k: v[1] for k, v in PAPER.items()}, results=[])
    for model_cfg in models:  # the report is rewritten after each token mixer
        summary["results"].append(train_and_test(model_cfg, tc, train, test))
        report.write_json(out / "listops.json", summary)
        report.line_plot({f"{r['token_mixer']} (test acc {r['test_accuracy']:.2f}%)": r["loss_curve"]
                          for r in summary["results"] if "loss_curve" in r}, out / "listops_loss.png",
                         xlabel="step", ylabel="training loss", logx=False,
                         title="ListOps, same budget per token mixer")
        print(f"wrote {out}/listops.json and {out}/listops_loss.png ({len(summary['results'])} of "
              f"{len(cfg.token_mixers)} token mixers)")

    print(f"\nListOps test accuracy, {tc.steps} steps x {tc.batch_size} sequences, {summary['device']}")
    for r in summary["results"]:
        r["paper"] = "{1} ({0})".format(*PAPER[r["token_mixer"]])
    print(report.markdown(summary["results"], [
        ("token mixer", "token_mixer", ""), ("test acc. (%)", "test_accuracy", ".2f"),
        ("paper (%)", "paper", ""), ("final train loss", "final_train_loss", ".3f"),
        ("train s", "train_s", ".1f"), ("padded tokens/s", "padded_tokens_per_s", ",.0f")]))


if __name__ == "__main__":
    app.run(main)
