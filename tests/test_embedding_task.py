"""Training with an embedding loss through the real CLI (`mrl-vision fit --model.embedding_loss ...`).

- A pure embedder (``head: none``) trained with SupCon on two views of each digit: validation logs
  per-size retrieval within the split, equal to a computation by hand from the checkpoint; the checkpoint
  is a ``MatryoshkaModel`` without a head that records its classes; ``predict`` refuses it clearly.
- Cross-entropy + ArcFace beside an MRL head: ArcFace's class centres of every size reach the optimizer.
- SimCLR's NT-Xent on instance ids (``targets: views``) trains; with one view per image it refuses before
  any step.
- Image folders give several views of each training image (``views``), with SimCLR's colour distortion.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from conftest import CONFIG_DIR, TEST_RESNET_DIMS
from mrl_vision import MatryoshkaModel
from mrl_vision.data import ImageFolderDataModule, QuickstartDataModule
from mrl_vision.retrieval import knn_vote

SUPCON = CONFIG_DIR / "quickstart_supcon.yaml"
FAST = ["--model.backbone", "test_resnet", "--trainer.accelerator", "cpu", "--data.init_args.batch_size", "32",
        "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"]


def _cli(args, work: Path, monkeypatch):
    from mrl_vision.cli import cli

    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "argv", ["mrl-vision"])
    return cli(args)


def _metrics(c) -> list[dict]:
    with open(Path(c.log_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def supcon_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("supcon")
    with pytest.MonkeyPatch.context() as mp:
        c = _cli(["fit", "--config", str(SUPCON), *FAST], work, mp)
        c.log_dir = Path(c.trainer.log_dir).resolve()
        return c, Path(c.trainer.checkpoint_callback.last_model_path).resolve()


def test_embedder_logs_retrieval_equal_to_the_computation_by_hand(supcon_run):
    c, ckpt = supcon_run
    rows = _metrics(c)
    logged = {k: float(v) for r in rows for k, v in r.items() if v and k.startswith("val/")}
    assert {f"val/recall1@{m}" for m in TEST_RESNET_DIMS} <= set(logged)
    assert "val/loss_embedding" in logged and not any(k.startswith("val/top1") for k in logged)
    assert (c.log_dir / "val_retrieval.csv").is_file()
    model = MatryoshkaModel.from_checkpoint(ckpt)
    assert model.head is None and model.num_classes == 10 and model.class_names == [str(d) for d in range(10)]
    dm = QuickstartDataModule(batch_size=100)
    z = torch.cat([model.features(x) for x, _ in dm.eval_dataloader("val")]).detach()
    y = torch.cat([y for _, y in dm.eval_dataloader("val")])
    for m in (8, 96):
        e = F.normalize(z[:, :m], dim=1)
        sim = e @ e.T
        sim.fill_diagonal_(-float("inf"))
        near = y[sim.argsort(dim=1, descending=True, stable=True)[:, :10]]
        assert logged[f"val/recall1@{m}"] == pytest.approx(float((near[:, 0] == y).float().mean()), abs=1e-6)
        assert logged[f"val/recall8@{m}"] == pytest.approx(float((near[:, :8] == y[:, None]).any(1).float().mean()),
                                                           abs=1e-6)
        assert logged[f"val/knn_top1@{m}"] == pytest.approx(float((knn_vote(near) == y).float().mean()), abs=1e-6)


def test_embedder_refuses_to_predict(supcon_run, tmp_path, monkeypatch):
    _, ckpt = supcon_run
    with pytest.raises(ValueError, match="no classifier head"):
        _cli(["predict", "--config", str(SUPCON), *FAST, "--ckpt_path", str(ckpt)], tmp_path, monkeypatch)


def test_cross_entropy_plus_arcface_trains_every_size_s_centres(tmp_path, monkeypatch):
    c = _cli(["fit", "--config", str(CONFIG_DIR / "quickstart.yaml"), *FAST, "--trainer.limit_val_batches", "2",
              "--trainer.callbacks", "[]", "--model.embedding_loss.loss", "ArcFaceLoss",
              "--model.embedding_loss.weight", "0.5"], tmp_path, monkeypatch)
    task, c.log_dir = c.model, c.trainer.log_dir
    centres = list(task.embedding_loss.parameters())
    assert [tuple(p.shape) for p in centres] == [(m, 10) for m in TEST_RESNET_DIMS]
    in_optimizer = {id(p) for g in c.trainer.optimizers[0].param_groups for p in g["params"]}
    assert all(id(p) in in_optimizer for p in centres)
    c.trainer.save_checkpoint(tmp_path / "arcface.ckpt")
    fresh = torch.load(tmp_path / "arcface.ckpt", weights_only=False)["state_dict"]
    assert "embedding_loss.losses.0.W" in fresh
    rows = _metrics(c)
    assert any(r.get("train/loss_ce") for r in rows) and any(r.get("train/loss_embedding") for r in rows)
    assert any(r.get("val/top1@8") for r in rows) and any(r.get("val/recall1@8") for r in rows)


def test_simclr_views_train_and_one_view_refuses_before_any_step(tmp_path, monkeypatch):
    ssl = ["--model.embedding_loss.loss", "NTXentLoss", "--model.embedding_loss.targets", "views",
           "--model.embedding_loss.loss_kwargs", "{temperature: 0.5}", "--trainer.limit_val_batches", "1"]
    c = _cli(["fit", "--config", str(SUPCON), *FAST, *ssl], tmp_path, monkeypatch)
    assert c.trainer.global_step == 2
    with pytest.raises(ValueError, match="1 view per image"):
        _cli(["fit", "--config", str(SUPCON), *FAST, *ssl, "--data.init_args.views", "1"], tmp_path, monkeypatch)


def test_head_none_without_an_embedding_loss_refuses(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="embedding_loss"):
        _cli(["fit", "--config", str(SUPCON), *FAST, "--model.embedding_loss", "null"], tmp_path, monkeypatch)


def test_image_folders_give_several_views(jpeg_tree):
    dm = ImageFolderDataModule(str(jpeg_tree), image_size=32, batch_size=4, num_workers=0, views=2,
                               color_jitter=0.5, grayscale=0.2)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 2, 3, 32, 32) and y.shape == (4,)
    assert not torch.equal(x[:, 0], x[:, 1])  # independent draws
    xv, _ = next(iter(dm.val_dataloader()))
    assert xv.shape[1:] == (3, 32, 32)  # evaluation: one view
    for bad, named in (({"views": 0}, "views"), ({"color_jitter": 1.5}, "color_jitter"),
                       ({"grayscale": -0.1}, "grayscale")):
        with pytest.raises(ValueError, match=named):
            ImageFolderDataModule(str(jpeg_tree), image_size=32, batch_size=4, num_workers=0, **bad)


def test_open_set_folders_label_evaluation_splits_by_their_own_classes(tmp_path, monkeypatch):
    """The deep-metric-learning protocol: train on cat/dog/fox, retrieve among owl/yak; a classifier refuses."""
    from conftest import write_jpeg_tree

    write_jpeg_tree(tmp_path / "a", classes=("cat", "dog", "fox"), train_per_class=6, val_per_class=1)
    write_jpeg_tree(tmp_path / "b", classes=("owl", "yak"), train_per_class=1, val_per_class=5, seed=1)
    root = tmp_path / "a"
    (root / "val").rename(tmp_path / "unused")
    (tmp_path / "b" / "val").rename(root / "val")
    dm = ImageFolderDataModule(str(root), image_size=32, batch_size=4, num_workers=0, open_set=True)
    assert dm.class_names == ["cat", "dog", "fox"] and dm.split_class_names("val") == ["owl", "yak"]
    with pytest.raises(ValueError, match="lacks"):
        ImageFolderDataModule(str(root), image_size=32, batch_size=4, num_workers=0).dataset("val")
    data = ["--data", "mrl_vision.data.ImageFolderDataModule", "--data.root", str(root), "--data.image_size", "32",
            "--data.batch_size", "6", "--data.num_workers", "0", "--data.open_set", "true", "--data.views", "2"]
    args = ["fit", "--config", str(SUPCON), *FAST, *data, "--trainer.limit_train_batches", "1"]
    c = _cli(args, tmp_path, monkeypatch)
    c.log_dir = c.trainer.log_dir
    rows = _metrics(c)
    assert any(r.get("val/recall1@8") for r in rows)
    with pytest.raises(ValueError, match="open_set"):
        _cli([*args[:2], str(CONFIG_DIR / "quickstart.yaml"), *args[3:], "--trainer.callbacks", "[]",
              "--model.head", "mrl", "--model.embedding_loss", "null"], tmp_path, monkeypatch)


@pytest.mark.parametrize("kwargs, named", [
    ({"head": "none"}, "give model.embedding_loss"),
    ({"head": "none", "embedding_loss": {"loss": "SupConLoss"}, "freeze_backbone": True}, "nothing would train"),
    ({"head": "ff_projection", "dims": [8], "embedding_loss": {"loss": "SupConLoss"}}, "ff_projection"),
    ({"embedding_loss": {"loss": "SupConLoss"}, "mixup_alpha": 0.8}, "soft ones"),
    ({"embedding_loss": {"loss": "SupConLoss", "weight": -1.0}}, "-1.0"),
    ({"embedding_loss": {"loss": "SupConLoss", "weights": [1.0]}}, "got 1"),
    ({"embedding_loss": {"loss": "ArcFaceLoss", "targets": "views"}}, "needs class labels"),
    ({"head": "none", "embedding_loss": {"loss": "SupConLoss"}, "dims": [8, 128]}, "128"),
])
def test_task_refuses_bad_combinations_at_construction(kwargs, named):
    from mrl_vision import MatryoshkaClassifier

    with pytest.raises(ValueError, match=named):
        MatryoshkaClassifier(num_classes=10, backbone="test_resnet", **kwargs)
