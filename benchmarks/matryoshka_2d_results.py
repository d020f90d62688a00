"""The README's 2D Matryoshka table from the runs of ``make results-2d``: top-1 % per (blocks, dims) on the test
split, mean and sample standard deviation over seeds, for the 2D model, the 1D MRL model (its heads read
the earlier blocks' embeddings it was never trained on) and a standard model cut to k blocks + linear probes.

    python benchmarks/matryoshka_2d_results.py runs/results-2d/digits [--out table.md]

Reads ``{mrl2d,mrl1d}-s*-test/test_grid.csv`` (written by ``mrl-vision test`` with ``eval_layers``) and
``standard-L{k}/truncation.csv`` (``mrl-vision truncate --layers k``).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from mrl_vision.files import atomic_write_text


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def grids(root: Path, kind: str) -> dict[str, dict[tuple[int, int], float]]:
    """``{run: {(blocks, dims): top1 %}}`` of every tested seed of ``kind`` (``mrl2d`` or ``mrl1d``)."""
    found = {}
    for path in sorted(root.glob(f"{kind}-s*-test/test_grid.csv")):
        found[path.parent.name] = {(int(r["layers"]), int(r["dims"])): float(r["top1"]) for r in _rows(path)}
    return found


def probes(root: Path) -> dict[tuple[int, int], dict[str, float]]:
    """``{(blocks, dims): {"prefix": %, "svd": %}}`` of the standard model cut to k blocks."""
    found = {}
    for path in sorted(root.glob("standard-L*/truncation.csv")):
        k = int(path.parent.name.split("-L")[1])
        for r in _rows(path):
            found[(k, int(r["dims"]))] = {"prefix": float(r["prefix_top1"]), "svd": float(r["svd_top1"])}
    return found


def cascades(root: Path) -> list[dict[str, str]]:
    """Per tested run: the 2D cascade fitted on validation, evaluated on the test split (``adaptive2d/*``)."""
    found = []
    for path in sorted(root.glob("*-test/metrics.csv")):
        logged: dict[str, str] = {}
        for row in _rows(path):
            logged.update({k: v for k, v in row.items() if v})
        if "adaptive2d/top1" in logged:
            found.append({"run": path.parent.name[: -len("-test")], "top1": 100 * float(logged["adaptive2d/top1"]),
                          "gflops": float(logged["adaptive2d/expected_gflops"]),
                          "fraction": float(logged["adaptive2d/flops_fraction"])})
    return found


def cascade_table(rows: list[dict]) -> str:
    lines = ["**2D cascade** (DepthWidthCascade as fitted at the end of training, on half of the validation split; "
             "evaluated on the test split)", "", "| run | top-1 % | GFLOPs / image | of the full model |", "|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['top1']:.1f} | {r['gflops']:.4f} | {r['fraction']:.2f} |" for r in rows]
    return "\n".join(lines) + "\n"


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def grid_table(runs: dict[str, dict[tuple[int, int], float]], title: str) -> str:
    cells: dict[tuple[int, int], list[float]] = defaultdict(list)
    for grid in runs.values():
        for key, value in grid.items():
            cells[key].append(value)
    blocks = sorted({k for k, _ in cells})
    dims = sorted({m for _, m in cells})
    lines = [f"**{title}** ({len(runs)} seed{'s' if len(runs) != 1 else ''}: {', '.join(runs)})", "",
             "| blocks | " + " | ".join(str(m) for m in dims) + " |", "|---" * (len(dims) + 1) + "|"]
    for k in blocks:
        lines.append(f"| {k} | " + " | ".join(_cell(cells.get((k, m), [])) for m in dims) + " |")
    return "\n".join(lines) + "\n"


def probe_table(found: dict[tuple[int, int], dict[str, float]]) -> str:
    blocks = sorted({k for k, _ in found})
    dims = sorted({m for _, m in found})
    lines = ["**standard ViT cut to k blocks + linear probe** (first m dims / SVD to m dims; one seed)", "",
             "| blocks | " + " | ".join(str(m) for m in dims) + " |", "|---" * (len(dims) + 1) + "|"]
    for k in blocks:
        cells = [found.get((k, m)) for m in dims]
        lines.append(f"| {k} | " + " | ".join(f"{c['prefix']:.1f} / {c['svd']:.1f}" if c else "-" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def headline(two: dict, one: dict) -> str:
    """The 2D model against 1D MRL at full depth and width, seed by seed."""
    if not two or not one:
        return ""
    full = max(next(iter(two.values())))
    a = [g[full] for g in two.values() if full in g]
    b = [g[full] for g in one.values() if full in g]
    if not a or not b:
        return ""
    gap = statistics.mean(a) - statistics.mean(b)
    return (f"At full depth and width ({full[0]} blocks, {full[1]} dims): 2D {_cell(a)} % (seeds: "
            f"{', '.join(f'{v:.1f}' for v in a)}), 1D MRL {_cell(b)} % (seeds: {', '.join(f'{v:.1f}' for v in b)}); "
            f"difference of the means {gap:+.2f} points.\n")


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path, help="the folder of make results-2d's runs (runs/results-2d/digits)")
    p.add_argument("--out", type=Path, default=None, help="also write the tables to this markdown file")
    a = p.parse_args(argv)
    if not a.root.is_dir():
        sys.exit(f"error: {a.root} is not a folder (run make results-2d first)")
    two, one, cut = grids(a.root, "mrl2d"), grids(a.root, "mrl1d"), probes(a.root)
    if not two and not one and not cut:
        sys.exit(f"error: no tested runs in {a.root} (expected mrl2d-s*-test/test_grid.csv, standard-L*/truncation.csv)")
    parts = [headline(two, one)]
    if two:
        parts.append(grid_table(two, "2D Matryoshka ViT-Tiny, top-1 % by blocks (rows) and dims (columns)"))
    if one:
        parts.append(grid_table(one, "1D MRL ViT-Tiny, its heads on each block's embedding"))
    if cut:
        parts.append(probe_table(cut))
    steps = cascades(a.root)
    if steps:
        parts.append(cascade_table(steps))
    text = "\n".join(p for p in parts if p)
    print(text, end="")
    if a.out is not None:
        atomic_write_text(a.out, text)
    return text


if __name__ == "__main__":
    main()
