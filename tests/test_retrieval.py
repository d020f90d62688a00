"""Tests of mrl_vision.retrieval: exact and faiss search, cascades, cost model, metrics, parsing."""

from __future__ import annotations

import sys

import pytest
import torch

from mrl_vision import retrieval as R
from mrl_vision.retrieval import (
    INDEX_KINDS,
    adaptive_search,
    build_index,
    evaluate_retrieval,
    exact_search,
    funnel_search,
    metric_columns,
    normalize_prefix,
    parse_adaptive,
    parse_funnel,
    rerank,
    retrieval_metrics,
    search,
    search_cost,
)


def brute_force(queries: torch.Tensor, database: torch.Tensor, k: int):
    """Reference: full score matrix, stable sort (ties by the lower database index)."""
    scores = queries.float() @ database.float().T
    values, indices = scores.sort(dim=1, descending=True, stable=True)
    return values[:, :k], indices[:, :k]


def clustered(n: int, q: int, width: int = 64, clusters: int = 50, seed: int = 0):
    """Database and queries drawn around ``clusters`` Gaussian centres, with their cluster labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, width, generator=g) * 3
    db_labels = torch.randint(0, clusters, (n,), generator=g)
    q_labels = torch.randint(0, clusters, (q,), generator=g)
    database = centres[db_labels] + torch.randn(n, width, generator=g)
    queries = centres[q_labels] + torch.randn(q, width, generator=g)
    return database, db_labels, queries, q_labels


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean fraction of each row of ``b`` found in the same row of ``a`` (recall@k of a vs b)."""
    return sum(len(set(x.tolist()) & set(y.tolist())) / len(y) for x, y in zip(a, b)) / len(a)


@pytest.fixture
def faiss_one_thread():
    faiss = pytest.importorskip("faiss")
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield faiss
    faiss.omp_set_num_threads(before)


# ----------------------------------------------------------------------------- normalize_prefix
def test_normalize_prefix_unit_rows_and_zero_row():
    x = torch.randn(6, 16, dtype=torch.float16)
    x[2] = 0
    x[4, :4] = 0  # zero prefix, non-zero tail
    out = normalize_prefix(x, 4)
    assert out.dtype == torch.float32 and out.shape == (6, 4)
    assert not torch.isnan(out).any()
    norms = out.norm(dim=1)
    assert torch.equal(out[2], torch.zeros(4)) and torch.equal(out[4], torch.zeros(4))
    keep = torch.tensor([0, 1, 3, 5])
    assert torch.allclose(norms[keep], torch.ones(4), atol=1e-6)
    # Truncate first, then normalise: the prefix of a normalised full vector is not unit norm.
    assert torch.allclose(out[0], x[0, :4].float() / x[0, :4].float().norm(), atol=1e-6)


@pytest.mark.parametrize("dim", [0, 17, -1])
def test_normalize_prefix_bad_dim(dim):
    with pytest.raises(ValueError, match=f"dim={dim}|{dim}"):
        normalize_prefix(torch.randn(3, 16), dim)


# ----------------------------------------------------------------------------- exact search
@pytest.mark.parametrize("chunk_size", [3, 7, 64, 1000, 4096])
def test_exact_search_equals_brute_force_with_ties(chunk_size):
    # Small integer vectors: exact float arithmetic and many tied scores, so the tie-break is tested.
    g = torch.Generator().manual_seed(1)
    database = torch.randint(-2, 3, (1000, 8), generator=g).float()
    queries = torch.randint(-2, 3, (50, 8), generator=g).float()
    k = 10
    scores, indices = exact_search(queries, database, k, chunk_size=chunk_size)
    ref_scores, ref_indices = brute_force(queries, database, k)
    assert scores.dtype == torch.float32 and indices.dtype == torch.int64
    assert torch.equal(indices, ref_indices)
    assert torch.equal(scores, ref_scores)


def test_exact_search_float16_and_gaussian():
    g = torch.Generator().manual_seed(2)
    database = torch.randn(700, 32, generator=g).half()
    queries = torch.randn(30, 32, generator=g).half()
    scores, indices = exact_search(queries, database, 5, chunk_size=128)
    ref_scores, ref_indices = brute_force(queries, database, 5)
    assert scores.dtype == torch.float32
    assert torch.equal(indices, ref_indices)
    assert torch.allclose(scores, ref_scores, atol=1e-5)
    # k = N returns the full ranking.
    _, all_indices = exact_search(queries, database, 700, chunk_size=100)
    assert torch.equal(all_indices, brute_force(queries, database, 700)[1])


