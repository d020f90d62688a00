"""The official MRL ResNet-50 checkpoints (RAIVNLab/MRL) load into this project's modules.

The reference network is built here independently of ``mrl_vision``: a torchvision ``resnet50``
whose ``fc`` is a test-local copy of the reference heads, with the FFCV recipe's BlurPool applied
by a test-local function, saved the way the reference saves it (a DDP state dict, every key
prefixed ``module.``). Converting that file with :func:`convert_reference` and loading it strictly
into :class:`MatryoshkaModel` (``MatryoshkaModel.from_reference``, ``mrl-vision convert-reference``) must
give the reference's logits at every size.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from mrl_vision.backbones import create_backbone
from mrl_vision.blurpool import BlurPoolConv2d, apply_blurpool
from mrl_vision import MatryoshkaModel
from mrl_vision.cli import main
from mrl_vision.reference import convert_reference, load_reference_state_dict

WIDTH = 2048
SIZES = [8 * 2**i for i in range(9)]  # 8 .. 2048, the reference's nesting list
RECIPE_BLUR_CONVS = [f"layer{s}.0.{c}" for s in (2, 3, 4) for c in ("conv2", "downsample.0")]


# --- the reference network, written here without mrl_vision ------------------------------------


class RefBlurPoolConv2d(nn.Module):
    """The recipe's BlurPool: a fixed depthwise [1,2,1]x[1,2,1]/16 blur, then the strided conv."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        k = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16.0
        self.register_buffer("blur_filter", k[None, None].repeat(conv.in_channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.blur_filter, stride=1, padding=1, groups=self.conv.in_channels)
        return self.conv(x)


def ref_apply_blurpool(model: nn.Module) -> None:
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Conv2d) and module.stride[0] > 1 and module.in_channels >= 16:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, RefBlurPoolConv2d(module))


class RefMRL(nn.Module):
    """MRL: ``nesting_classifier_i = Linear(m_i, C)`` on ``z[:, :m_i]``."""

    def __init__(self, num_classes: int, sizes: list[int]) -> None:
        super().__init__()
        self.sizes = sizes
        for i, m in enumerate(sizes):
            setattr(self, f"nesting_classifier_{i}", nn.Linear(m, num_classes))

    def forward(self, z):
        return [getattr(self, f"nesting_classifier_{i}")(z[:, :m]) for i, m in enumerate(self.sizes)]


