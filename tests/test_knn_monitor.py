"""``KNNMonitor``: per-size kNN top-1 of the validation images against a bank of training embeddings.

- the logged ``val/knn_top1@m`` equal a computation by hand (model.features of the bank and validation
  images, normalised prefixes, cosine top-k, majority or exp(sim / T)-weighted vote), exactly, for
  map-style and FFCV data;
- ``validation_step`` returns the pooled embedding beside unchanged logits (with and without flip TTA);
- through the real CLI (``--trainer.callbacks+=...``) the key is logged for every size, only at the
  validations ``every_n_epochs`` asks for, never in the sanity check;
- bad arguments raise ``ValueError`` naming the value;
- ``mrl-vision validate`` with 2 DDP processes logs the values of 1 process (``slow``).
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from conftest import QUICKSTART_ARGS, TEST_RESNET_DIMS, write_jpeg_tree
from mrl_vision import MatryoshkaClassifier
from mrl_vision.callbacks import KNNMonitor
from mrl_vision.retrieval import knn_vote
from mrl_vision.data import ImageFolderDataModule, QuickstartDataModule
from mrl_vision.data.quickstart import DigitsDataset

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning")


class MixedDigits(QuickstartDataModule):
    """The quickstart digits in a seeded random order (they come class by class): the first samples
    of a split hold every class."""

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        super().setup(stage)
        gen = torch.Generator().manual_seed(1)
        for name, d in self.datasets.items():
            order = torch.randperm(len(d), generator=gen)
            self.datasets[name] = DigitsDataset(d.images[order], d.labels[order], d.transform)


def _briefly_trained(task: MatryoshkaClassifier, dm, steps: int = 4) -> L.Trainer:
    """``steps`` SGD steps of ``task`` on ``dm`` (features worth a kNN); the trainer."""
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(task, datamodule=dm)
    return trainer


@pytest.fixture(scope="module")
def trained():
    L.seed_everything(0)
    task = MatryoshkaClassifier(num_classes=10, backbone="test_resnet", lr=0.05, lr_schedule="constant")
    dm = MixedDigits(batch_size=16)
    _briefly_trained(task, dm)
    return task, dm


def _features(model, loader, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled embeddings and labels of a loader's first ``limit`` samples, a batch at a time."""
    zs, ys = [], []
    with torch.no_grad():
        for x, y in loader:
            zs.append(model.features(x))
            ys.append(y.clone())  # FFCV reuses its label buffers
            if limit is not None and sum(len(v) for v in ys) >= limit:
                break
    z, y = torch.cat(zs), torch.cat(ys)
    return (z, y) if limit is None else (z[:limit], y[:limit])


