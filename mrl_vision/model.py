"""``MatryoshkaClassifier``: the Lightning glue around a timm backbone and a Matryoshka head."""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from .adaptive import cascade_predict
from .backbones import create_backbone
from .heads import FixedFeatureHead, MatryoshkaHead, default_nesting, validate_nesting
from .losses import MatryoshkaLoss
from .metrics import MatryoshkaAccuracy
from .optim import build_optimizer, lr_factor, param_groups
from .report import accuracy_rows, format_table, write_accuracy_report

# The label check below lives in the model so that it guards every data module alike.
warnings.filterwarnings("ignore", message=r".*overridden `on_before_batch_transfer` in `LightningModule`.*")

HeadKind = Literal["mrl", "mrl_e", "ff", "ff_projection"]


def check_labels(target: torch.Tensor, num_classes: int) -> None:
    """Raise ``ValueError`` naming the first label outside ``[0, num_classes)``.

    Called on CPU batches before they move to the accelerator, so a bad label is a clear
    message instead of a device-side assert inside cross-entropy.
    """
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {target.dtype}")
    if target.numel() == 0:
        return
    bad = (target < 0) | (target >= num_classes)
    if bool(bad.any()):
        value = int(target[bad][0])
        raise ValueError(
            f"label {value} is outside [0, {num_classes}): the model has num_classes={num_classes} "
            "(check the dataset's labels or the model's num_classes)"
        )


