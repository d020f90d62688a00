"""The Matryoshka embedding loss (any pytorch-metric-learning loss on every prefix), its DDP gather, the
retrieval metric of embedders and the multi-view data.

- The wrapped loss equals the base loss computed by hand on each normalised prefix, weighted (a shared
  parameter-free loss, ArcFace with one set of class centres per size, a loss with its miner).
- ``n_dims_per_step`` follows the seed: the same (seed, step) draws the same sizes, and only those count.
- Bad input fails at construction naming the value.
- Under 2-process DDP (gloo), the loss of each rank's half of the batch, gathered, and the gradients after
  DDP's average equal one process's on the whole batch (ranks of 9 and 7 samples: the padding path).
- Leave-one-out retrieval never returns the query itself, and the metric equals a computation by hand.
"""

from __future__ import annotations

import os

import pytest
import torch
from pytorch_metric_learning import losses, miners
from torch.nn import functional as F

from mrl_vision.embedding_loss import EmbeddingLoss, MatryoshkaEmbeddingLoss, gather_batch, view_ids
from mrl_vision.metrics import MatryoshkaRetrieval
from mrl_vision.retrieval import knn_vote, leave_one_out_search

DIMS = [4, 8, 16]


def _batch(n: int = 24, d: int = 16, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, requires_grad=True), torch.arange(n) % classes


def test_equals_the_base_loss_by_hand_on_each_prefix():
    z, y = _batch()
    wrapped = MatryoshkaEmbeddingLoss("SupConLoss", DIMS, weights=[0.5, 1.0, 2.0], loss_kwargs={"temperature": 0.2})
    base = losses.SupConLoss(temperature=0.2)
    expected = sum(w * base(F.normalize(z[:, :m], dim=-1), y) for w, m in zip([0.5, 1.0, 2.0], DIMS))
    torch.testing.assert_close(wrapped(z, y), expected)
    parts = wrapped.per_size(z, y)
    assert sorted(parts) == DIMS
    torch.testing.assert_close(parts[8], base(F.normalize(z[:, :8], dim=-1), y))
    # without normalisation the prefix goes in as it is
    raw = MatryoshkaEmbeddingLoss(losses.ContrastiveLoss(), DIMS, normalize=False)
    torch.testing.assert_close(raw(z, y), sum(losses.ContrastiveLoss()(z[:, :m], y) for m in DIMS))


def test_arcface_gets_one_set_of_centres_per_size_and_they_train():
    z, y = _batch()
    wrapped = MatryoshkaEmbeddingLoss("ArcFaceLoss", DIMS, num_classes=4, loss_kwargs={"margin": 20.0})
    assert [tuple(p.shape) for p in wrapped.parameters()] == [(m, 4) for m in DIMS]  # W [embedding_size, C]
    expected = 0.0
    for m, loss in zip(DIMS, wrapped.losses):
        ref = losses.ArcFaceLoss(4, m, margin=20.0)
        ref.load_state_dict(loss.state_dict())
        expected = expected + ref(F.normalize(z[:, :m], dim=-1), y)
    value = wrapped(z, y)
    torch.testing.assert_close(value, expected)
    value.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in wrapped.parameters())


def test_miner_pairs_reach_the_loss():
    z, y = _batch()
    wrapped = MatryoshkaEmbeddingLoss("MultiSimilarityLoss", DIMS, miner="MultiSimilarityMiner",
                                      miner_kwargs={"epsilon": 0.1})
    loss, miner = losses.MultiSimilarityLoss(), miners.MultiSimilarityMiner(epsilon=0.1)
    expected = 0.0
    for m in DIMS:
        e = F.normalize(z[:, :m], dim=-1)
        expected = expected + loss(e, y, miner(e, y))
    torch.testing.assert_close(wrapped(z, y), expected)
    assert not torch.allclose(wrapped(z, y), MatryoshkaEmbeddingLoss("MultiSimilarityLoss", DIMS)(z, y))


