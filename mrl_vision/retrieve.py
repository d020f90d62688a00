"""``mrl-vision retrieve``: retrieval at every size from two folders that ``mrl-vision embed`` wrote.

The database (usually the training split) and the queries (the test or validation split) must come
from the same model. Each size ``m`` searches with the first ``m`` dimensions, L2-normalised after
truncation (:mod:`mrl_vision.retrieval`), and scores the ranking by the labels. Adaptive retrieval
(``--adaptive 16:200:512``: shortlist 200 at 16 dims from the index, re-rank at 512) and funnel
retrieval (``--funnel 16:800,32:400,64:200,128:50,512:10``) are scored beside the fixed sizes, each
with its cost (multiply-adds per query).

Writes into ``--out``: ``retrieval.csv`` (one row per size, the columns of
:func:`mrl_vision.retrieval.metric_columns`, percent), ``retrieval_cascades.csv`` (adaptive and
funnel rows, when asked), ``retrieval.json`` (both, with the inputs and options) and
``retrieval.png`` (1-NN top-1 and mAP@k against the search cost in dims). ``mrl-vision report``
reads the folder back.

Example::

    mrl-vision embed --ckpt_path runs/quickstart/version_0 --split train --out runs/emb/train
    mrl-vision embed --ckpt_path runs/quickstart/version_0 --split test --out runs/emb/test
    mrl-vision retrieve --database runs/emb/train --queries runs/emb/test --adaptive 16:200:512 --out runs/retrieval
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

from .files import atomic_write_text

# What must agree between the database's and the queries' embedding folders.
SAME_MODEL_KEYS = ("backbone", "layers", "head", "dims", "width", "fingerprint")


def parser() -> argparse.ArgumentParser:
    from .retrieval import INDEX_KINDS

    p = argparse.ArgumentParser(
        prog="mrl-vision retrieve",
        description="Retrieval metrics at every size (1-NN and kNN top-1, mAP@k in both conventions, precision, "
                    "recall and hit rate at k) of queries against a database, both embedding folders written by "
                    "mrl-vision embed; adaptive and funnel retrieval beside them.")
    p.add_argument("--database", required=True, help="embedding folder searched (e.g. the training split)")
    p.add_argument("--queries", required=True, help="embedding folder of the queries (e.g. the test split)")
    p.add_argument("--out", required=True, help="output folder: retrieval.csv/.json/.png (+ retrieval_cascades.csv)")
    p.add_argument("--dims", type=int, nargs="+", default=None,
                   help="sizes to search at (default: every size the model was trained at)")
    p.add_argument("--k", type=int, default=10, help="neighbours scored by mAP/precision/recall/hit and the kNN vote "
                                                    "(default 10)")
    p.add_argument("--index", default="exact", choices=INDEX_KINDS,
                   help="exact (torch, no extra dependency) or a faiss index: flat, hnsw, fp16, sq8 (default exact); "
                        "used for the fixed sizes and the first stage of cascades, re-ranking is exact")
    p.add_argument("--hnsw-m", type=int, default=32, help="HNSW links per node (default 32)")
    p.add_argument("--ef-search", type=int, default=128, help="HNSW efSearch (default 128)")
    p.add_argument("--ef-construction", type=int, default=200, help="HNSW efConstruction (default 200)")
    p.add_argument("--adaptive", action="append", default=[], metavar="DS:SHORTLIST:DR",
                   help="adaptive retrieval: shortlist SHORTLIST neighbours at DS dims, re-rank at DR (repeatable)")
    p.add_argument("--funnel", action="append", default=[], metavar="D1:K1,D2:K2,...",
                   help="funnel retrieval: stages of (dims, neighbours kept), re-ranking each shortlist (repeatable)")
    p.add_argument("--title", default="", help="title of the figure")
    return p


def check_same_model(database: dict, queries: dict) -> None:
    """``ValueError`` naming the field where the two sidecars' models differ."""
    a, b = database.get("model") or {}, queries.get("model") or {}
    for key in SAME_MODEL_KEYS:
        if key in a and key in b and a[key] != b[key]:
            raise ValueError(f"the database and the queries come from different models: {key} {a[key]!r} vs "
                             f"{b[key]!r} (embed both splits with the same checkpoint)")
    if database.get("width") != queries.get("width"):
        raise ValueError(f"the database's embeddings have width {database.get('width')}, the queries' "
                         f"{queries.get('width')}")