def _by_hand(model, dm, bank_size: int, k: int, sizes, val_samples: int | None, temperature=None) -> dict[str, float]:
    """``val/knn_top1@m`` computed directly: a bank of ``bank_size`` training samples spread evenly over the
    split, cosine top-k on normalised prefixes, then the vote (a tie: the label of the nearer neighbour)."""
    model.eval()
    train = dm.dataset("train", evaluate=True) if not hasattr(dm, "make_loader") else None
    if train is None:  # FFCV: no map-style dataset; every training sample, then the picked ones
        z_all, y_all = _features(model, dm.eval_dataloader("train"))
        total = len(y_all)
    else:
        total = len(train)
    pick = [i * total // min(bank_size, total) for i in range(min(bank_size, total))]
    if train is None:
        zb, yb = z_all[pick], y_all[pick]
    else:
        with torch.no_grad():
            zb = model.features(torch.stack([train[i][0] for i in pick]))
        yb = torch.tensor([int(train[i][1]) for i in pick])
    zv, yv = _features(model, dm.val_dataloader(), val_samples)
    out = {}
    for m in sizes:
        sim = F.normalize(zv[:, :m], dim=1) @ F.normalize(zb[:, :m], dim=1).T
        top = sim.topk(k, dim=1)
        correct = 0
        for labels, sims, truth in zip(yb[top.indices].tolist(), top.values.tolist(), yv.tolist()):
            votes: dict[int, float] = {}
            for label, s in zip(labels, sims):  # dict order: labels as first met in rank order
                votes[label] = votes.get(label, 0.0) + (1.0 if temperature is None else math.exp(s / temperature))
            best = max(votes.values())
            correct += next(label for label, v in votes.items() if v == best) == truth
        out[f"val/knn_top1@{m}"] = float(torch.tensor(correct / len(yv), dtype=torch.float64).float())
    return out


def _validate(task, dm, monitor: KNNMonitor, batches: int | None) -> dict[str, float]:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=batches, callbacks=[monitor])
    trainer.validate(task, datamodule=dm, verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/knn")}


# ----------------------------------------------------------------------------- the values
@pytest.mark.parametrize("temperature", [None, 0.07])
def test_logged_values_equal_the_computation_by_hand(trained, temperature):
    """The monitor's bank, search or vote differs from cosine kNN over bank_size evenly spaced training images."""
    task, dm = trained
    logged = _validate(task, dm, KNNMonitor(bank_size=50, k=5, temperature=temperature), batches=3)
    expected = _by_hand(task.model, dm, 50, 5, TEST_RESNET_DIMS, 48, temperature)
    assert logged == expected  # exactly, every size
    assert 0.2 < max(logged.values()) < 1.0  # neither chance (10 classes) nor trivially perfect


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba, when a loader is freed
def test_ffcv_bank_equals_the_computation_by_hand(tmp_path):
    """Through FFCV loaders (reused buffers, a subset of 13 of 30 samples, twice in a row)."""
    pytest.importorskip("ffcv")
    from mrl_vision.data import FFCVDataModule
    from mrl_vision.data.beton import write_beton

    images = write_jpeg_tree(tmp_path / "images", train_per_class=10, val_per_class=7, seed=5)
    for split in ("train", "val"):
        write_beton(str(images / split), tmp_path / f"{split}.beton", write_mode="raw", num_workers=1)
    dm = FFCVDataModule(train_path=str(tmp_path / "train.beton"), val_path=str(tmp_path / "val.beton"),
                        image_size=32, eval_image_size=32, eval_crop_ratio=1.0, batch_size=4, num_workers=1)
    torch.manual_seed(0)
    task = MatryoshkaClassifier(num_classes=3, backbone="test_resnet")
    first = _validate(task, dm, KNNMonitor(bank_size=13, k=3), batches=None)
    assert _validate(task, dm, KNNMonitor(bank_size=13, k=3), batches=None) == first
    assert first == _by_hand(task.model, dm, 13, 3, TEST_RESNET_DIMS, None)


def test_chosen_dims_only(trained):
    task, dm = trained
    logged = _validate(task, dm, KNNMonitor(bank_size=30, k=3, dims=[4, 40]), batches=2)
    assert logged == _by_hand(task.model, dm, 30, 3, [4, 40], 32)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
@pytest.mark.parametrize("flip", [False, True])
def test_validation_outputs_carry_the_embedding_and_unchanged_logits(flip):
    """validation_step's logits change with the embedding's extraction, or the embedding is the mirror's."""
    torch.manual_seed(0)
    task = MatryoshkaClassifier(num_classes=3, backbone="test_resnet", eval_flip_tta=flip).eval()
    x, y = torch.randn(5, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        out = task.validation_step((x, y), 0)
        assert torch.equal(out["logits"], task.model.eval_logits(x, flip))
        z = task.model.features(torch.cat([x, x.flip(-1)]))[:5] if flip else task.model.features(x)
    assert torch.equal(out["embedding"], z) and out["embedding"].shape == (5, 96)
    assert torch.equal(out["target"], y)


def test_vote_breaks_ties_towards_the_nearer_neighbour_and_weights_by_similarity():
    labels = torch.tensor([[2, 1, 1, 1], [3, 3, 0, 0], [1, 2, 2, 0]])
    assert knn_vote(labels).tolist() == [1, 3, 2]
    sims = torch.tensor([[0.9, 0.1, 0.1, 0.1], [0.5, 0.5, 0.5, 0.5], [0.8, 0.1, 0.1, 0.0]])
    # weighted: one close neighbour outweighs farther ones at a low temperature, not at a high one
    assert knn_vote(labels, sims, temperature=0.07).tolist() == [2, 3, 1]
    assert knn_vote(labels, sims, temperature=100.0).tolist() == [1, 3, 2]


# ----------------------------------------------------------------------------- the CLI
def test_cli_logs_every_size_at_the_chosen_epochs(tmp_path, monkeypatch):
    """Through `mrl-vision fit --trainer.callbacks+=...`: every size logged, at every second epoch only."""
    from mrl_vision.cli import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["mrl-vision"])
    c = cli(["fit", *QUICKSTART_ARGS, "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2",
             "--trainer.limit_val_batches", "2",
             "--trainer.callbacks+=mrl_vision.callbacks.KNNMonitor", "--trainer.callbacks.bank_size", "40",
             "--trainer.callbacks.k", "4", "--trainer.callbacks.every_n_epochs", "2"])
    monitor = [cb for cb in c.trainer.callbacks if isinstance(cb, KNNMonitor)]
    assert len(monitor) == 1 and (monitor[0].bank_size, monitor[0].k, monitor[0].every_n_epochs) == (40, 4, 2)
    with open(Path(c.trainer.log_dir) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for m in TEST_RESNET_DIMS:
        key = f"val/knn_top1@{m}"
        epochs = [int(r["epoch"]) for r in rows if r.get(key)]
        assert epochs == [1], (key, epochs)  # not epoch 0 (every 2nd epoch), not the sanity check
        assert 0.0 <= float(next(r[key] for r in rows if r.get(key))) <= 1.0
    assert any(r.get("val/top1@8") for r in rows if r["epoch"] == "0")  # validation itself ran at epoch 0


# ----------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("kwargs, named", [
    ({"bank_size": 5, "k": 10}, "bank_size=5"),
    ({"k": 0}, "k=0"),
    ({"bank_size": 0}, "bank_size=0"),
    ({"every_n_epochs": 0}, "every_n_epochs=0"),
    ({"temperature": 0.0}, "temperature=0.0"),
    ({"dims": []}, r"dims=\[\]"),
    ({"dims": [8, 0]}, "0 in dims"),
])
def test_bad_arguments_name_the_value(kwargs, named):
    with pytest.raises(ValueError, match=named):
        KNNMonitor(**kwargs)