class RefMRLE(nn.Module):
    """MRL-E: one ``nesting_classifier_0 = Linear(2048, C)``; logits_m = z[:, :m] @ W[:, :m].T + b."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.nesting_classifier_0 = nn.Linear(WIDTH, num_classes)

    def forward(self, z):
        w, b = self.nesting_classifier_0.weight, self.nesting_classifier_0.bias
        return [z[:, :m] @ w[:, :m].T + b for m in SIZES]


class RefMRLEOld(nn.Linear):
    """MRL-E in the older files' notation: the resnet's own ``fc`` [C, 2048], shared by all sizes."""

    def __init__(self, num_classes: int) -> None:
        super().__init__(WIDTH, num_classes)

    def forward(self, z):
        return [z[:, :m] @ self.weight[:, :m].T + self.bias for m in SIZES]


class RefFF(nn.Linear):
    """FF-m: ``fc = Linear(m, C)`` on the first m dims of the 2048-d pooled feature."""

    def __init__(self, num_classes: int, m: int) -> None:
        super().__init__(m, num_classes)
        self.m = m

    def forward(self, z):
        return [super().forward(z[:, : self.m])]


def reference_network(kind: str, num_classes: int, blurpool: bool = True, m: int = WIDTH, seed: int = 0) -> nn.Module:
    """A seeded reference ResNet-50 in eval mode whose BN layers are not the identity."""
    torch.manual_seed(seed)
    net = torchvision.models.resnet50(num_classes=num_classes)
    net.fc = {
        "mrl": lambda: RefMRL(num_classes, SIZES),
        "mrl_e": lambda: RefMRLE(num_classes),
        "mrl_e_old": lambda: RefMRLEOld(num_classes),
        "ff": lambda: RefFF(num_classes, m),
    }[kind]()
    if blurpool:
        ref_apply_blurpool(net)
    with torch.no_grad():
        for bn in net.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.normal_(0.0, 0.2)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0.0, 0.2)
                bn.num_batches_tracked.fill_(1234)
    return net.eval()


def save_like_reference(net: nn.Module, path) -> None:
    """Saved from DDP: every key starts with ``module.``."""
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, path)


def assert_same_logits(net: nn.Module, model: nn.Module) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = torch.stack(net(x))
        got = model(x)
    assert got.shape == expected.shape
    scale = expected.abs().max().item()
    assert scale > 1e-3  # the comparison is not between two near-zero tensors
    for g in range(expected.shape[0]):
        assert torch.allclose(got[g], expected[g], rtol=1e-4, atol=1e-4 * scale), (
            f"size index {g}: max abs diff {(got[g] - expected[g]).abs().max().item():.3g} (scale {scale:.3g})"
        )


# --- reference checkpoints convert and give the same logits --------------------------------------


@pytest.mark.parametrize(
    "kind, head, m, num_classes, blurpool, dims",
    [
        ("mrl", "mrl", WIDTH, 10, True, SIZES),
        ("mrl_e", "mrl_e", WIDTH, 10, True, SIZES),
        ("mrl_e_old", "mrl_e", WIDTH, 10, True, SIZES),
        ("ff", "ff", WIDTH, 10, True, [WIDTH]),
        ("ff", "ff", 64, 10, True, [64]),
        ("mrl", "mrl", WIDTH, 10, False, SIZES),
        ("ff", "ff", 64, 10, False, [64]),
        ("mrl", "mrl", WIDTH, 1000, True, SIZES),  # the released files' exact shapes
    ],
    ids=["mrl", "mrl_e", "mrl_e_old_fc", "ff2048", "ff64", "mrl_no_blurpool", "ff64_no_blurpool", "mrl_1000_classes"],
)
def test_reference_checkpoint_gives_reference_logits(tmp_path, kind, head, m, num_classes, blurpool, dims):
    net = reference_network(kind, num_classes, blurpool=blurpool, m=m)
    path = tmp_path / "r50_reference.pt"
    save_like_reference(net, path)

    sd = load_reference_state_dict(path)
    assert not any(k.startswith("module.") for k in sd)
    converted = convert_reference(sd, head)
    assert {k: converted[k] for k in ("backbone", "blurpool", "head", "dims", "num_classes")} == {
        "backbone": "resnet50",
        "blurpool": blurpool,
        "head": head,
        "dims": dims,
        "num_classes": num_classes,
    }
    keys = converted["state_dict"]
    assert ("backbone.layer2.0.conv2.blur_filter" in keys) == blurpool
    assert ("backbone.layer3.0.downsample.0.conv.weight" in keys) == blurpool
    model = MatryoshkaModel.from_reference(path, head)
    assert model.dims == dims and model.head_kind == head and model.config["blurpool"] == blurpool
    assert_same_logits(net, model)


def test_convert_reference_cli_writes_a_pretrained_folder(tmp_path):
    """`mrl-vision convert-reference` does not write a folder that from_pretrained loads with the
    reference's logits, or accepts a head the file does not hold."""
    net = reference_network("mrl_e_old", 10)
    path = tmp_path / "r50_mrl0_e1_ff2048.pt"
    save_like_reference(net, path)
    main(["convert-reference", str(path), "--head", "mrl_e", "--out", str(tmp_path / "converted")])
    model = MatryoshkaModel.from_pretrained(tmp_path / "converted")
    assert model.head_kind == "mrl_e" and model.input_size == 224 and model.mean == pytest.approx([0.485, 0.456, 0.406])
    assert_same_logits(net, model)
    with pytest.raises(SystemExit, match="mrl-vision convert-reference: error: .*head='mrl'"):
        main(["convert-reference", str(path), "--head", "mrl", "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()


@pytest.fixture(scope="module")
def reference_body() -> dict[str, torch.Tensor]:
    """A reference backbone state dict with BlurPool (no fc.*), keys without ``module.``."""
    net = torchvision.models.resnet50()
    ref_apply_blurpool(net)
    return {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}


def mrl_fc(num_classes: int = 10, sizes=SIZES) -> dict[str, torch.Tensor]:
    fc = {}
    for i, m in enumerate(sizes):
        fc[f"fc.nesting_classifier_{i}.weight"] = torch.zeros(num_classes, m)
        fc[f"fc.nesting_classifier_{i}.bias"] = torch.zeros(num_classes)
    return fc


def plain_fc(m: int, num_classes: int = 10) -> dict[str, torch.Tensor]:
    return {"fc.weight": torch.zeros(num_classes, m), "fc.bias": torch.zeros(num_classes)}


@pytest.mark.parametrize("wrapper", ["state_dict", "model", None])
def test_wrapped_or_unprefixed_state_dicts_load(tmp_path, reference_body, wrapper):
    sd = {**reference_body, **plain_fc(WIDTH)}
    saved = {wrapper: sd, "epoch": 3} if wrapper else sd  # no ``module.`` prefix this time
    torch.save(saved, tmp_path / "ckpt.pt")
    loaded = load_reference_state_dict(tmp_path / "ckpt.pt")
    assert set(loaded) == set(sd)
    assert convert_reference(loaded, "ff")["dims"] == [WIDTH]


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="r50_mrl1_e0_ff2048.pt"):
        load_reference_state_dict(tmp_path / "r50_mrl1_e0_ff2048.pt")


def test_backbone_keys_map_one_to_one(reference_body):
    """Every reference key (blur filters included) becomes ``backbone.<same key>``, same tensor."""
    converted = convert_reference({**reference_body, **mrl_fc()}, "mrl")
    sd = converted["state_dict"]
    for k, v in reference_body.items():
        assert sd[f"backbone.{k}"] is v
    assert sorted(k for k in sd if k.startswith("head.")) == sorted(
        f"head.linears.{i}.{p}" for i in range(len(SIZES)) for p in ("weight", "bias")
    )
    ours = create_backbone("resnet50", blurpool=True)[0].state_dict()
    assert {k[len("backbone."):] for k in sd if k.startswith("backbone.")} == set(ours)


# --- validation: each problem is named -------------------------------------------------------------


def _drop(sd: dict, prefix: str) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith(prefix)}


