"""A benchmark's result rows: each printed as a JSON line when it is measured and the whole list
rewritten to its file with the run's metadata (a run cut short keeps what it measured), and a
table of them printed last."""
import json
from pathlib import Path
from typing import Callable, Sequence, Tuple


def record(rows: list, row: dict, path: Path, meta: dict) -> None:
    """Appends row to rows, prints it and writes {**meta, "results": rows} to path."""
    rows.append(row)
    print(json.dumps(row), flush=True)
    path.write_text(json.dumps(dict(meta, results=rows), indent=1))


def measure(rows: list, row: dict, run: Callable[[dict], None], path: Path, meta: dict) -> None:
    """run(row) fills row with its checks and timings; an exception it raises (a variant that does
    not compile or check) becomes the row's error. Then the row is recorded."""
    try:
        run(row)
    except Exception as e:  # noqa: BLE001 - a variant that fails is a result
        row["error"] = f"{type(e).__name__}: {str(e)[:1500]}"
    record(rows, row, path, meta)


def table(rows: Sequence[dict], columns: Sequence[Tuple[str, str, str]]) -> None:
    """Prints rows under columns (header, key, format spec with a width at least the header's, e.g.
    ("GPU µs/layer", "gpu_us_per_layer", ">13.2f")): a row's error in place of all but its first
    cell, an absent key as -."""
    widths = [int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 0) for _, _, spec in columns]
    print("\n" + " ".join(f"{h:>{w}}" for (h, _, _), w in zip(columns, widths)))
    for r in rows:
        (_, key, spec), rest = columns[0], zip(columns[1:], widths[1:])
        cells = [f"{r.get(key, ''):{spec}}"]
        if "error" in r:
            cells.append(r["error"][:200])
        else:
            cells += [f"{r[k]:{s}}" if k in r else f"{'-':>{w}}" for (_, k, s), w in rest]
        print(" ".join(cells))
