"""Tests of MatryoshkaModel's inference API, the task's arguments, the backbone factory and the
optimisation helpers (timm's tiny ``test_resnet``, width 96, and ``test_vit``, width 64)."""

from __future__ import annotations

import math
import time

import lightning as L
import pytest
import torch
from conftest import TEST_RESNET_DIMS, TEST_RESNET_WIDTH
from torch.utils.data import DataLoader, TensorDataset

from mrl_vision.backbones import check_model_name, create_backbone
from mrl_vision.heads import FixedFeatureHead, MatryoshkaHead
from mrl_vision import MatryoshkaClassifier, MatryoshkaModel
from mrl_vision.data.base import check_labels
from mrl_vision.optim import build_optimizer, lr_factor

pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")

C = 4


def _model(**kwargs) -> MatryoshkaModel:
    torch.manual_seed(0)
    kwargs.setdefault("backbone", "test_resnet")
    return MatryoshkaModel(num_classes=C, **kwargs).eval()


def _task(**kwargs) -> MatryoshkaClassifier:
    torch.manual_seed(0)
    kwargs.setdefault("backbone", "test_resnet")
    return MatryoshkaClassifier(num_classes=C, **kwargs)


def _images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- inference API
@pytest.mark.parametrize("head", ["mrl", "mrl_e"])
def test_forward_shape_and_default_dims(head):
    """The model's logits are not [G, N, C], or the default dims does not end at width 96."""
    model = _model(head=head)
    assert model.width == TEST_RESNET_WIDTH
    assert model.dims == TEST_RESNET_DIMS
    assert isinstance(model.head, MatryoshkaHead) and model.head.efficient == (head == "mrl_e")
    with torch.no_grad():
        assert model(_images(3)).shape == (len(TEST_RESNET_DIMS), 3, C)


def test_features_are_timm_pooled_embedding():
    """features() is not the backbone's pooled pre-logits embedding of width 96."""
    model, x = _model(), _images()
    with torch.no_grad():
        z = model.features(x)
        bb = model.backbone
        expected = bb.forward_head(bb.forward_features(x), pre_logits=True)
    assert z.shape == (3, TEST_RESNET_WIDTH)
    torch.testing.assert_close(z, expected)


@pytest.mark.parametrize("dim", TEST_RESNET_DIMS)
def test_embed_is_feature_prefix(dim):
    """embed(x, dim) is not [N, dim] or not the first dim features (optionally L2-normalised)."""
    model, x = _model(), _images()
    with torch.no_grad():
        z = model.features(x)
        e = model.embed(x, dim)
        en = model.embed(x, dim, normalize=True)
    assert e.shape == (3, dim)
    torch.testing.assert_close(e, z[:, :dim])
    torch.testing.assert_close(en, z[:, :dim] / z[:, :dim].norm(dim=1, keepdim=True))


def test_embed_default_and_bad_dim():
    """embed() without dim is not the full width, or a dim outside the dims is accepted."""
    model, x = _model(), _images()
    with torch.no_grad():
        assert model.embed(x).shape == (3, TEST_RESNET_WIDTH)
    with pytest.raises(ValueError, match="dim 12 is not one of this model.s sizes"):
        model.embed(x, 12)


@pytest.mark.parametrize("head", ["mrl", "mrl_e"])
def test_predict_equals_argmax_of_forward(head):
    """predict(x, dim) differs from forward(x)[g].argmax(-1) of that size."""
    model, x = _model(head=head), _images(6)
    with torch.no_grad():
        logits = model(x)
        for g, m in enumerate(model.dims):
            assert torch.equal(model.predict(x, m), logits[g].argmax(-1))
        assert torch.equal(model.predict(x), logits[-1].argmax(-1))
    with pytest.raises(ValueError, match="dim 10 is not one of this mrl(_e)? head.s sizes"):
        model.predict(x, 10)


def test_channels_last_gives_the_same_logits():
    """channels_last changes the model's outputs."""
    a, x = _model(), _images()
    b = _model(channels_last=True)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- FF heads
def test_ff_head_defaults_to_full_width():
    """head='ff' with dims None is not a single classifier on the full 96-d width."""
    model = _model(head="ff")
    assert isinstance(model.head, FixedFeatureHead) and model.head.projection is None
    assert model.dims == [TEST_RESNET_WIDTH]
    with torch.no_grad():
        assert model(_images()).shape == (1, 3, C)


