"""Accuracy-vs-dimensions tables and plots."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Mapping

from .files import atomic_path, atomic_write_text


def accuracy_rows(metrics: Mapping[str, float], prefix: str = "") -> list[dict]:
    """Turn ``{"test/top1@8": 0.9, "test/top5@8": 0.99, ...}`` into rows sorted by size:
    ``[{"dims": 8, "top1": 90.0, "top5": 99.0}, ...]`` (percent)."""
    rows: dict[int, dict] = {}
    for key, value in metrics.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if "@" not in name or not name.startswith("top"):
            continue
        metric, size = name.split("@", 1)
        if not size.isdigit():
            continue
        rows.setdefault(int(size), {"dims": int(size)})[metric] = 100.0 * float(value)
    return [rows[m] for m in sorted(rows)]


def format_table(rows: list[dict], title: str = "") -> str:
    """A fixed-width text table of accuracy per size (what the CLI prints after ``test``)."""
    if not rows:
        return f"{title}\n(no per-size metrics)\n"
    cols = [c for c in rows[0] if c != "dims"]
    lines = [title] if title else []
    lines.append("  dims " + "".join(f"{c + ' %':>10}" for c in cols))
    for r in rows:
        lines.append(f"{r['dims']:>6} " + "".join(f"{r.get(c, float('nan')):>10.2f}" for c in cols))
    return "\n".join(lines) + "\n"


def rows_to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    fields = list(rows[0]) if rows else ["dims"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def plot_accuracy(curves: Mapping[str, list[dict]], path: str | os.PathLike, metric: str = "top1", title: str = "") -> None:
    """Accuracy vs dimensions on a log-2 x axis, one line per named curve, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    sizes: set[int] = set()
    for name, rows in curves.items():
        xs = [r["dims"] for r in rows if metric in r]
        ys = [r[metric] for r in rows if metric in r]
        sizes |= set(xs)
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xscale("log", base=2)
    if sizes:
        ax.set_xticks(sorted(sizes))
        ax.set_xticklabels([str(s) for s in sorted(sizes)], rotation=45)
    ax.set_xlabel("embedding dimensions")
    ax.set_ylabel(f"{metric} accuracy (%)")
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_accuracy_report(rows: list[dict], out_dir: str | os.PathLike, stem: str = "test_accuracy", title: str = "") -> tuple[Path, Path]:
    """Write ``{stem}.csv`` and ``{stem}.png`` into ``out_dir`` (both crash-safe); return their paths."""
    out = Path(out_dir)
    csv_path, png_path = out / f"{stem}.csv", out / f"{stem}.png"
    atomic_write_text(csv_path, rows_to_csv(rows))
    plot_accuracy({title or stem: rows}, png_path, title=title)
    return csv_path, png_path
