"""The Tiny-ImageNet comparison's table (``make tiny-compare``), one row per size, from the run folder's files.

    python benchmarks/tiny_compare_table.py runs/tiny-compare

Columns (top-1 % on the test split; retrieval: the test images as queries against the training images):
MRL, MRL-E and FF-m (one model per size) with their own heads; the standard model's first m dims and its SVD to
m dims, each + a linear probe; MRL's first m dims + the same probe (like with like); 1-NN top-1 and mAP@10 of
MRL's and the standard model's first m dims. A missing run leaves its column empty. Reads
``{mrl,mrl_e,standard,ff<m>}-test/test_accuracy.csv``, ``{standard,mrl}-probes/truncation.csv`` and
``{mrl,standard}-retrieval/retrieval.csv``.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _column(rows: list[dict[str, str]], key: str, value: str, dim_key: str = "dims") -> dict[int, float]:
    return {int(r[dim_key]): float(r[value]) for r in rows if r.get(value) not in (None, "")}


def collect(run: Path) -> tuple[list[int], dict[str, dict[int, float]]]:
    """The sizes and, per column name, top-1 or retrieval figures by size."""
    cols: dict[str, dict[int, float]] = {}
    for name, label in (("mrl", "MRL"), ("mrl_e", "MRL-E")):
        cols[label] = _column(_rows(run / f"{name}-test" / "test_accuracy.csv"), "dims", "top1")
    ff: dict[int, float] = {}
    for folder in sorted(run.glob("ff*-test")):
        ff.update(_column(_rows(folder / "test_accuracy.csv"), "dims", "top1"))
    ff.update(_column(_rows(run / "standard-test" / "test_accuracy.csv"), "dims", "top1"))  # FF at the full width
    cols["FF-m"] = ff
    std = _rows(run / "standard-probes" / "truncation.csv")
    cols["standard, first m + probe"] = _column(std, "dims", "prefix_top1")
    cols["standard, SVD m + probe"] = _column(std, "dims", "svd_top1")
    cols["MRL, first m + probe"] = _column(_rows(run / "mrl-probes" / "truncation.csv"), "dims", "prefix_top1")
    for name, label in (("mrl", "MRL"), ("standard", "standard")):
        ret = _rows(run / f"{name}-retrieval" / "retrieval.csv")
        cols[f"{label} 1-NN"] = _column(ret, "dim", "nn1_top1", "dim")
        cols[f"{label} mAP@10"] = _column(ret, "dim", "map_at_10", "dim")
    dims = sorted({d for c in cols.values() for d in c})
    return dims, cols


def table(run: Path) -> str:
    dims, cols = collect(run)
    lines = ["| dims | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for d in dims:
        cells = [f"{c[d]:.2f}" if d in c else "" for c in cols.values()]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="the comparison's folder (runs/tiny-compare)")
    text = table(Path(ap.parse_args(argv).run))
    print(text)
    return text


if __name__ == "__main__":
    main()
