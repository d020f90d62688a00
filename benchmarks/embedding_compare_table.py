"""A Matryoshka embedder against the same loss without Matryoshka, per size, from their test folders.

    python benchmarks/embedding_compare_table.py runs/results-supcon/quickstart_supcon [--runs mrl plain]

Reads ``RUN/{name}-test/test_retrieval.csv`` (what ``mrl-vision test`` writes for a model trained with an embedding
loss: retrieval within the test split, every image querying the others) and prints one markdown row per size:
Recall@1 and Recall@8 and the kNN top-1 of each run, then the Matryoshka model's lead in Recall@1.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

METRICS = (("recall1", "R@1"), ("recall8", "R@8"), ("knn_top1", "kNN"))


def read(run: Path, name: str) -> dict[int, dict[str, float]]:
    path = run / f"{name}-test" / "test_retrieval.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run mrl-vision test for {name!r} first")
    with open(path, newline="") as f:
        return {int(r["dims"]): {k: float(v) for k, v in r.items() if k != "dims" and v} for r in csv.DictReader(f)}


def table(run: Path, names: list[str]) -> str:
    results = {n: read(run, n) for n in names}
    dims = sorted(set.intersection(*(set(r) for r in results.values())))
    head = [f"{n} {label}" for n in names for _, label in METRICS]
    lead = f"{names[0]} - {names[1]} R@1" if len(names) > 1 else None
    lines = ["| dims | " + " | ".join(head + ([lead] if lead else [])) + " |", "|---" * (len(head) + 1 + bool(lead)) + "|"]
    for d in dims:
        cells = [f"{results[n][d].get(k, float('nan')):.2f}" for n in names for k, _ in METRICS]
        if lead:
            cells.append(f"{results[names[0]][d]['recall1'] - results[names[1]][d]['recall1']:+.2f}")
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="the folder holding the runs' test folders")
    ap.add_argument("--runs", nargs="+", default=["mrl", "plain"], help="run names, the Matryoshka one first")
    a = ap.parse_args(argv)
    text = table(Path(a.run), a.runs)
    print(text)
    return text


if __name__ == "__main__":
    main()
