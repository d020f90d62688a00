"""The training recipe's options: RandAugment / TrivialAugment and random erasing, Mixup/CutMix soft targets
through the Matryoshka loss, and the EMA of the weights (values by hand, checkpoints, export)."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import TensorDataset
from torchvision.transforms import v2

from mrl_vision import MatryoshkaClassifier, MatryoshkaLoss, MatryoshkaModel
from mrl_vision.callbacks import EMA, AdaptiveClassificationCallback
from mrl_vision.data.augment import BatchAugment, parse_auto_augment
from mrl_vision.data.base import MatryoshkaDataModule
from mrl_vision.data.transforms import train_transform
from mrl_vision.mixup import BatchMixing


# ----------------------------------------------------------------- augmentation
@pytest.mark.parametrize("spec, ops, magnitude", [("rand-m9-n2", 2, 9), ("rand", 2, 9), ("rand-m15", 2, 15),
                                                  ("rand-n3", 3, 9), ("RAND-M0-N1", 1, 0)])
def test_randaugment_spec_is_parsed(spec, ops, magnitude):
    """An auto_augment spec does not give RandAugment with its operations and magnitude (of 31 bins)."""
    t = parse_auto_augment(spec)
    assert isinstance(t, v2.RandAugment)
    assert (t.num_ops, t.magnitude, t.num_magnitude_bins) == (ops, magnitude, 31)


def test_trivial_and_none_specs():
    assert isinstance(parse_auto_augment("trivial"), v2.TrivialAugmentWide)
    assert parse_auto_augment(None) is None and parse_auto_augment("none") is None


@pytest.mark.parametrize("spec, needle", [("rand-m9-mstd0.5", "rand-m9-mstd0.5"), ("autoaug", "autoaug"),
                                          ("rand-m31", "31"), ("rand-n0", "got 0")])
def test_bad_auto_augment_spec_fails_naming_it(spec, needle):
    with pytest.raises(ValueError, match=needle):
        parse_auto_augment(spec)


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_bad_random_erasing_fails_naming_it(p):
    with pytest.raises(ValueError, match=f"random_erasing must be a probability in \\[0, 1\\], got {p}"):
        BatchAugment(None, p)


def test_batch_augment_draws_per_image_and_erases_after_normalising():
    """Every image of a batch gets its own draw (identical images come out different), and random erasing
    works on the normalised images; with nothing on, the batch is only normalised."""
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    batch = image.expand(8, 3, 32, 32).contiguous()
    norm = lambda im: (im.float() - 128) / 64  # noqa: E731
    plain = BatchAugment(None, 0.0)
    assert not plain.active
    assert torch.equal(plain(batch, norm), norm(batch))
    out = BatchAugment("trivial", 0.0)(batch, norm)
    assert out.dtype == torch.float32 and out.shape == (8, 3, 32, 32)
    assert len({tuple(o.flatten()[:64].tolist()) for o in out}) > 1  # not one draw for the batch
    erased = BatchAugment(None, 1.0)(batch, norm)
    changed = (erased != norm(batch)).flatten(1).any(1)
    assert bool(changed.all())  # p = 1: every image erased, each in its own rectangle
    assert len({int((e != norm(batch[0])).sum()) for e in erased}) > 1
    with pytest.raises(ValueError, match="uint8"):
        plain(batch.float(), norm)


def test_image_folder_transform_has_the_options():
    """train_transform leaves out RandAugment before the float conversion or random erasing after Normalize."""
    ops = train_transform(32, auto_augment="rand-m9-n2", random_erasing=0.25).transforms
    names = [type(o).__name__ for o in ops]
    assert names.index("RandAugment") < names.index("ToDtype") < names.index("Normalize") < names.index("RandomErasing")
    out = train_transform(32, auto_augment="trivial", random_erasing=0.5)(torch.randint(0, 256, (3, 48, 40), dtype=torch.uint8))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_image_folder_module_takes_the_options(jpeg_tree):
    from mrl_vision.data import ImageFolderDataModule

    dm = ImageFolderDataModule(str(jpeg_tree), image_size=32, batch_size=4, num_workers=0,
                               auto_augment="rand-m7-n1", random_erasing=0.3)
    names = [type(o).__name__ for o in dm.train_tf.transforms]
    assert "RandAugment" in names and "RandomErasing" in names
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32)
    with pytest.raises(ValueError, match="'rand-x'"):
        ImageFolderDataModule(str(jpeg_tree), auto_augment="rand-x")


# ----------------------------------------------------------------- Mixup / CutMix
def test_loss_takes_soft_targets():
    """One-hot probabilities give the hard-label loss (label smoothing included); a mixed target gives the
    mix of the two losses; a target of the wrong shape fails naming it."""
    torch.manual_seed(0)
    logits, y = torch.randn(3, 6, 5), torch.randint(0, 5, (6,))
    loss = MatryoshkaLoss(3, [1.0, 0.5, 2.0], label_smoothing=0.1)
    assert torch.allclose(loss(logits, F.one_hot(y, 5).float()), loss(logits, y))
    y2 = y.flip(0)
    mixed = 0.3 * F.one_hot(y, 5).float() + 0.7 * F.one_hot(y2, 5).float()
    assert torch.allclose(loss(logits, mixed), 0.3 * loss(logits, y) + 0.7 * loss(logits, y2), atol=1e-6)
    with pytest.raises(ValueError, match=r"soft targets must be \[N, C\] = \[6, 5\], got \[6, 4\]"):
        loss(logits, torch.ones(6, 4) / 4)


def test_mixup_mixes_images_and_targets_alike():
    """Mixup's images are lam x + (1 - lam) x.flip(0) with the same lam as the targets; an odd batch's last
    image keeps its own label; the input batch is left untouched."""
    np.random.seed(0)
    x, y = torch.randn(7, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1, 2])
    before = x.clone()
    mixed, target = BatchMixing(0.8, 0.0, 1.0, 0.5, 4)(x, y)
    assert torch.equal(x, before)
    assert torch.allclose(target.sum(1), torch.ones(7))
    lam = float(target[0, y[0]]) if y[0] != y[5] else None
    assert lam is not None and 0 < lam < 1
    assert torch.allclose(mixed[:6], lam * x[:6] + (1 - lam) * x[:6].flip(0), atol=1e-6)
    assert torch.equal(mixed[6], x[6]) and torch.equal(target[6], F.one_hot(y[6], 4).float())


def test_cutmix_pastes_a_box_with_its_area_as_the_weight():
    """CutMix's target weight of the pasted class is not the pasted box's share of the image."""
    np.random.seed(1)
    x = torch.zeros(4, 1, 16, 16)
    x[1] = 1.0
    y = torch.tensor([0, 1, 2, 3])
    mixing, boxes = BatchMixing(0.0, 1.0, 1.0, 0.5, 4), 0
    for _ in range(10):
        mixed, target = mixing(x, y)
        # image 2 receives a box from image 1 (the flip of 4 pairs 1 with 2): its share of ones is 1 - lam
        assert torch.isclose(mixed[2].mean(), target[2, 1], atol=1e-6)
        assert torch.isclose(target[2, 1] + target[2, 2], torch.tensor(1.0))
        boxes += float(target[2, 1]) > 0
    assert boxes >= 5


@pytest.mark.parametrize("kwargs, needle", [(dict(mixup_alpha=-1), "mixup_alpha must be a finite number >= 0, got -1"),
                                            (dict(mixup_alpha=0.2, mixup_prob=2), "mixup_prob must be a probability"),
                                            (dict(cutmix_alpha=1.0, mixup_switch_prob=-0.5), "mixup_switch_prob")])
def test_bad_mixing_options_fail_naming_them(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        MatryoshkaClassifier(num_classes=4, backbone="test_resnet", **kwargs)


# ----------------------------------------------------------------- EMA
class Tensors(MatryoshkaDataModule):
    """Random images and labels: 4 classes, 12 train / 8 val (synthetic, for unit tests)."""

    class_names, input_size, mean, std = ["a", "b", "c", "d"], 32, [0.5] * 3, [0.25] * 3
    batch_size, num_workers = 4, 0

    def dataset(self, split, evaluate=None):
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        n = 12 if split == "train" else 8
        return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 4, (n,), generator=g))


class Recorder(L.Callback):
    """The live weights after every optimizer step (listed before EMA, so it sees them first)."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []
        self.start: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module) -> None:  # after a checkpoint is restored
        self.start = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def _fit_with_ema(tmp_path, ema: EMA, epochs: int = 1, callbacks=(), ckpt_path=None, **task):
    from mrl_vision.rng import RNGStateCheckpoint

    L.seed_everything(0)
    rec = Recorder()
    model = MatryoshkaClassifier(num_classes=4, backbone="test_resnet", input_size=32, **task)
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, default_root_dir=tmp_path,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[rec, ema, *callbacks, RNGStateCheckpoint(),
                                   L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    trainer.fit(model, datamodule=Tensors(), ckpt_path=ckpt_path)
    return trainer, model, rec, torch.load(tmp_path / "last.ckpt", weights_only=False)


def test_ema_values_by_hand_and_checkpoint(tmp_path):
    """The average in the checkpoint is not the warm-up EMA of the live weights after each step (parameters and
    BatchNorm statistics), the live weights do not travel beside it, or the cascade's thresholds fitted on
    validation are lost (averaged with the unfitted NaN)."""
    trainer, model, rec, ckpt = _fit_with_ema(tmp_path, EMA(decay=0.9), callbacks=[AdaptiveClassificationCallback()])
    assert len(rec.states) == 3
    keys = ["model.head.linears.0.weight", "model.backbone.bn1.running_mean"]
    for key in keys:
        ema = rec.states[0][key].clone()
        for n, state in enumerate(rec.states[1:], start=1):
            d = min(0.9, (1 + n) / (10 + n))
            ema = d * ema + (1 - d) * state[key]
        assert torch.allclose(ckpt["state_dict"][key], ema, atol=1e-6), key
        assert torch.equal(ckpt["current_model_state"][key], rec.states[-1][key])
    assert ckpt["ema"] == {"decay": 0.9, "warmup": True, "updates": 3}
    thr = ckpt["state_dict"]["model.adaptive_thresholds"]
    assert not bool(torch.isnan(thr).any())
    # at the end of fit the model holds the average, thresholds included
    assert torch.allclose(model.model.head.linears[0].weight, ckpt["state_dict"]["model.head.linears.0.weight"])
    assert torch.equal(model.model.adaptive_thresholds, thr)


def test_ema_is_what_validation_and_export_see(tmp_path, caplog):
    """Validation during fit does not run on the averaged weights, from_checkpoint does not load them and
    say so, or weights='live' does not give the training weights."""
    import logging

    trainer, model, rec, ckpt = _fit_with_ema(tmp_path, EMA(decay=0.5, warmup=False))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        net = MatryoshkaModel.from_checkpoint(tmp_path / "last.ckpt")
    assert "loading the EMA weights (decay 0.5, 3 updates)" in caplog.text
    assert net.weights_origin == {"ema": {"decay": 0.5, "warmup": False, "updates": 3}}
    with caplog.at_level(logging.INFO):
        net.save_pretrained(tmp_path / "saved")
    assert "saved the EMA weights (decay 0.5, 3 updates)" in caplog.text
    again = MatryoshkaModel.from_pretrained(tmp_path / "saved")
    assert again.weights_origin == net.weights_origin
    assert torch.equal(again.head.linears[0].weight, net.head.linears[0].weight)
    assert model.model.weights_origin == net.weights_origin  # the task's model after fit holds the average
    x, y = Tensors().dataset("val")[:]
    with torch.no_grad():
        loss = MatryoshkaLoss(len(net.dims))(net(x), y)
    assert torch.isclose(loss, trainer.callback_metrics["val/loss"], atol=1e-5)
    live = MatryoshkaModel.from_checkpoint(tmp_path / "last.ckpt", weights="live")
    assert live.weights_origin is None
    assert torch.equal(live.head.linears[0].weight, rec.states[-1]["model.head.linears.0.weight"])
    assert not torch.equal(live.head.linears[0].weight, net.head.linears[0].weight)
    with pytest.raises(ValueError, match="weights must be 'auto', 'ema' or 'live', got 'best'"):
        MatryoshkaModel.from_checkpoint(tmp_path / "last.ckpt", weights="best")


def test_ema_resumes_from_its_checkpoint(tmp_path):
    """A resumed run does not start from the checkpoint's live weights, or its average does not continue from the
    saved average and update count (the warm-up EMA of the resumed steps, by hand)."""
    _, _, _, first = _fit_with_ema(tmp_path, EMA(decay=0.8), epochs=1)
    _, _, rec, resumed = _fit_with_ema(tmp_path, EMA(decay=0.8), epochs=2, ckpt_path=str(tmp_path / "last.ckpt"))
    assert first["ema"]["updates"] == 3 and resumed["ema"] == {"decay": 0.8, "warmup": True, "updates": 6}
    for key in ("model.head.linears.0.weight", "model.backbone.bn1.running_mean"):
        assert torch.equal(rec.start[key], first["current_model_state"][key])  # not the average
        ema = first["state_dict"][key].clone()
        for n, state in enumerate(rec.states, start=3):
            d = min(0.8, (1 + n) / (10 + n))
            ema = d * ema + (1 - d) * state[key]
        assert torch.allclose(resumed["state_dict"][key], ema, atol=1e-6), key


@pytest.mark.parametrize("kwargs, needle", [(dict(decay=1.0), "EMA decay must be in \\(0, 1\\), got 1.0"),
                                            (dict(every_n_steps=0), "every_n_steps must be >= 1, got 0"),
                                            (dict(start_step=-1), "start_step must be >= 0, got -1")])
def test_bad_ema_options_fail_naming_them(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        EMA(**kwargs)