def test_n_dims_per_step_follows_the_seed():
    z, y = _batch()
    a = MatryoshkaEmbeddingLoss("SupConLoss", DIMS, n_dims_per_step=2, seed=7)
    b = MatryoshkaEmbeddingLoss("SupConLoss", DIMS, n_dims_per_step=2, seed=7)
    c = MatryoshkaEmbeddingLoss("SupConLoss", DIMS, n_dims_per_step=2, seed=8)
    draws = [a.step_sizes(s) for s in range(20)]
    assert draws == [b.step_sizes(s) for s in range(20)]
    assert draws != [c.step_sizes(s) for s in range(20)]
    assert all(len(d) == 2 and len(set(d)) == 2 for d in draws)
    assert {i for d in draws for i in d} == {0, 1, 2}  # every size gets its turn
    base = losses.SupConLoss()
    for step in (0, 5):
        sizes = [DIMS[i] for i in a.step_sizes(step)]
        torch.testing.assert_close(a(z, y, step=step), sum(base(F.normalize(z[:, :m], dim=-1), y) for m in sizes))
        assert sorted(a.per_size(z, y, step=step)) == sizes
    assert sorted(a.per_size(z, y, every_size=True)) == DIMS  # evaluation: all sizes
    assert MatryoshkaEmbeddingLoss("SupConLoss", DIMS, n_dims_per_step=-1).step_sizes(3) == [0, 1, 2]


@pytest.mark.parametrize("build, named", [
    (lambda: MatryoshkaEmbeddingLoss("SupConLoss", [8, 32], width=16), "size 32"),
    (lambda: MatryoshkaEmbeddingLoss("SupConLoss", DIMS, weights=[1.0, 1.0]), "got 2"),
    (lambda: MatryoshkaEmbeddingLoss("SupConLoss", DIMS, weights=[1.0, -1.0, 1.0]), "-1.0"),
    (lambda: MatryoshkaEmbeddingLoss("SupConLoss", DIMS, n_dims_per_step=0), "0"),
    (lambda: MatryoshkaEmbeddingLoss("NoSuchLoss", DIMS), "NoSuchLoss"),
    (lambda: MatryoshkaEmbeddingLoss("ArcFaceLoss", DIMS), "num_classes"),
    (lambda: MatryoshkaEmbeddingLoss(losses.ArcFaceLoss(4, 16), DIMS), "ArcFaceLoss has parameters"),
    (lambda: MatryoshkaEmbeddingLoss("SupConLoss", DIMS, loss_kwargs={"temprature": 0.1}), "temprature"),
    (lambda: EmbeddingLoss(loss="ArcFaceLoss", targets="views").build(DIMS, 16, 4), "needs class labels"),
    (lambda: EmbeddingLoss(loss="SupConLoss", targets="pairs").build(DIMS, 16, 4), "pairs"),
    (lambda: EmbeddingLoss.from_any({"loss": "SupConLoss", "n_dim_per_step": 1}), "n_dim_per_step"),
])
def test_bad_input_fails_at_construction_naming_the_value(build, named):
    with pytest.raises(ValueError, match=named):
        build()


def test_bad_batches_name_the_shapes():
    loss = MatryoshkaEmbeddingLoss("SupConLoss", DIMS)
    with pytest.raises(ValueError, match="width 8"):
        loss(torch.randn(4, 8), torch.arange(4))
    with pytest.raises(ValueError, match="needs labels"):
        loss(torch.randn(4, 16), None)
    with pytest.raises(ValueError, match=r"\[4\]"):
        loss(torch.randn(4, 16), torch.arange(3))


def test_view_ids_are_unique_across_ranks():
    ids = [view_ids(3, 2, rank, 2) for rank in range(2)]
    assert ids[0].tolist() == [0, 0, 2, 2, 4, 4] and ids[1].tolist() == [1, 1, 3, 3, 5, 5]