def test_ff_head_at_one_size():
    """The ff model at m=32 does not embed/predict from z[:, :32], or accepts another size."""
    model, x = _model(head="ff", dims=[32]), _images()
    with torch.no_grad():
        z = model.features(x)
        torch.testing.assert_close(model.embed(x, 32), z[:, :32])
        head = model.head.classifier
        torch.testing.assert_close(model(x)[0], z[:, :32] @ head.weight.T + head.bias, rtol=1e-5, atol=1e-6)
        assert torch.equal(model.predict(x), model(x)[0].argmax(-1))
    with pytest.raises(ValueError, match="dim 16 is not one of this model.s sizes"):
        model.embed(x, 16)


def test_ff_projection_embed():
    """The ff_projection model's embed is not the learned [N, m] projection."""
    model, x = _model(head="ff_projection", dims=[16]), _images()
    with torch.no_grad():
        z = model.features(x)
        e = model.embed(x, 16)
        proj = model.head.projection
        torch.testing.assert_close(e, z @ proj.weight.T + proj.bias, rtol=1e-5, atol=1e-6)
    assert e.shape == (3, 16)


@pytest.mark.parametrize("head", ["ff", "ff_projection"])
def test_ff_head_requires_one_size(head):
    """A fixed-feature model accepts more than one dims size."""
    with pytest.raises(ValueError, match=r"one size.*\[8, 16\]"):
        _model(head=head, dims=[8, 16])


# ----------------------------------------------------------------------------- bad arguments
def test_unknown_timm_model_suggests_names():
    """An unknown timm name is not reported with the name and close suggestions."""
    with pytest.raises(ValueError, match=r"'resnet1888'.*Did you mean.*'resnet18'"):
        _model(backbone="resnet1888")
    with pytest.raises(ValueError, match="zzzqqq_model"):
        check_model_name("zzzqqq_model")