@pytest.mark.parametrize(
    "make_fc, head, match",
    [
        (lambda: plain_fc(WIDTH), "mrl_x", r"unknown head 'mrl_x'"),
        (lambda: plain_fc(WIDTH), "mrl", r"head='mrl' needs .*fc\.weight \[10, 2048\].*suggests head='mrl_e'.*head='ff'"),
        (lambda: plain_fc(64), "mrl", r"fc\.weight \[10, 64\].*suggests head='ff'"),
        (lambda: mrl_fc(sizes=[WIDTH]), "mrl", r"nesting_classifier_\{0\}.*\[\[10, 2048\]\].*suggests head='mrl_e'"),
        (lambda: mrl_fc(), "ff", r"head='ff' needs fc\.weight.*9 nesting classifier.*suggests head='mrl'"),
        (lambda: mrl_fc(), "mrl_e", r"head='mrl_e' needs a single shared classifier.*suggests head='mrl'"),
        (lambda: plain_fc(64), "mrl_e", r"head='mrl_e' needs a classifier on all 2048 dims.*\[10, 64\].*suggests head='ff'"),
        (lambda: {}, "mrl", r"no fc\.\* keys"),
        (lambda: {}, "ff", r"no fc\.\* keys"),
        (lambda: mrl_fc(sizes=[8, 32, 16, 2048]), "mrl", r"strictly increasing.*\[8, 32, 16, 2048\]"),
        (lambda: {**mrl_fc(), "fc.nesting_classifier_2.weight": torch.zeros(11, 32), "fc.nesting_classifier_2.bias": torch.zeros(11)}, "mrl", r"disagree.*nesting_classifier_0: 10.*nesting_classifier_2: 11"),
        (lambda: _drop(mrl_fc(), "fc.nesting_classifier_3."), "mrl", r"fc\.nesting_classifier_3 is missing"),
        (lambda: {k: v for k, v in mrl_fc().items() if k != "fc.nesting_classifier_2.bias"}, "mrl", r"lacks fc\.nesting_classifier_2\.bias"),
        (lambda: {**plain_fc(WIDTH), "fc.extra.weight": torch.zeros(1)}, "ff", r"unexpected classifier keys fc\.extra\.weight"),
        (lambda: plain_fc(4096), "ff", r"reads 4096 dims.*2048"),
        (lambda: {"fc.weight": torch.zeros(10, 64), "fc.bias": torch.zeros(9)}, "ff", r"not a Linear's"),
    ],
    ids=[
        "unknown_head", "mrl_on_fc_weight", "mrl_on_ff64", "mrl_on_mrl_e", "ff_on_mrl", "mrl_e_on_mrl",
        "mrl_e_on_ff64", "no_fc_mrl", "no_fc_ff", "not_increasing", "classes_disagree", "missing_classifier",
        "missing_bias", "unexpected_fc_key", "too_wide", "bias_mismatch",
    ],
)
def test_head_problems_are_named(reference_body, make_fc, head, match):
    with pytest.raises(ValueError, match=match):
        convert_reference({**reference_body, **make_fc()}, head)


