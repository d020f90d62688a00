"""Retrieval with Matryoshka embeddings: accuracy at every size, adaptive and funnel retrieval, and speed.

Two parts, on the embeddings of a trained model (``mrl-vision embed`` folders; database = the training
split, queries = the test or validation split, as the MRL reference does):

1. Accuracy: 1-NN top-1 and mAP@10 (divided by min(10, relevant); the reference's divide-by-10 beside it)
   at every size by exact search; adaptive retrieval (shortlist 200 at 8 and 16 dims, re-rank at the full
   width) and a funnel, each against exact full-size search, with the cost model's ratio.
2. Speed at 10k, 100k and 1M database vectors: queries/s of exact full-size search (faiss ``IndexFlatIP``
   and the torch backend) against adaptive retrieval (an HNSW index at the small size, shortlist 200,
   exact re-rank at the full width), measured side by side in one run, and the bytes per vector of
   float32, fp16 and int8 storage. Past the data set's size the database is the real embeddings
   repeated with small Gaussian noise (``--noise`` times each dimension's standard deviation): the
   figures say so (a noisy copy keeps its original's label). Beside the speed: the 1-NN top-1 of both
   searches, and how often adaptive retrieval finds exact search's very neighbour (among the near-identical
   noisy copies of one image, a different copy is as good an answer).

    python benchmarks/retrieval.py --database runs/emb/tiny100-train --queries runs/emb/tiny100-val
    python benchmarks/retrieval.py --database DIR --queries DIR --sizes 10000 100000 --num-queries 500

Targets (issue 12): adaptive retrieval within 0.1 point of full-size 1-NN top-1; at 1M x 512 at least
10x the queries/s of exact full-size search on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from mrl_vision import retrieval as R
from mrl_vision.embeddings import load_embeddings, read_embeddings_info


def accuracy(db, db_labels, q, q_labels, k: int, shortlist: int) -> None:
    width = db.shape[1]
    small = [d for d in (8, 16) if d < width]
    adaptive = [(d, shortlist, width) for d in small]
    funnel_dims = [d for d in (16, 32, 64, 128) if d < width] + [width]
    keeps = [800, 400, 200, 50, 10][-len(funnel_dims):]
    funnel = [list(zip(funnel_dims, [min(n, db.shape[0]) for n in keeps]))]
    start = time.time()
    rows, cascades = R.evaluate_retrieval(db, db_labels, q, q_labels, k=k, adaptive=adaptive, funnel=funnel)
    print(f"## 1. accuracy: {q.shape[0]} queries, {db.shape[0]} database embeddings, width {width}, exact search "
          f"({time.time() - start:.1f} s)\n")
    print(f"| search | 1-NN top-1 % | mAP@{k} % | mAP@{k} (ref, /k) % | P@{k} % | cost (MACs/query) | cost ratio |")
    print("|---|---|---|---|---|---|---|")
    full = rows[-1]
    for r in rows:
        print(f"| exact at {r['dim']} dims | {r['nn1_top1']:.2f} | {r[f'map_at_{k}']:.2f} | {r[f'map_at_{k}_ref']:.2f} "
              f"| {r[f'precision_at_{k}']:.2f} | {r['cost']:,} | {full['cost'] / r['cost']:.1f}x |")
    for c in cascades:
        print(f"| {c['method']} {c['stages']} | {c['nn1_top1']:.2f} | {c[f'map_at_{k}']:.2f} | "
              f"{c[f'map_at_{k}_ref']:.2f} | {c[f'precision_at_{k}']:.2f} | {c['cost']:,} | {c['cost_ratio']:.1f}x |")
    print()
    for c in cascades:
        gap = c["nn1_top1"] - full["nn1_top1"]
        print(f"{c['method']} {c['stages']}: 1-NN top-1 {gap:+.2f} points vs exact {width}-d search "
              f"({'within' if gap >= -0.1 else 'NOT within'} 0.1 point), {c['cost_ratio']:.1f}x fewer MACs")
    print()


def grow(db: torch.Tensor, n: int, noise: float, seed: int = 0) -> torch.Tensor:
    """``n`` rows: the real embeddings, then noisy copies of them (noise x each dimension's std)."""
    if n <= db.shape[0]:
        return db[:n]
    g = torch.Generator().manual_seed(seed)
    std = db.std(0, keepdim=True)
    parts, have = [db], db.shape[0]
    while have < n:
        take = min(db.shape[0], n - have)
        parts.append(db[:take] + noise * std * torch.randn(take, db.shape[1], generator=g))
        have += take
    return torch.cat(parts)


def timed(fn, repeats: int = 1):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def speed(db, db_labels, q, q_labels, sizes, num_queries: int, small: int, shortlist: int, noise: float, hnsw_m: int,
          ef_search: int, ef_construction: int) -> None:
    import faiss

    width = db.shape[1]
    queries_full = R.normalize_prefix(q[:num_queries], width)
    queries_small = R.normalize_prefix(q[:num_queries], small)
    print(f"## 2. speed: {queries_full.shape[0]} queries, width {width}; adaptive = HNSW (M {hnsw_m}, efSearch "
          f"{ef_search}, efConstruction {ef_construction}) at {small} dims, shortlist {shortlist}, exact re-rank at "
          f"{width}; {torch.get_num_threads()} torch threads, {faiss.omp_get_max_threads()} faiss threads\n")
    print("| database | real rows | exact faiss flat q/s | exact torch q/s | adaptive q/s | adaptive / faster exact "
          "| 1-NN top-1 exact / adaptive | same top-1 neighbour | HNSW build s |")
    print("|---|---|---|---|---|---|---|---|---|")
    truth = q_labels[:num_queries]
    for n in sizes:
        base = grow(db, n, noise)
        labels = db_labels.repeat((n + len(db_labels) - 1) // len(db_labels))[:n]  # a noisy copy keeps its label
        full = R.normalize_prefix(base, width)
        flat = R.build_index(full, "flat")
        t_flat, (_, exact_idx) = timed(lambda: flat.search(queries_full, 1))
        t_torch, (_, torch_idx) = timed(lambda: R.exact_search(queries_full, full, 1))
        start = time.perf_counter()
        hnsw = R.build_index(R.normalize_prefix(base, small), "hnsw", hnsw_m=hnsw_m, ef_search=ef_search,
                             ef_construction=ef_construction)
        build = time.perf_counter() - start

        def adaptive():
            _, cand = hnsw.search(queries_small, shortlist)
            return R.rerank(full, queries_full, cand, width, 1)

        t_adaptive, adaptive_idx = timed(adaptive, repeats=3)
        nq = queries_full.shape[0]
        agree = (adaptive_idx[:, 0] == exact_idx[:, 0]).float().mean().item() * 100
        same = (torch_idx[:, 0] == exact_idx[:, 0]).float().mean().item() * 100
        top1_exact = (labels[exact_idx[:, 0]] == truth).float().mean().item() * 100
        top1_adaptive = (labels[adaptive_idx[:, 0]] == truth).float().mean().item() * 100
        real = min(n, db.shape[0])
        print(f"| {n:,} | {real:,}{'' if real == n else ' (+ noisy copies)'} | {nq / t_flat:,.0f} | {nq / t_torch:,.0f} "
              f"| {nq / t_adaptive:,.0f} | {min(t_flat, t_torch) / t_adaptive:.1f}x | {top1_exact:.1f} / {top1_adaptive:.1f} % "
              f"| {agree:.1f} % | {build:.1f} |")
        if same < 99.0:
            print(f"(torch and faiss exact top-1 agree on only {same:.1f} % of queries: ties or a bug)")
        del base, full, flat, hnsw
    print()
    print("| storage | bytes per vector | 1M vectors |")
    print("|---|---|---|")
    for name, per in ((f"float32 x {width}", 4 * width), (f"fp16 x {width}", 2 * width), (f"int8 x {width}", width),
                      (f"float32 x {small} (the HNSW level, links not counted)", 4 * small)):
        print(f"| {name} | {per:,} | {per * 1e6 / 2**30:.2f} GiB |")
    print()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--database", required=True, help="embedding folder of the database (the training split)")
    p.add_argument("--queries", required=True, help="embedding folder of the queries")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--shortlist", type=int, default=200)
    p.add_argument("--small", type=int, default=16, help="dims of the adaptive shortlist in the speed part")
    p.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--num-queries", type=int, default=1000)
    p.add_argument("--noise", type=float, default=0.05)
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-search", type=int, default=256)
    p.add_argument("--ef-construction", type=int, default=100)
    p.add_argument("--skip-accuracy", action="store_true")
    a = p.parse_args()
    info = read_embeddings_info(a.database)
    db, db_labels = load_embeddings(a.database)
    q, q_labels = load_embeddings(a.queries)
    model = info.get("model") or {}
    print(f"# retrieval benchmark: {model.get('backbone')} {model.get('head')} embeddings; {os.cpu_count()} cores; "
          f"torch {torch.__version__}\n")
    if not a.skip_accuracy:
        accuracy(db, db_labels, q, q_labels, a.k, a.shortlist)
    if a.sizes:
        speed(db, db_labels, q, q_labels, a.sizes, a.num_queries, a.small, a.shortlist, a.noise, a.hnsw_m, a.ef_search,
              a.ef_construction)


if __name__ == "__main__":
    main()