# ----------------------------------------------------------------------------- DDP
def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)  # a forked child: no OpenMP pool inherited from the parent's state
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = torch.nn.Linear(6, 16)
    x, y = torch.randn(16, 6, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 3
    part = slice(0, 9) if rank == 0 else slice(9, 16)  # unequal shards: the gather pads and cuts back
    ddp = DistributedDataParallel(net)
    loss = MatryoshkaEmbeddingLoss("NTXentLoss", DIMS, loss_kwargs={"temperature": 0.5})
    value = loss(ddp(x[part]), y[part])
    value.backward()
    z_all, y_all = gather_batch(x[part], y[part])
    torch.save({"loss": value.detach(), "grads": [p.grad for p in net.parameters()], "x": z_all, "y": y_all},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(180)  # a hung rank fails the test instead of the suite
def test_two_process_loss_and_gradients_equal_one_process(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children start with this process's imports (a spawned interpreter re-imports torch and timm)
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    torch.manual_seed(0)
    net = torch.nn.Linear(6, 16)
    x, y = torch.randn(16, 6, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 3
    value = MatryoshkaEmbeddingLoss("NTXentLoss", DIMS, loss_kwargs={"temperature": 0.5})(net(x), y)
    value.backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["x"], x)  # every rank sees the whole batch, in rank order
        assert got["y"].tolist() == y.tolist()
        torch.testing.assert_close(got["loss"], value.detach())
        for g, p in zip(got["grads"], net.parameters()):
            torch.testing.assert_close(g, p.grad)


# ----------------------------------------------------------------------------- retrieval within a split
def test_leave_one_out_never_returns_the_query_even_beside_duplicates():
    z = F.normalize(torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0], [0.6, 0.8]]), dim=1)
    idx = leave_one_out_search(z, 3)
    assert all(i not in row for i, row in enumerate(idx.tolist()))
    assert idx[0].tolist() == [1, 2, 3] and idx[4].tolist()[0] == 5
    with pytest.raises(ValueError, match="k=6"):
        leave_one_out_search(z, 6)


def test_retrieval_metric_equals_the_computation_by_hand():
    z, y = torch.randn(40, 16, generator=torch.Generator().manual_seed(3)), torch.arange(40) % 5
    metric = MatryoshkaRetrieval(DIMS, recall_at=(1, 4), knn_k=5)
    metric.update(z[:17], y[:17])
    metric.update(z[17:], y[17:])
    got = metric.compute()
    for m in DIMS:
        e = F.normalize(z[:, :m], dim=1)
        sim = e @ e.T
        sim.fill_diagonal_(-float("inf"))
        order = sim.argsort(dim=1, descending=True, stable=True)
        near = y[order[:, :5]]
        for k in (1, 4):
            assert float(got[f"recall{k}@{m}"]) == pytest.approx(float((near[:, :k] == y[:, None]).any(1).float().mean()))
        assert float(got[f"knn_top1@{m}"]) == pytest.approx(float((knn_vote(near) == y).float().mean()))


def test_supcon_on_two_views_is_ntxent():
    """SupConLoss on instance ids of two views (what the SimCLR config trains with: O(N^2)) is not exactly
    pytorch-metric-learning's NTXentLoss (O(N^3)) at every prefix, gradients included."""
    z = torch.randn(24, 32, generator=torch.Generator().manual_seed(3), requires_grad=True)
    views = torch.arange(12).repeat(2)
    kw = {"loss_kwargs": {"temperature": 0.5}}
    a = MatryoshkaEmbeddingLoss("NTXentLoss", [8, 16, 32], **kw)(z, views)
    (ga,) = torch.autograd.grad(a, z)
    b = MatryoshkaEmbeddingLoss("SupConLoss", [8, 16, 32], **kw)(z, views)
    (gb,) = torch.autograd.grad(b, z)
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(ga, gb, atol=1e-6)