def test_non_resnet50_backbones_are_named(reference_body):
    fc = plain_fc(WIDTH)
    with pytest.raises(ValueError, match=r"not a resnet50 state dict: it has no layer4 keys; it lacks layer4\."):
        convert_reference({**_drop(reference_body, "layer4."), **fc}, "ff")
    with pytest.raises(ValueError, match=r"timm's resnet50 has no head\.proj\.weight"):
        convert_reference({**reference_body, "head.proj.weight": torch.zeros(3), **fc}, "ff")
    r18 = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    with pytest.raises(ValueError, match=r"not a resnet50 state dict: it lacks layer1\.0\.conv3\.weight, .*in all\); shapes differ for layer1\.0\.conv1\.weight \[64, 64, 3, 3\] \(expected \[64, 64, 1, 1\]\)"):
        convert_reference({**r18, **plain_fc(512)}, "ff")
    with pytest.raises(ValueError, match=r"no backbone keys"):
        convert_reference(plain_fc(WIDTH), "ff")


def test_files_without_optional_buffers_still_convert(reference_body):
    """Missing ``num_batches_tracked`` / ``blur_filter`` buffers are filled with their fixed values."""
    body = {k: v for k, v in reference_body.items() if not k.endswith(("num_batches_tracked", "blur_filter"))}
    converted = convert_reference({**body, **plain_fc(WIDTH)}, "ff")
    assert converted["blurpool"] is True
    sd = converted["state_dict"]
    assert torch.equal(sd["backbone.layer2.0.conv2.blur_filter"], reference_body["layer2.0.conv2.blur_filter"])
    model = MatryoshkaModel("resnet50", num_classes=converted["num_classes"], head=converted["head"], dims=converted["dims"],
                            blurpool=converted["blurpool"])
    model.load_state_dict({**converted["state_dict"], "adaptive_thresholds": model.adaptive_thresholds})  # strictly


# --- BlurPool and its cost --------------------------------------------------------------------------