def run(database: str, queries: str, out: str, dims: Sequence[int] | None = None, k: int = 10,
        index: str = "exact", adaptive: Sequence[str] = (), funnel: Sequence[str] = (), title: str = "",
        **index_options) -> dict:
    """Everything ``mrl-vision retrieve`` does, from Python; returns what ``retrieval.json`` holds."""
    from .embeddings import load_embeddings, read_embeddings_info
    from .report import plot_retrieval, rows_to_csv
    from .retrieval import evaluate_retrieval, parse_adaptive, parse_funnel

    adaptive_specs = [parse_adaptive(a) for a in adaptive]  # bad specs fail before anything is read
    funnel_specs = [parse_funnel(f) for f in funnel]
    db_info, q_info = read_embeddings_info(database), read_embeddings_info(queries)
    check_same_model(db_info, q_info)
    if dims is None:
        dims = (db_info.get("model") or {}).get("dims") or db_info.get("sizes")
    for name, info in (("--database", db_info), ("--queries", q_info)):
        if not info.get("labelled", True):
            raise ValueError(f"{name} {info.get('path', '')!r} holds unlabeled embeddings: retrieval metrics need "
                             "labels on both sides")
    start = time.time()
    db, db_labels = load_embeddings(database)
    q, q_labels = load_embeddings(queries)
    rows, cascades = evaluate_retrieval(db, db_labels, q, q_labels, dims=dims, k=k, index=index,
                                        adaptive=adaptive_specs, funnel=funnel_specs, **index_options)
    seconds = time.time() - start
    result = {
        "database": {"path": str(database), "count": int(db.shape[0]), "split": _split(db_info)},
        "queries": {"path": str(queries), "count": int(q.shape[0]), "split": _split(q_info)},
        "model": db_info.get("model"), "width": int(db.shape[1]), "k": k, "index": index,
        "index_options": index_options if index == "hnsw" else {},
        "map_conventions": {f"map_at_{k}_ref": f"sum of precision@j at relevant ranks j <= {k}, divided by {k} "
                                                "(the MRL reference's)",
                            f"map_at_{k}": f"the same sum divided by min({k}, relevant items in the database)"},
        "rows": rows, "cascades": cascades, "seconds": seconds,
    }
    out_dir = Path(out)
    atomic_write_text(out_dir / "retrieval.csv", rows_to_csv(rows))
    if cascades:
        atomic_write_text(out_dir / "retrieval_cascades.csv", rows_to_csv(cascades))
    atomic_write_text(out_dir / "retrieval.json", json.dumps(result, indent=2) + "\n")
    heading = title or f"{_model_name(db_info)}: {result['queries']['count']} queries, " \
                       f"{result['database']['count']} database images ({index})"
    plot_retrieval(rows, cascades, out_dir / "retrieval.png", k=k, title=heading)
    return result


def _split(info: dict) -> str | None:
    return (info.get("data") or {}).get("split")


def _model_name(info: dict) -> str:
    model = info.get("model") or {}
    return " ".join(str(model[k]) for k in ("backbone", "head") if model.get(k)) or "embeddings"


def format_rows(rows: list[dict], k: int) -> str:
    """The per-size (or cascade) rows as a fixed-width text table."""
    from .retrieval import metric_columns

    metrics = metric_columns(k)[1:]
    lead = [c for c in ("method", "stages", "dim") if rows and c in rows[0]]
    tail = ["cost_ratio"] if rows and "cost_ratio" in rows[0] else []
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in lead}
    header = "  ".join(f"{c:>{widths[c]}}" for c in lead) + "".join(f"{c:>{len(c) + 2}}" for c in metrics + tail)
    lines = [header]
    for r in rows:
        cells = "  ".join(f"{str(r[c]):>{widths[c]}}" for c in lead)
        cells += "".join(f"{r[c]:>{len(c) + 2}.2f}" for c in metrics + tail)
        lines.append(cells)
    return "\n".join(lines) + "\n"


def main(args: Sequence[str]) -> dict:
    """``mrl-vision retrieve``: parse ``args``, score, print the tables, write the files."""
    from .cli import _user_errors

    a = parser().parse_args(list(args))
    options = {"hnsw_m": a.hnsw_m, "ef_search": a.ef_search, "ef_construction": a.ef_construction} \
        if a.index == "hnsw" else {}
    with _user_errors("retrieve", ImportError):
        result = run(a.database, a.queries, a.out, dims=a.dims, k=a.k, index=a.index, adaptive=a.adaptive,
                     funnel=a.funnel, title=a.title, **options)
    k = a.k
    print(f"retrieval of {result['queries']['count']} queries among {result['database']['count']} database "
          f"embeddings ({a.index} index; percent; map_at_{k}_ref divides by {k} as the MRL reference does, "
          f"map_at_{k} by min({k}, relevant)):")
    print(format_rows(result["rows"], k), end="")
    if result["cascades"]:
        print("adaptive and funnel retrieval (cost_ratio: multiply-adds of exact search at the full width / the "
              "cascade's):")
        print(format_rows(result["cascades"], k), end="")
    print(f"wrote {Path(a.out) / 'retrieval.csv'} ({result['seconds']:.1f} s)")
    return result