def test_exact_search_bad_inputs():
    db, q = torch.randn(10, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="k=11"):
        exact_search(q, db, 11)
    with pytest.raises(ValueError, match="0"):
        exact_search(q, db, 0)
    with pytest.raises(ValueError, match="width 5"):
        exact_search(torch.randn(3, 5), db, 2)
    with pytest.raises(ValueError, match="empty"):
        exact_search(torch.randn(0, 4), db, 2)
    with pytest.raises(ValueError, match="chunk_size"):
        exact_search(q, db, 2, chunk_size=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_exact_search_on_gpu_matches_cpu():
    g = torch.Generator().manual_seed(3)
    database = torch.randint(-2, 3, (3000, 16), generator=g).float()
    queries = torch.randint(-2, 3, (100, 16), generator=g).float()
    scores, indices = exact_search(queries.cuda(), database.cuda(), 20, chunk_size=512)
    assert indices.is_cuda
    assert torch.equal(indices.cpu(), brute_force(queries, database, 20)[1])


# ----------------------------------------------------------------------------- indexes
def test_build_index_exact_and_validation():
    db = normalize_prefix(torch.randn(50, 8), 8)
    index = build_index(db)
    assert (index.kind, index.dim, index.ntotal, index.bytes_per_vector) == ("exact", 8, 50, 32.0)
    with pytest.raises(ValueError, match="'ivf'"):
        build_index(db, "ivf")
    with pytest.raises(ValueError, match="hnsw_m"):
        build_index(db, "hnsw", hnsw_m=0)
    with pytest.raises(ValueError, match="ef_search"):
        build_index(db, "hnsw", ef_search=0)
    with pytest.raises(ValueError, match="width 4"):
        index.search(torch.randn(2, 4), 3)


def test_missing_faiss_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ImportError, match=r'mrl-vision\[retrieval\]'):
        build_index(torch.randn(5, 4), "flat")
    # The exact backend needs no faiss.
    assert search(torch.randn(5, 4), torch.randn(2, 4), 4, 2).shape == (2, 2)


def test_faiss_flat_equals_exact(faiss_one_thread):
    g = torch.Generator().manual_seed(4)
    database, queries = torch.randn(2000, 32, generator=g), torch.randn(100, 32, generator=g)
    exact = search(database, queries, 16, 10)
    flat = search(database, queries, 16, 10, index="flat")
    assert torch.equal(flat, exact)
    index = build_index(normalize_prefix(database, 16), "flat")
    assert (index.kind, index.ntotal, index.bytes_per_vector) == ("flat", 2000, 64.0)


def test_faiss_approximate_indexes_recall(faiss_one_thread):
    database, _, queries, _ = clustered(4000, 200)
    exact = search(database, queries, 64, 10)
    for kind, bytes_per_vector in [("fp16", 128.0), ("sq8", 64.0)]:
        index = build_index(normalize_prefix(database, 64), kind)
        assert index.bytes_per_vector == bytes_per_vector
        found = index.search(normalize_prefix(queries, 64), 10)[1]
        assert overlap(found, exact) > 0.9, kind
    hnsw = search(database, queries, 64, 10, index="hnsw", hnsw_m=16, ef_search=64, ef_construction=100)
    assert overlap(hnsw, exact) > 0.95
    assert build_index(normalize_prefix(database[:100], 64), "hnsw", hnsw_m=16).bytes_per_vector == 256.0


# ----------------------------------------------------------------------------- cascades
def test_rerank_and_cascades_covering_the_database_equal_exact():
    g = torch.Generator().manual_seed(5)
    database, queries = torch.randn(300, 32, generator=g), torch.randn(40, 32, generator=g)
    n = database.shape[0]
    exact_32 = search(database, queries, 32, 10)
    # Funnel whose first shortlist is the whole database.
    assert torch.equal(funnel_search(database, queries, [(8, n), (16, n), (32, 10)]), exact_32)
    assert torch.equal(funnel_search(database, queries, [(8, n), (32, 20)], k=10), exact_32)
    # Adaptive with shortlist = N.
    assert torch.equal(adaptive_search(database, queries, 8, n, 32, 10), exact_32)
    # Re-ranking every row gives the exact ranking.
    everything = torch.arange(n).repeat(40, 1).flip(1)  # candidate order must not matter
    assert torch.equal(rerank(database, queries, everything, 32, 10), exact_32)