def test_apply_blurpool_wraps_exactly_the_recipe_convs():
    model = timm.create_model("resnet50", num_classes=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert apply_blurpool(model) == RECIPE_BLUR_CONVS
    assert apply_blurpool(model) == []  # idempotent: never wraps a wrapped conv
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, BlurPoolConv2d))
    assert wrapped == sorted(RECIPE_BLUR_CONVS)
    sd = model.state_dict()
    for name in RECIPE_BLUR_CONVS:
        assert torch.equal(sd[f"{name}.conv.weight"], before[f"{name}.weight"])
        c_in = before[f"{name}.weight"].shape[1]
        kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
        assert torch.equal(sd[f"{name}.blur_filter"], kernel.expand(c_in, 1, 3, 3))
    assert apply_blurpool(torchvision.models.resnet50()) == RECIPE_BLUR_CONVS  # same on torchvision's


def test_blurpool_is_applied_after_pretrained_weights(tmp_path):
    weights = timm.create_model("test_resnet").state_dict()
    torch.save(weights, tmp_path / "test_resnet.pth")
    model, _ = create_backbone("test_resnet", pretrained_file=str(tmp_path / "test_resnet.pth"), blurpool=True)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, BlurPoolConv2d)]
    assert wrapped
    for name in wrapped:
        assert torch.equal(model.get_submodule(name).conv.weight, weights[f"{name}.weight"])


def test_blurpool_errors_are_named():
    with pytest.raises(ValueError, match=r"no strided nn\.Conv2d.*'test_vit'"):
        create_backbone("test_vit", blurpool=True)
    with pytest.raises(ValueError, match=r"blurpool=True and aa_layer='blurpool'"):
        create_backbone("test_resnet", blurpool=True, aa_layer="blurpool")


def _gflops(size: int = 224, **kwargs) -> float:
    """GFLOPs of one image through ``create_backbone("resnet50", **kwargs)``.

    Counted on the meta device: FlopCounterMode reads only shapes, so the counts equal the CPU's
    (benchmarks/flops.py counts on the CPU) at a fraction of the time.
    """
    with torch.device("meta"):
        model = create_backbone("resnet50", **kwargs)[0].eval()
        x = torch.randn(1, 3, size, size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 1e9


def test_recipe_blurpool_costs_under_one_percent_timm_aa_layer_over_twenty():
    plain = _gflops()
    recipe = _gflops(blurpool=True)
    timm_aa = _gflops(aa_layer="blurpool")
    assert plain == pytest.approx(8.17, abs=0.05)
    assert plain < recipe <= 1.01 * plain
    assert timm_aa > 1.2 * plain  # timm's BlurPool2d placement is a different, costlier network


@pytest.mark.parametrize("recipe", ["resnet_ffcv.yaml", "resnet_imagefolder.yaml"])
def test_the_imagenet_recipes_train_the_reference_network(recipe):
    """The recipe's model (as configured) is not the reference's BlurPool ResNet-50: its FLOPs are not
    within 1 % of plain ResNet-50, or its strided convs are not wrapped as the reference wraps them."""
    import yaml
    from conftest import CONFIG_DIR

    model_cfg = yaml.safe_load((CONFIG_DIR / "imagenet" / recipe).read_text())["model"]
    kwargs = {k: model_cfg[k] for k in ("backbone", "head", "dims", "backbone_kwargs", "blurpool") if k in model_cfg}
    with torch.device("meta"):
        model = MatryoshkaModel(num_classes=1000, **kwargs).eval()
        x = torch.randn(1, 3, 224, 224)
    wrapped = sorted(n for n, m in model.backbone.named_modules() if isinstance(m, BlurPoolConv2d))
    assert wrapped == sorted(RECIPE_BLUR_CONVS)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.features(x)
    assert _gflops() < counter.get_total_flops() / 1e9 <= 1.01 * _gflops()