def test_pretrained_without_network_fails_fast(monkeypatch):
    """pretrained=True offline hangs or fails with an unclear error instead of naming huggingface."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="huggingface.co"):
        _model(pretrained=True)
    assert time.perf_counter() - start < 10


def test_missing_pretrained_file():
    """A pretrained_file that does not exist is not reported as FileNotFoundError naming it."""
    with pytest.raises(FileNotFoundError, match="no_such_weights.safetensors"):
        create_backbone("test_resnet", pretrained_file="no_such_weights.safetensors")


@pytest.mark.parametrize(
    "dims, bad",
    [([8, 8], "8 appears twice"), ([0], "got 0"), ([200], "200"), ([16, 8], "8 follows 16")],
)
def test_bad_nesting_is_named(dims, bad):
    """A bad dims reaches the head without a ValueError naming the value."""
    with pytest.raises(ValueError, match=bad):
        _model(dims=dims)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss_weights=[1.0, 1.0]), "one value per size \\(5\\), got 2"),
        (dict(loss_weights=[1.0, 1.0, -1.0, 1.0, 1.0]), "-1.0"),
        (dict(head="mrl_x"), "mrl_x"),
        (dict(optimizer="lamb"), "lamb"),
        (dict(lr=0.0), "lr must be > 0"),
        (dict(warmup_epochs=-1.0), "warmup_epochs"),
        (dict(label_smoothing=1.0), "label_smoothing"),
        (dict(top_k=[10]), "num_classes=4"),
    ],
)
def test_bad_model_arguments(kwargs, match):
    """A bad MatryoshkaClassifier argument is accepted or its ValueError does not name it."""
    with pytest.raises(ValueError, match=match):
        _task(**kwargs)


def test_num_classes_must_be_positive():
    """num_classes=0 is accepted."""
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1, got 0"):
        MatryoshkaClassifier(num_classes=0, backbone="test_resnet")


@pytest.mark.parametrize("labels, bad", [([0, 3, 10, 2], "label 10"), ([1, -1, 0], "label -1"), ([4], "label 4")])
def test_check_labels_names_the_bad_label(labels, bad):
    """check_labels lets an out-of-range label through or does not name it."""
    with pytest.raises(ValueError, match=f"{bad} is outside \\[0, 4\\)"):
        check_labels(torch.tensor(labels), 4)


def test_check_labels_accepts_valid_and_rejects_float():
    """check_labels rejects valid integer labels, or accepts float labels."""
    check_labels(torch.tensor([0, 1, 2, 3]), 4)
    check_labels(torch.tensor([3], dtype=torch.uint8), 4)
    check_labels(torch.zeros(0, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="integer class indices"):
        check_labels(torch.tensor([0.0, 1.0]), 4)


# ----------------------------------------------------------------------------- optimisation
@pytest.mark.parametrize("backbone", ["test_resnet", "test_vit"])
def test_weight_decay_excludes_biases_norms_and_embeddings(backbone):
    """Weight decay reaches biases/norm scales/position embeddings, or misses a weight matrix."""
    model = MatryoshkaModel(num_classes=C, backbone=backbone)
    opt = build_optimizer(model, "sgd", lr=0.1, weight_decay=1e-4)
    no_decay_group, decay_group = opt.param_groups
    assert decay_group["weight_decay"] == 1e-4 and no_decay_group["weight_decay"] == 0.0
    decay = {id(p) for p in decay_group["params"]}
    no_decay = {id(p) for p in no_decay_group["params"]}
    named = dict(model.named_parameters())
    assert decay.isdisjoint(no_decay)
    assert decay | no_decay == {id(p) for p in named.values()}
    one_d = {n for n, p in named.items() if p.ndim <= 1}
    assert one_d and all(id(named[n]) in no_decay for n in one_d)
    assert any(n.endswith("bias") for n in one_d)
    # every linear/conv weight of the head and backbone decays
    assert all(id(lin.weight) in decay for lin in model.head.linears)
    if backbone == "test_vit":
        for name in ("backbone.pos_embed", "backbone.cls_token"):
            assert named[name].ndim == 3 and id(named[name]) in no_decay
        assert {n for n, p in named.items() if id(p) in no_decay} == one_d | {"backbone.pos_embed", "backbone.cls_token"}
    else:
        assert {n for n, p in named.items() if id(p) in no_decay} == one_d


def test_optimizer_skips_frozen_parameters():
    """Frozen parameters are handed to the optimizer."""
    model = _model()
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    opt = build_optimizer(model, "sgd", lr=0.1, weight_decay=1e-4)
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert ids == {id(p) for p in model.head.parameters()}


def test_build_optimizer():
    """build_optimizer does not build SGD (classical or Nesterov momentum)/AdamW with the weight decay
    split, or accepts a bad name."""
    model = _model()
    sgd = build_optimizer(model, "sgd", lr=0.3, weight_decay=0.01, momentum=0.8, nesterov=True)
    assert isinstance(sgd, torch.optim.SGD)
    assert [g["weight_decay"] for g in sgd.param_groups] == [0.0, 0.01]
    assert sgd.defaults["lr"] == 0.3 and sgd.defaults["momentum"] == 0.8 and sgd.defaults["nesterov"]
    assert not build_optimizer(model, "sgd", lr=0.3).defaults["nesterov"]
    adamw = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.05)
    assert isinstance(adamw, torch.optim.AdamW)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.0, 0.05]
    with pytest.raises(ValueError, match="'rmsprop'"):
        build_optimizer(model, "rmsprop", lr=0.1)


def test_layer_decay_scales_block_lrs():
    """Layer-wise LR decay does not give the last block the full LR and each earlier group
    layer_decay times the next one's, or a scheduler loses the scale."""
    model = MatryoshkaModel(num_classes=C, backbone="test_vit")
    opt = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    scales = sorted({round(g["lr"] / 1e-3, 8) for g in opt.param_groups})
    assert scales[-1] == 1.0 and len(scales) >= 3
    assert all(a == pytest.approx(b * 0.5) for a, b in zip(scales, scales[1:]))
    names = {id(p): n for n, p in model.named_parameters()}
    top = [names[id(p)] for g in opt.param_groups if g["lr"] == pytest.approx(1e-3) for p in g["params"]]
    assert any(n.startswith("head.") for n in top)  # the head trains at the full LR
    low = [names[id(p)] for g in opt.param_groups if g["lr"] == pytest.approx(1e-3 * scales[0]) for p in g["params"]]
    assert any(n.startswith(("backbone.patch_embed", "backbone.cls_token", "backbone.pos_embed")) for n in low)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5)
    assert sorted({round(g["lr"] / 5e-4, 8) for g in opt.param_groups}) == scales and sched.last_epoch == 0
    with pytest.raises(ValueError, match="layer_decay"):
        _task(layer_decay=1.5)