def test_cascade_bad_inputs():
    db, q = torch.randn(50, 16), torch.randn(4, 16)
    with pytest.raises(ValueError, match="stage 1"):
        funnel_search(db, q, [(8, 20), (4, 10)])  # dims go down
    with pytest.raises(ValueError, match="stage 2"):
        funnel_search(db, q, [(4, 20), (8, 10), (16, 15)])  # keeps go up
    with pytest.raises(ValueError, match="60"):
        funnel_search(db, q, [(4, 60), (8, 10)])  # first keep above N
    with pytest.raises(ValueError, match="k=11"):
        funnel_search(db, q, [(4, 20), (8, 10)], k=11)
    with pytest.raises(ValueError, match="k=30"):
        adaptive_search(db, q, 4, 20, 16, 30)
    with pytest.raises(ValueError, match="k=5"):
        rerank(db, q, torch.zeros(4, 3, dtype=torch.long), 8, 5)
    with pytest.raises(ValueError, match="50"):
        rerank(db, q, torch.full((4, 3), 50), 8, 2)


def test_search_cost():
    # N = 1000: full search at 64 dims = 1000 * 64.
    assert search_cost(1000, [(64, 10)]) == 64_000
    # adaptive 16:200:512 = 1000*16 + 200*512 = 16_000 + 102_400.
    assert search_cost(1000, [(16, 200), (512, 10)]) == 118_400
    # funnel: 1000*16 + 800*32 + 400*64 + 200*128 + 50*512 = 16000 + 25600 + 25600 + 25600 + 25600.
    assert search_cost(1000, [(16, 800), (32, 400), (64, 200), (128, 50), (512, 10)]) == 118_400
    with pytest.raises(ValueError):
        search_cost(0, [(8, 1)])
    with pytest.raises(ValueError):
        search_cost(10, [])


# ----------------------------------------------------------------------------- metrics
def test_retrieval_metrics_by_hand():
    # Database counts per class: 0 -> 3, 1 -> 2, 2 -> 5, 3 -> none.
    database_labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    query_labels = torch.tensor([0, 1, 3, 2])
    neighbor_labels = torch.tensor([
        [0, 1, 0, 2, 9],  # rel 1010: sum prec = 1 + 2/3 = 5/3; ref 5/12; R=3 -> AP 5/9; recall 2/3; vote 0 ok
        [2, 1, 2, 1, 9],  # rel 0101: sum prec = 1/2 + 2/4 = 1; ref 1/4; R=2 -> AP 1/2; recall 1; tie 2/1 -> 2 wrong
        [2, 2, 0, 1, 9],  # class 3 absent from the database: AP 0, recall 0, no hit
        [2, 0, 0, 2, 9],  # rel 1001: sum prec = 1 + 2/4 = 3/2; ref 3/8; R=5 -> min(4,5)=4 -> AP 3/8;
    ])                    # recall 2/5; tie 2/0 -> 2 (met first) correct. Column 5 lies beyond k and is ignored.
    m = retrieval_metrics(neighbor_labels, query_labels, database_labels, k=4)
    assert list(m) == metric_columns(4)[1:]
    expected = {
        "nn1_top1": 50.0,                                   # queries 0 and 3
        "knn_top1": 50.0,                                   # queries 0 and 3
        "map_at_4_ref": 100 * (5 / 12 + 1 / 4 + 0 + 3 / 8) / 4,  # = 100 * 25/96
        "map_at_4": 100 * (5 / 9 + 1 / 2 + 0 + 3 / 8) / 4,       # = 100 * 103/288
        "precision_at_4": 100 * (2 + 2 + 0 + 2) / 16,       # 37.5
        "recall_at_4": 100 * (2 / 3 + 1 + 0 + 2 / 5) / 4,   # = 100 * 31/60
        "hit_at_4": 75.0,
    }
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, abs=1e-4), key


def test_map_conventions_differ_when_few_relevant():
    # Class 1 has 2 items; both retrieved first at k=4: the usual AP is 1, the reference's 2/4.
    m = retrieval_metrics(torch.tensor([[1, 1, 0, 0]]), torch.tensor([1]), torch.tensor([0, 0, 0, 1, 1]), k=4)
    assert m["map_at_4"] == pytest.approx(100.0)
    assert m["map_at_4_ref"] == pytest.approx(50.0)
    assert m["recall_at_4"] == pytest.approx(100.0)
    assert m["precision_at_4"] == pytest.approx(50.0)


