"""What the benchmarks print and draw: markdown tables and line plots of their result rows."""


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