@pytest.mark.parametrize(
    "schedule, expected",
    [
        # total 10, warm-up 2: (t+1)/2 for t<2, then the decay over the remaining 8 steps
        ("triangular", [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0, 0.0]),
        ("constant", [0.5, 1.0] + [1.0] * 10),
        (
            "cosine",
            [0.5, 1.0, 1.0]
            + [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(1, 9)]
            + [0.0],
        ),
    ],
)
def test_lr_factor_values(schedule, expected):
    """The LR multiplier of a schedule differs from the hand-computed one at some step."""
    f = lr_factor(schedule, total_steps=10, warmup_steps=2)
    assert [f(t) for t in range(12)] == pytest.approx(expected, abs=1e-12)


def test_lr_factor_cosine_midpoint_and_no_warmup():
    """Cosine without warm-up does not start at 1, reach 0.5 half way and 0 at the end."""
    f = lr_factor("cosine", total_steps=100, warmup_steps=0)
    assert f(0) == 1.0 and f(50) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)
    assert f(25) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    t = lr_factor("triangular", total_steps=4, warmup_steps=0)
    assert [t(i) for i in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_lr_factor_rejects_unknown_schedule():
    """An unknown schedule name is accepted."""
    with pytest.raises(ValueError, match="'step'"):
        lr_factor("step", 10, 0)


class _LRRecorder(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def _fit_and_record_lr(**trainer_kwargs) -> list[float]:
    """Fit test_resnet (cosine, warm-up 1 epoch, peak 0.2) on 8 synthetic images, 2 batches/epoch."""
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, C, (8,), generator=gen))
    model = _task(lr=0.2, lr_schedule="cosine", warmup_epochs=1.0)
    rec = _LRRecorder()
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[rec], **trainer_kwargs,
    )
    trainer.fit(model, DataLoader(data, batch_size=4))
    sched = trainer.lr_scheduler_configs[0]
    assert sched.interval == "step"
    assert [g["weight_decay"] for g in trainer.optimizers[0].param_groups] == [0.0, 5e-5]
    return rec.lrs


# 4 steps, warm-up 2 steps (one epoch of 2 batches): 0.2 * [1/2, 2/2, cos(0), (1 + cos(pi/2)) / 2]
EXPECTED_LRS = [0.1, 0.2, 0.2, 0.1]


def test_configure_optimizers_warmup_in_epochs():
    """configure_optimizers does not turn warmup_epochs into steps per epoch, or steps per epoch."""
    assert _fit_and_record_lr(max_epochs=2) == pytest.approx(EXPECTED_LRS)


def test_configure_optimizers_with_max_steps_only():
    """Training by max_steps alone crashes in configure_optimizers or warms up for the wrong length."""
    assert _fit_and_record_lr(max_steps=4) == pytest.approx(EXPECTED_LRS)


def test_configure_optimizers_when_max_steps_cuts_max_epochs():
    """warmup_epochs is not measured in real epochs when max_steps stops training early."""
    assert _fit_and_record_lr(max_epochs=4, max_steps=4) == pytest.approx(EXPECTED_LRS)


def test_frozen_backbone_trains_only_the_head():
    """With freeze_backbone the backbone's weights or BatchNorm statistics change in training, a frozen
    module leaves eval mode, the optimizer holds backbone parameters, or layer_decay is accepted beside it."""
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, C, (8,), generator=gen))
    task = _task(freeze_backbone=True, lr=0.1)
    backbone = {k: v.clone() for k, v in task.model.backbone.state_dict().items()}
    head = {k: v.clone() for k, v in task.model.head.state_dict().items()}
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, DataLoader(data, batch_size=4))
    assert all(torch.equal(backbone[k], v) for k, v in task.model.backbone.state_dict().items())  # BN stats too
    assert any(not torch.equal(head[k], v) for k, v in task.model.head.state_dict().items())
    trained = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert trained == {id(p) for p in task.model.head.parameters()}
    task.train()
    assert task.training and task.model.head.training and not task.model.backbone.training
    with pytest.raises(ValueError, match=r"layer_decay=0.75 .* freeze_backbone=True trains only the head"):
        _task(freeze_backbone=True, layer_decay=0.75)