class MatryoshkaClassifier(L.LightningModule):
    """Any timm backbone with a Matryoshka head, trained with the summed per-size loss.

    Args:
        num_classes: C (linked from the data module by the CLI).
        backbone: a timm model name.
        head: ``mrl`` (a classifier per prefix), ``mrl_e`` (one shared weight), ``ff`` (the
            reference's fixed-feature baseline: a classifier on ``z[:, :m]`` of the full-width
            backbone) or ``ff_projection`` (a learned projection to ``m`` dims, then a classifier).
        nesting: prefix sizes, ascending; default powers of two from 8 to the width, ending at the
            width. For ``ff``/``ff_projection`` one size ``[m]`` (default: the full width, i.e. a
            standard model).
        ff_dim: the fixed-feature baseline at this size in one override: ``--model.ff_dim 16`` turns
            any MRL or MRL-E config into FF-16 (``head=ff``, ``nesting=[16]``; it takes precedence over
            both; an ``ff_projection`` head keeps its projection). ``ff_dim`` = the width is the
            standard model (one classifier on the whole embedding).
        loss_weights: one per size (default all 1).
        label_smoothing: cross-entropy label smoothing (the reference recipe: 0.1).
        pretrained / pretrained_file / backbone_kwargs: see :func:`mrl_vision.backbones.create_backbone`.
        optimizer, lr, momentum, nesterov, weight_decay: ``sgd`` or ``adamw``; weight decay is
            not applied to norm layers, biases, or timm's ``no_weight_decay()`` parameters.
        lr_schedule: ``triangular`` (linear up to ``warmup_epochs``, then linear to 0, as in the
            reference recipe), ``cosine`` (warm-up then cosine to 0) or ``constant``; stepped per
            iteration.
        warmup_epochs: epochs of linear warm-up (the peak epoch for ``triangular``).
        channels_last: run the backbone in channels-last memory format (faster convolutions
            under mixed precision on GPUs).
        eval_flip_tta: horizontal-flip test-time augmentation in validation, test and predict:
            the logits of the image and of its mirror image are summed (the reference recipe).
        adaptive_predict: ``predict`` runs the confidence cascade (:meth:`predict_adaptive`) with
            the thresholds fitted by ``AdaptiveClassificationCallback`` (kept in the checkpoint)
            and reports, per image, the class and the size that decided it.
        top_k: the k of the per-size top-k accuracies.

    Example::

        model = MatryoshkaClassifier(num_classes=1000, backbone="resnet50", head="mrl")
        logits = model(images)                    # [9, N, 1000], sizes 8..2048
        preds_64 = model.predict(images, dim=64)  # [N], classes from the first 64 dims
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet18",
        head: HeadKind = "mrl",
        nesting: list[int] | None = None,
        ff_dim: int | None = None,
        loss_weights: list[float] | None = None,
        label_smoothing: float = 0.0,
        pretrained: bool = False,
        pretrained_file: str | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 5e-5,
        lr_schedule: Literal["triangular", "cosine", "constant"] = "cosine",
        warmup_epochs: float = 0.0,
        channels_last: bool = False,
        eval_flip_tta: bool = False,
        adaptive_predict: bool = False,
        top_k: list[int] = [1, 5],  # noqa: B006 (jsonargparse shows list defaults)
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if head not in ("mrl", "mrl_e", "ff", "ff_projection"):
            raise ValueError(f"unknown head {head!r}; choose mrl, mrl_e, ff or ff_projection")
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"unknown optimizer {optimizer!r}; choose sgd or adamw")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        self.num_classes = num_classes
        self.backbone, self.width = create_backbone(
            backbone, pretrained=pretrained, pretrained_file=pretrained_file, **(backbone_kwargs or {})
        )
        if ff_dim is not None:
            if isinstance(ff_dim, bool) or not isinstance(ff_dim, int) or not 1 <= ff_dim <= self.width:
                raise ValueError(f"ff_dim must be an integer in [1, {self.width}] (the {backbone} width), got {ff_dim!r}")
            head = "ff_projection" if head == "ff_projection" else "ff"
            nesting = [ff_dim]
        self.head_kind: str = head
        if head in ("ff", "ff_projection"):
            sizes = validate_nesting(nesting if nesting is not None else [self.width], self.width)
            if len(sizes) != 1:
                raise ValueError(f"a fixed-feature head trains one size; got nesting={sizes}")
            self.head = FixedFeatureHead(self.width, num_classes, sizes[0], projection=head == "ff_projection")
        else:
            sizes = nesting if nesting is not None else default_nesting(self.width)
            self.head = MatryoshkaHead(self.width, num_classes, sizes, efficient=head == "mrl_e")
        self.nesting: list[int] = list(self.head.nesting)
        self.criterion = MatryoshkaLoss(len(self.nesting), loss_weights, label_smoothing)
        self.train_acc = MatryoshkaAccuracy(self.nesting, num_classes, top_k)
        self.val_acc = MatryoshkaAccuracy(self.nesting, num_classes, top_k)
        self.test_acc = MatryoshkaAccuracy(self.nesting, num_classes, top_k)
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self.test_results: list[dict] = []
        # Cascade thresholds [G-1], fitted by AdaptiveClassificationCallback; NaN until then.
        # A buffer, so they are saved in and restored from checkpoints.
        self.register_buffer("adaptive_thresholds", torch.full((max(0, len(self.nesting) - 1),), float("nan")))

    # ----------------------------------------------------------------- inference API
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone embedding ``[N, d]``."""
        if self.hparams.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        z = self.backbone(x)
        if z.ndim != 2 or z.shape[1] != self.width:
            raise RuntimeError(
                f"backbone {self.hparams.backbone!r} returned features of shape {tuple(z.shape)}, "
                f"expected [N, {self.width}]"
            )
        return z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for every nesting size, ``[G, N, C]``."""
        return self.head(self.features(x))

    def eval_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluation logits ``[G, N, C]``: with ``eval_flip_tta``, those of x plus its mirror image."""
        if not self.hparams.eval_flip_tta:
            return self(x)
        return self(torch.cat([x, x.flip(-1)])).unflatten(1, (2, x.shape[0])).sum(1)

    def embed(self, x: torch.Tensor, dim: int | None = None, normalize: bool = False) -> torch.Tensor:
        """The embedding truncated to ``dim`` (a nesting size; default the largest): ``[N, dim]``.

        For an ``ff_projection`` head this is the learned ``m``-dimensional projection.
        """
        dim = self.nesting[-1] if dim is None else dim
        self.head.index_of(dim)
        z = self.features(x)
        e = self.head.embed(z) if isinstance(self.head, FixedFeatureHead) else z[:, :dim]
        return torch.nn.functional.normalize(e, dim=-1) if normalize else e

    def predict(self, x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
        """Class predictions ``[N]`` from the first ``dim`` dimensions (one head size only)."""
        dim = self.nesting[-1] if dim is None else dim
        return self.head.logits_at(self.features(x), dim).argmax(-1)

    def predict_adaptive(
        self, x: torch.Tensor, thresholds: Sequence[float] | torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Classify with as few dimensions as each image needs: ``x -> (preds [N], exit_size [N])``.

        The backbone runs once; size ``g`` is evaluated only for the images still undecided (max
        softmax probability below ``thresholds[g]`` at every smaller size); the largest size always
        answers. With MRL-E, each size's logits reuse the previous size's (only the new block of
        the shared weight is multiplied). ``thresholds`` default to the fitted ones. With
        ``eval_flip_tta`` the logits of the image and its mirror image are summed, as in evaluation.
        """
        g_count = len(self.nesting)
        thr = self.adaptive_thresholds if thresholds is None else thresholds
        if thresholds is None and g_count > 1 and bool(torch.isnan(self.adaptive_thresholds).any()):
            raise ValueError(
                "no adaptive thresholds: fit them with AdaptiveClassificationCallback during "
                "validation or pass thresholds=[...] (one per size but the last)"
            )
        views = [x, x.flip(-1)] if self.hparams.eval_flip_tta else [x]
        return cascade_predict(self.head, [self.features(v) for v in views], thr)

    # ----------------------------------------------------------------- training loop
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, (list, tuple)) and len(batch) >= 2 and torch.is_tensor(batch[1]):
            if batch[1].device.type == "cpu":
                check_labels(batch[1], self.num_classes)
        return batch

    def _shared_step(self, batch: Any, stage: str) -> Any:
        x, y = batch[0], batch[1]
        logits = self(x) if stage == "train" else self.eval_logits(x)
        loss = self.criterion(logits, y)
        getattr(self, f"{stage}_acc").update(logits.detach(), y)
        self.log(f"{stage}/loss", loss, on_step=stage == "train", on_epoch=True,
                 prog_bar=stage == "train", batch_size=y.shape[0], sync_dist=stage != "train")
        if stage == "train":
            return loss
        return {"loss": loss, "logits": logits.detach(), "target": y}  # for callbacks (the cascade)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._shared_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        """Per-size predictions: ``preds`` and max-softmax ``confidence``, both ``[N, G]``, or with
        ``adaptive_predict`` the cascade's ``adaptive_pred`` and ``adaptive_dims`` (the size that
        decided), both ``[N]``; plus ``target`` when the batch carries labels."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        if self.hparams.adaptive_predict:
            preds, sizes = self.predict_adaptive(x)
            out = {"adaptive_pred": preds, "adaptive_dims": sizes}
        else:
            probs = self.eval_logits(x).float().softmax(-1)  # [G, N, C]
            conf, preds = probs.max(-1)
            out = {"preds": preds.T.contiguous(), "confidence": conf.T.contiguous()}
        if isinstance(batch, (list, tuple)) and len(batch) >= 2:
            out["target"] = batch[1]
        return out

    def _log_accuracy(self, stage: str) -> dict[str, float]:
        metric: MatryoshkaAccuracy = getattr(self, f"{stage}_acc")
        if not metric.update_called:
            return {}
        values = {f"{stage}/{k}": v for k, v in metric.compute().items()}  # synced across ranks
        metric.reset()
        self.log_dict(values, prog_bar=False)
        return {k: float(v) for k, v in values.items()}

    def on_train_epoch_end(self) -> None:
        self._log_accuracy("train")

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._log_accuracy("val")
        else:
            self.val_acc.reset()

    def on_test_epoch_end(self) -> None:
        values = self._log_accuracy("test")
        rows = accuracy_rows(values, prefix="test/")
        self.test_results = rows
        out_dir = self.trainer.log_dir or self.trainer.default_root_dir  # a collective under DDP: every rank asks
        if self.trainer.is_global_zero and rows:
            title = f"{self.hparams.backbone} {self.head_kind} test accuracy"
            rank_zero_info("\n" + format_table(rows, title))
            csv_path, png_path = write_accuracy_report(rows, out_dir, title=title)
            rank_zero_info(f"wrote {csv_path} and {png_path}")

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> dict:
        hp = self.hparams
        opt = build_optimizer(
            hp.optimizer, param_groups(self, hp.weight_decay), hp.lr, hp.momentum, hp.nesterov
        )
        trainer = self.trainer
        total = int(trainer.estimated_stepping_batches)
        warmup = int(round(hp.warmup_epochs * self._optimizer_steps_per_epoch(total)))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(hp.lr_schedule, total, warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _optimizer_steps_per_epoch(self, total_steps: int) -> float:
        """Optimizer steps in one pass over the training data (for epoch-based warm-up)."""
        trainer = self.trainer
        if not math.isfinite(trainer.num_training_batches):
            trainer.fit_loop.setup_data()  # with only max_steps set, Lightning has not loaded it yet
        batches = trainer.num_training_batches
        if math.isfinite(batches) and batches > 0:
            return math.ceil(batches / trainer.accumulate_grad_batches)
        max_epochs = trainer.max_epochs or -1  # an iterable without a length
        return total_steps / max_epochs if max_epochs > 0 else total_steps