def test_sizes_above_the_width_and_foreign_data_modules_fail_at_setup(trained):
    task, dm = trained
    with pytest.raises(ValueError, match=r"\[1, 96\].*200"):
        _validate(task, dm, KNNMonitor(bank_size=20, k=2, dims=[8, 200]), batches=1)

    class Plain(L.LightningDataModule):
        def val_dataloader(self):
            return dm.val_dataloader()

    with pytest.raises(ValueError, match="Plain"):
        _validate(task, Plain(), KNNMonitor(bank_size=20, k=2), batches=1)


# ----------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_two_process_validate_equals_one_process(tmp_path):
    """`mrl-vision validate` with 2 DDP processes builds another bank or miscounts the shards: its values
    differ from one process's (computed here by hand; the tests above show the monitor equals that)."""
    import yaml
    from test_ddp import _read_csv, _run, _trainer_args

    # 30 training JPEGs (the bank: 25 spread over them, of all 3 classes; shards of 13 and 12) and 21
    # validation JPEGs (shards of 11 and 10), batches of 4: partial batches everywhere
    images = write_jpeg_tree(tmp_path / "images", train_per_class=10, val_per_class=7, seed=5)
    data = {"root": str(images), "image_size": 32, "eval_crop_ratio": 1.0, "batch_size": 4, "num_workers": 0}
    L.seed_everything(0)
    task = MatryoshkaClassifier(num_classes=3, backbone="test_resnet", lr=0.05, lr_schedule="constant")
    dm = ImageFolderDataModule(**data)
    ckpt = tmp_path / "model.ckpt"
    _briefly_trained(task, dm, steps=3).save_checkpoint(ckpt)
    config = {
        "trainer": {"logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"name": "t"}},
                    "callbacks": [{"class_path": "mrl_vision.callbacks.KNNMonitor",
                                   "init_args": {"bank_size": 25, "k": 5}}]},
        "model": {"backbone": "test_resnet"},
        "data": {"class_path": "mrl_vision.data.ImageFolderDataModule", "init_args": data},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    _run(["validate", "--config", str(tmp_path / "config.yaml"), "--ckpt_path", str(ckpt),
          *_trainer_args(2, tmp_path / "runs")], tmp_path, "validate")
    rows = _read_csv(tmp_path / "runs" / "t" / "version_0" / "metrics.csv")
    logged = {k: float(v) for r in rows for k, v in r.items() if k.startswith("val/knn") and v}
    assert sorted(logged) == sorted(f"val/knn_top1@{m}" for m in TEST_RESNET_DIMS)
    # one process's values: by hand over the 25-image bank and every validation image once
    assert logged == _by_hand(task.model, dm, 25, 5, TEST_RESNET_DIMS, None)
