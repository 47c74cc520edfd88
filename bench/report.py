"""Where a benchmark's results go: the output folder, the run's metadata, result rows written as
they are measured (a run cut short keeps what it measured), markdown tables and line plots."""
import datetime
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, Optional

import jax


def out_dir(path: Optional[str] = None) -> Path:
    """path, else $OUT, else ./bench_out; created if missing."""
    out = Path(path or os.environ.get("OUT") or "bench_out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_info() -> dict:
    """The date, the command line, the first device's kind and the JAX version."""
    return {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
            "device": jax.devices()[0].device_kind, "jax": jax.__version__}


def write_json(path: Path, results) -> None:
    path.write_text(json.dumps(results, indent=1, default=str))


def measure(rows: list, row: dict, run: Callable[[dict], None], path: Path, meta: dict) -> None:
    """run(row) fills row with its timings; an exception it raises (a case that does not fit or
    compile) is printed and becomes the row's error, and the other cases go on. Then the row is
    appended to rows, printed, and {**meta, "results": rows} written to path."""
    try:
        run(row)
    except Exception as e:  # noqa: BLE001 - a case that fails is a result
        traceback.print_exc()
        row["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
    rows.append(row)
    print(json.dumps(row), flush=True)
    write_json(path, dict(meta, results=rows))


def markdown(rows, columns) -> str:
    """rows (dicts) as a markdown table; columns are (header, key, format spec). A row's "error" or
    "skipped" fills the cells after the first; an absent or None value is blank."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|---" * len(columns) + "|"]
    for r in rows:
        cells = ["" if r.get(k) is None else format(r[k], f) for _, k, f in columns]
        if r.get("error") or r.get("skipped"):
            cells[1:] = [str(r.get("error") or r.get("skipped"))[:120]] + [""] * (len(cells) - 2)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)



def line_plot(series, path, *, xlabel, ylabel, title="", logx=True, logy=False) -> None:
    """series: {label: [(x, y), ...]} drawn as one line each (x log 2 by default) into path (png)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in series.items():
        ax.plot(*zip(*sorted(points)), marker="o" if len(points) < 50 else None, label=label)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