def test_retrieval_metrics_bad_inputs():
    with pytest.raises(ValueError, match="k=3"):
        retrieval_metrics(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2), torch.zeros(4), 3)
    with pytest.raises(ValueError, match="3 labels"):
        retrieval_metrics(torch.zeros(2, 2, dtype=torch.long), torch.zeros(3), torch.zeros(4), 2)


def test_metric_columns():
    assert metric_columns(10) == ["dim", "nn1_top1", "knn_top1", "map_at_10_ref", "map_at_10", "precision_at_10",
                                  "recall_at_10", "hit_at_10"]


# ----------------------------------------------------------------------------- parsing
def test_parse_adaptive():
    assert parse_adaptive("16:200:512") == (16, 200, 512)
    assert parse_adaptive(" 8 : 50 : 64 ") == (8, 50, 64)
    for bad in ["16:200", "16:200:512:3", "a:b:c", "16:0:512", ""]:
        with pytest.raises(ValueError, match="adaptive spec"):
            parse_adaptive(bad)


def test_parse_funnel():
    assert parse_funnel("16:800,32:400,64:200,128:50,512:10") == [(16, 800), (32, 400), (64, 200), (128, 50), (512, 10)]
    assert parse_funnel("8:100") == [(8, 100)]
    for bad in ["16:800,32", "16:800;32:400", "x:1", "16:0", "32:100,16:50", "16:100,32:200", ""]:
        with pytest.raises(ValueError, match="funnel spec"):
            parse_funnel(bad)


# ----------------------------------------------------------------------------- evaluate_retrieval
def test_evaluate_retrieval_rows():
    database, db_labels, queries, q_labels = clustered(600, 40, width=32, clusters=8, seed=6)
    rows, cascades = evaluate_retrieval(database, db_labels, queries, q_labels, k=5,
                                        adaptive=[(8, 50, 32)], funnel=[[(8, 600), (16, 100), (32, 5)]])
    assert [r["dim"] for r in rows] == [8, 16, 32]  # default_dims(32)
    assert list(rows[0])[:8] == metric_columns(5)
    assert rows[0]["cost"] == 600 * 8 and rows[0]["index"] == "exact"
    assert rows[-1]["nn1_top1"] > 90  # well separated clusters
    adaptive, funnel = cascades
    assert (adaptive["method"], adaptive["stages"], adaptive["dim"]) == ("adaptive", "8:50,32:5", 32)
    assert adaptive["cost"] == 600 * 8 + 50 * 32
    assert adaptive["cost_ratio"] == pytest.approx(600 * 32 / (600 * 8 + 50 * 32))
    assert (funnel["method"], funnel["stages"]) == ("funnel", "8:600,16:100,32:5")
    # The funnel's first stage covers the database: the last dim's exact metrics.
    for key in metric_columns(5)[1:]:
        assert funnel[key] == pytest.approx(rows[-1][key]), key


@pytest.mark.parametrize("change, match", [
    ({"dims": [8, 40]}, "40"),
    ({"k": 101}, "k=101"),
    ({"queries": torch.randn(5, 16)}, "width 16"),
    ({"query_labels": torch.zeros(4, dtype=torch.long)}, "4 labels"),
    ({"database_labels": torch.zeros(99, dtype=torch.long)}, "99 labels"),
    ({"index": "ivf"}, "'ivf'"),
    ({"funnel": [[(16, 50), (8, 10)]]}, "stage 1"),
    ({"funnel": [[(8, 50), (16, 60)]]}, "stage 1"),
    ({"adaptive": [(8, 5, 32)]}, "shortlist 5"),
    ({"adaptive": [(8, 50, 33)]}, "rerank_dim=33"),
    ({"hnsw_m": 0}, "hnsw_m"),
])
def test_evaluate_retrieval_bad_inputs(change, match, monkeypatch):
    calls = []
    monkeypatch.setattr(R, "search", lambda *a, **kw: calls.append(a))  # nothing may be searched
    args = {"database": torch.randn(100, 32), "database_labels": torch.zeros(100, dtype=torch.long),
            "queries": torch.randn(5, 32), "query_labels": torch.zeros(5, dtype=torch.long), "k": 10}
    args.update(change)
    with pytest.raises(ValueError, match=match):
        evaluate_retrieval(**args)
    assert not calls


def test_index_kinds():
    assert INDEX_KINDS == ("exact", "flat", "hnsw", "fp16", "sq8")
