"""``MatryoshkaClassifier``: the Lightning task that trains a :class:`MatryoshkaModel`.

It owns the loss, the per-size metrics, the steps and the optimisation; the network (and its
inference API) is ``task.model``, and files are written by callbacks
(:class:`mrl_vision.callbacks.AccuracyReport`, :class:`~mrl_vision.callbacks.AdaptiveClassificationCallback`).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import torch

from .embedding_loss import EmbeddingLoss, view_ids
from .losses import MatryoshkaLoss
from .matryoshka2d import Matryoshka2d, Matryoshka2dLoss, grid_key, resolve_eval_layers
from .metrics import MatryoshkaAccuracy, MatryoshkaRetrieval
from .mixup import BatchMixing
from .model import MatryoshkaModel, model_state, upgrade_config
from .optim import build_optimizer, lr_factor


class MatryoshkaClassifier(L.LightningModule):
    """Train a :class:`MatryoshkaModel` with the summed per-size cross-entropy.

    Args:
        num_classes: C (linked from the data module by the CLI, as are the model's ``class_names``,
            ``input_size``, ``mean`` and ``std``).
        model_kwargs: the other :class:`MatryoshkaModel` arguments (``backbone``, ``head``, ``dims``,
            ``backbone_kwargs``, ``blurpool``, ``pretrained``, ...): the CLI reads them from its
            signature, so ``--model.head mrl_e`` and ``--model.dims '[8, 64]'`` work as before.
        loss_weights: one per size (default all 1).
        label_smoothing: cross-entropy label smoothing (the reference recipe: 0.1).
        optimizer, lr, momentum, nesterov, weight_decay, layer_decay: through timm's optimizer factory
            (``sgd`` or ``adamw``); weight decay is not applied to norm layers, biases, or timm's
            ``no_weight_decay()`` parameters; ``layer_decay`` (e.g. 0.75 for ViTs) scales each
            block's LR by ``layer_decay ** depth-from-top``.
        lr_schedule: ``triangular`` (linear up to ``warmup_epochs``, then linear to 0, as in the
            reference recipe), ``cosine`` (warm-up then cosine to 0) or ``constant``; per iteration.
        warmup_epochs: epochs of linear warm-up (the peak epoch for ``triangular``).
        eval_flip_tta: horizontal-flip test-time augmentation in validation, test and predict.
        adaptive_predict: ``predict`` runs the confidence cascade with the fitted thresholds.
        top_k: the k of the per-size top-k accuracies.
        matryoshka_2d: 2D Matryoshka training (:class:`mrl_vision.matryoshka2d.Matryoshka2d`: earlier
            blocks of a transformer trained to embed too, so the model can stop early); ``{}`` for the
            defaults, ``None`` (default) for 1D MRL. Needs a backbone with blocks of one width (ViT, DeiT, EVA).
        freeze_backbone: train only the head on a frozen backbone (its weights, BatchNorm statistics and
            dropout fixed: it stays in eval mode): MRL on top of an existing embedding, e.g. with
            ``pretrained_file``; the optimizer gets only the head's parameters.
        mixup_alpha / cutmix_alpha / mixup_prob / mixup_switch_prob: Mixup and CutMix on training batches
            (timm's ``--mixup``, ``--cutmix``, ``--mixup-prob``, ``--mixup-switch-prob``; 0.8 / 1.0 / 1.0 / 0.5
            in timm's ImageNet recipes): soft targets through the Matryoshka loss at every size, per-size
            training accuracy against the hard labels (:mod:`mrl_vision.mixup`). Both 0 (default): off.
        eval_layers: the blocks of the (block, size) evaluation grid: validation and test log
            ``top1@L{k}/{m}`` for each earlier block k (the last block is ``top1@{m}``); default every
            block with ``matryoshka_2d``, none otherwise.
        embedding_loss: Matryoshka training with an embedding loss (:class:`mrl_vision.embedding_loss.EmbeddingLoss`:
            a pytorch-metric-learning loss on every prefix, e.g. ``{loss: SupConLoss}``): with ``head: none``
            the model is a pure embedder trained by it alone; with a classifier head it is added to the
            cross-entropy (times its ``weight``). Training batches may hold several views of each image
            (``[N, V, 3, H, W]``, the data modules' ``views``). Validation and test then log per-size
            retrieval within the split (``recall{K}@{m}``, ``knn_top1@{m}``: every image queries the others),
            so they may hold classes unseen in training.
        retrieval_recall_at: the K of the ``recall{K}@{m}`` metrics (a model with an embedding loss).

    Example::

        task = MatryoshkaClassifier(num_classes=10, backbone="resnet18", head="mrl")
        L.Trainer(max_epochs=1).fit(task, datamodule=QuickstartDataModule())
        task.model.save_pretrained("runs/digits")   # the network alone
    """

    def __init__(
        self,
        num_classes: int,
        loss_weights: list[float] | None = None,
        label_smoothing: float = 0.0,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 5e-5,
        layer_decay: float | None = None,
        lr_schedule: Literal["triangular", "cosine", "constant"] = "cosine",
        warmup_epochs: float = 0.0,
        eval_flip_tta: bool = False,
        adaptive_predict: bool = False,
        top_k: list[int] = [1, 5],  # noqa: B006 (jsonargparse shows list defaults)
        matryoshka_2d: Matryoshka2d | None = None,
        eval_layers: list[int] | None = None,
        freeze_backbone: bool = False,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        embedding_loss: EmbeddingLoss | None = None,
        retrieval_recall_at: list[int] = [1, 2, 4, 8],  # noqa: B006
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        embedding_options = EmbeddingLoss.from_any(embedding_loss)  # (a mapping when loaded from a checkpoint)
        if embedding_options is not None and embedding_options.seed is None:
            embedding_options.seed = int(torch.initial_seed()) % (2**31)  # recorded: a resumed run draws the same sizes
        embedding_loss = None if embedding_options is None else embedding_options.as_dict()  # plain data in hparams
        matryoshka_2d = Matryoshka2d.from_any(matryoshka_2d)  # (a mapping when loaded from a checkpoint)
        if matryoshka_2d is not None and matryoshka_2d.seed is None:
            matryoshka_2d.seed = int(torch.initial_seed()) % (2**31)  # recorded: a resumed run draws the same blocks
        matryoshka_2d = None if matryoshka_2d is None else matryoshka_2d.as_dict()  # plain data in hparams
        for key in ("mean", "std"):  # lists, as in the data modules' hyperparameters (Lightning compares them)
            if model_kwargs.get(key) is not None:
                model_kwargs[key] = [float(v) for v in model_kwargs[key]]
        self.save_hyperparameters()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"unknown optimizer {optimizer!r}; choose sgd or adamw")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        if layer_decay is not None and not 0 < layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
        if freeze_backbone and layer_decay is not None:
            raise ValueError(f"layer_decay={layer_decay} scales the LR of backbone blocks, but freeze_backbone=True "
                             "trains only the head: drop one of them")
        lr_factor(lr_schedule, 1, 0)  # checks the schedule's name now, not at the first step
        # Checkpoints written before the rename spell dims as nesting (or ff_dim): read them as today's.
        model_kwargs = upgrade_config(model_kwargs)
        self.model = MatryoshkaModel(num_classes=num_classes, **model_kwargs)
        self.hparams["dims"] = self.model.dims  # resolved (a default of None becomes the sizes): saved
        if freeze_backbone:
            self.model.backbone.requires_grad_(False)
            self.model.backbone.eval()
        dims = self.model.dims
        self.classifier = self.model.head is not None
        self.embedding_loss = None
        if embedding_loss is not None:
            if matryoshka_2d is not None:
                raise ValueError("embedding_loss and matryoshka_2d cannot be combined yet: train one of them")
            if self.model.head_kind == "ff_projection":
                raise ValueError("embedding_loss trains prefixes of the backbone's embedding, but an ff_projection "
                                 "head embeds through its own projection: use head ff, mrl, mrl_e or none")
            if mixup_alpha != 0 or cutmix_alpha != 0:
                raise ValueError(f"embedding_loss needs hard labels, but Mixup/CutMix (mixup_alpha={mixup_alpha}, "
                                 f"cutmix_alpha={cutmix_alpha}) makes soft ones: turn them off")
            self.embedding_loss = embedding_options.build(dims, self.model.width, num_classes)
            self.embedding_weight = float(embedding_options.weight)
            self.embedding_targets = embedding_options.targets
            self.val_retrieval = MatryoshkaRetrieval(dims, retrieval_recall_at)
            self.test_retrieval = MatryoshkaRetrieval(dims, retrieval_recall_at)
        if freeze_backbone and not self.classifier:
            raise ValueError("freeze_backbone=True trains only the classifier head, but head 'none' has none: "
                             "nothing would train")
        if embedding_loss is None and not self.classifier:
            raise ValueError("head 'none' trains no classifier: give model.embedding_loss (e.g. {loss: SupConLoss}) "
                             "to train the embedding, or choose a classifier head")
        self.criterion = MatryoshkaLoss(len(dims), loss_weights, label_smoothing)
        self.mixing = None
        if mixup_alpha != 0 or cutmix_alpha != 0:
            self.mixing = BatchMixing(mixup_alpha, cutmix_alpha, mixup_prob, mixup_switch_prob, num_classes)
        if self.classifier:
            self.train_acc = MatryoshkaAccuracy(dims, num_classes, top_k)
            self.val_acc = MatryoshkaAccuracy(dims, num_classes, top_k)
            self.test_acc = MatryoshkaAccuracy(dims, num_classes, top_k)
        self.layer_loss: Matryoshka2dLoss | None = None
        self.eval_layers: list[int] | None = None
        if matryoshka_2d is not None or eval_layers is not None:
            depth = self.model.depth
            if depth is None or not hasattr(self.model.backbone, "forward_intermediates"):
                raise ValueError(
                    f"2D Matryoshka and eval_layers need a backbone with forward_intermediates and blocks of one "
                    f"width (a ViT, DeiT or EVA); {self.model.backbone_name!r} has none (CNN stages differ in width)")
            if matryoshka_2d is not None:
                self.layer_loss = Matryoshka2dLoss(self.criterion, depth, dims, matryoshka_2d)
            self.eval_layers = resolve_eval_layers(eval_layers, depth)
            grid = [grid_key(k, m) for k in self.eval_layers[:-1] for m in dims]
            if grid:
                self.val_grid_acc = MatryoshkaAccuracy(grid, num_classes, top_k)
                self.test_grid_acc = MatryoshkaAccuracy(grid, num_classes, top_k)

    def setup(self, stage: str) -> None:
        """Before any step: a self-supervised loss (``targets: views``) needs data that gives several views of
        each training image; open-set data (evaluation classes of their own) needs an embedder."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.classifier and getattr(dm, "open_set", False):
            raise ValueError("the data's evaluation splits hold classes of their own (open_set=True), which a "
                             "classifier head cannot score: train an embedder (head: none, with an embedding_loss)")
        if stage == "fit" and self.embedding_loss is not None and self.embedding_targets == "views" \
                and dm is not None and int(getattr(dm, "views", 1)) < 2:
            raise ValueError(f"embedding_loss targets='views' contrasts the views of each image, but the data gives "
                             f"{int(getattr(dm, 'views', 1))} view per image: set the data module's views to 2")

    def train(self, mode: bool = True) -> "MatryoshkaClassifier":
        """As ``nn.Module.train``, but a frozen backbone stays in eval mode (BatchNorm statistics, no dropout)."""
        super().train(mode)
        if self.hparams.get("freeze_backbone", False):
            self.model.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every size ``[G, N, C]``."""
        return self.model(x)

    def eval_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluation logits ``[G, N, C]`` (with ``eval_flip_tta``, of x plus its mirror image)."""
        return self.model.eval_logits(x, self.hparams.eval_flip_tta)

    def eval_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [G, N, C], embedding [N, d])`` of one backbone pass (:meth:`MatryoshkaModel.eval_outputs`)."""
        return self.model.eval_outputs(x, self.hparams.eval_flip_tta)

    # ----------------------------------------------------------------- steps
    def _shared_step(self, batch: Any, stage: str, batch_idx: int = 0) -> Any:
        x, y = batch[0], batch[1]
        if x.ndim == 5 or self.embedding_loss is not None:
            return self._embedding_step(x, y, stage)
        grid = None
        target = y  # the loss's target: soft under Mixup/CutMix; the accuracies keep y
        if stage == "train" and self.mixing is not None:
            x, target = self.mixing(x, y)
        if stage == "train" and self.layer_loss is not None:
            layers = self.layer_loss.step_layers(self.current_epoch, batch_idx)
            grid, z = self.model.layer_outputs(x, layers)
            logits = grid[-1]
            loss, parts = self.layer_loss(grid, z, layers, target)
            self.log_dict({f"train/loss_{k}": v for k, v in parts.items()}, on_step=False, on_epoch=True,
                          batch_size=y.shape[0])
        elif stage == "train":
            logits = self(x)
            loss = self.criterion(logits, target)
        elif self.eval_layers is not None:  # the (block, size) grid from one forward pass
            grid, zs = self.model.layer_outputs(x, self.eval_layers, self.hparams.eval_flip_tta)
            logits, z = grid[-1], zs[-1]
            if len(self.eval_layers) > 1:
                getattr(self, f"{stage}_grid_acc").update(grid[:-1].detach().flatten(0, 1), y)
            loss = self.criterion(logits, y)
        else:
            logits, z = self.eval_outputs(x)
            loss = self.criterion(logits, y)
        getattr(self, f"{stage}_acc").update(logits.detach(), y)
        self._log_loss(stage, loss, y.shape[0])
        if stage == "train":
            return loss
        # for callbacks: the cascade reads the logits, KNNMonitor the embedding, the 2D cascade the grid
        out = {"loss": loss, "logits": logits.detach(), "target": y, "embedding": z.detach()}
        if grid is not None:
            out["layer_logits"] = grid.detach()  # [K, G, N, C] over eval_layers
        return out

    def _log_loss(self, stage: str, loss: torch.Tensor, batch_size: int, name: str = "loss") -> None:
        self.log(f"{stage}/{name}", loss, on_step=stage == "train" and name == "loss", on_epoch=True,
                 prog_bar=stage == "train" and name == "loss", batch_size=batch_size, sync_dist=stage != "train")

    def _embedding_step(self, x: torch.Tensor, y: torch.Tensor, stage: str) -> Any:
        """A step with the embedding loss (and the cross-entropy of a classifier head): training batches may
        hold ``V`` views of each image (``[N, V, 3, H, W]``); evaluation scores retrieval within the split."""
        if self.embedding_loss is None:
            raise ValueError(f"a batch of several views per image ({list(x.shape)}) needs model.embedding_loss "
                             "(a contrastive loss between the views); set the data's views to 1 otherwise")
        n, views = x.shape[0], 1
        if x.ndim == 5:
            if stage != "train":
                raise ValueError(f"{stage} batches must hold one view per image, got {list(x.shape)}")
            views = x.shape[1]
            x = x.flatten(0, 1)  # image-major: the views of image i are rows i*V ... i*V + V-1
        labels = y.repeat_interleave(views) if views > 1 else y
        if stage == "train":
            z = self.model.features(x)
            if self.embedding_targets == "views":
                targets = view_ids(n, views, self.global_rank, self.trainer.world_size if self._trainer else 1, x.device)
            else:
                targets = labels
            loss = metric = self.embedding_loss(z, targets, step=self.global_step)
            if self.classifier:
                logits = self.model.head(z)
                ce = self.criterion(logits, labels)
                loss = ce + self.embedding_weight * metric
                self.train_acc.update(logits.detach(), labels)
                self._log_loss(stage, ce, labels.shape[0], "loss_ce")
            self._log_loss(stage, metric, labels.shape[0], "loss_embedding")
            self._log_loss(stage, loss, labels.shape[0])
            return loss
        if self.classifier:
            logits, z = self.eval_outputs(x)
            getattr(self, f"{stage}_acc").update(logits.detach(), y)
            loss = self.criterion(logits, y)
        else:
            z, logits = self.model.features(x), None
            loss = None
        if self.embedding_targets == "labels" and n > 1:  # (instance ids of single views have no positives)
            metric = self.embedding_loss(z, y, every_size=True, gather=False)
            self._log_loss(stage, metric, n, "loss_embedding")
            loss = metric if loss is None else loss + self.embedding_weight * metric
        if loss is not None:
            self._log_loss(stage, loss, n)
        getattr(self, f"{stage}_retrieval").update(z.detach(), y)
        out = {"target": y, "embedding": z.detach()}
        if loss is not None:
            out["loss"] = loss
        if logits is not None:
            out["logits"] = logits.detach()
        return out

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train", batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._shared_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        """Per-size predictions: ``preds`` and max-softmax ``confidence``, both ``[N, G]``, or with
        ``adaptive_predict`` the cascade's ``adaptive_pred`` and ``adaptive_dims`` (the size that
        decided), both ``[N]``; plus ``target`` when the batch carries labels."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        if not self.classifier:
            raise ValueError("predict classifies, but this model has no classifier head (head 'none'): write its "
                             "embeddings with mrl-vision embed, and search them with mrl-vision retrieve")
        if self.hparams.adaptive_predict:
            preds, sizes = self.model.predict_adaptive(x, flip_tta=self.hparams.eval_flip_tta)
            out = {"adaptive_pred": preds, "adaptive_dims": sizes}
        else:
            conf, preds = self.eval_logits(x).float().softmax(-1).max(-1)  # [G, N]
            out = {"preds": preds.T.contiguous(), "confidence": conf.T.contiguous()}
        if isinstance(batch, (list, tuple)) and len(batch) >= 2:
            out["target"] = batch[1]
        return out

    def _log_accuracy(self, stage: str) -> None:
        for name in (f"{stage}_acc", f"{stage}_grid_acc", f"{stage}_retrieval"):
            metric: MatryoshkaAccuracy | MatryoshkaRetrieval | None = getattr(self, name, None)
            if metric is None:
                continue
            if metric.update_called:
                self.log_dict({f"{stage}/{k}": v for k, v in metric.compute().items()})  # synced across ranks
            metric.reset()

    def on_train_epoch_end(self) -> None:
        self._log_accuracy("train")

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            for name in ("val_acc", "val_grid_acc", "val_retrieval"):
                if hasattr(self, name):
                    getattr(self, name).reset()
        else:
            self._log_accuracy("val")

    def on_test_epoch_end(self) -> None:
        self._log_accuracy("test")

    # ----------------------------------------------------------------- checkpoints
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints written before the network moved to ``self.model`` (keys ``backbone.*``,
        ``head.*``, hyperparameters ``nesting``/``ff_dim``) load as today's."""
        state = checkpoint["state_dict"]
        if not any(k.startswith("model.") for k in state):
            checkpoint["state_dict"] = {f"model.{k}": v for k, v in model_state(state).items()}
        if "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"] = upgrade_config(checkpoint["hyper_parameters"])

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> dict:
        hp = self.hparams
        trained = self.model.head if hp.get("freeze_backbone", False) else self.model
        opt = build_optimizer(trained, hp.optimizer, hp.lr, hp.weight_decay, hp.momentum, hp.nesterov, hp.layer_decay)
        extra = [p for p in self.embedding_loss.parameters() if p.requires_grad] if self.embedding_loss is not None else []
        if extra:  # a loss's own parameters (ArcFace's class centres, one set per size): at the top LR
            opt.add_param_group({"params": extra, "lr": hp.lr, "weight_decay": hp.weight_decay})
        total = int(self.trainer.estimated_stepping_batches)
        warmup = int(round(hp.warmup_epochs * self._optimizer_steps_per_epoch(total)))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(hp.lr_schedule, total, warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _optimizer_steps_per_epoch(self, total_steps: int) -> float:
        """Optimizer steps in one pass over the training data (for epoch-based warm-up)."""
        trainer = self.trainer
        if not math.isfinite(trainer.num_training_batches):
            # With only max_steps set, Lightning has not sized the training loader yet; the fit
            # loop's setup_data is what sizes it (no public API does).
            trainer.fit_loop.setup_data()
        batches = trainer.num_training_batches
        if math.isfinite(batches) and batches > 0:
            return math.ceil(batches / trainer.accumulate_grad_batches)
        max_epochs = trainer.max_epochs or -1  # an iterable without a length
        return total_steps / max_epochs if max_epochs > 0 else total_steps
