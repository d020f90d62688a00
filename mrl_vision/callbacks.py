"""Lightning callbacks of mrl-vision."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from .ema import EMA  # noqa: F401 (mrl_vision.callbacks.EMA in configs)
from .files import atomic_write_text


class PredictionWriter(BasePredictionWriter):
    """Write ``mrl-vision predict`` results to ``predictions.csv`` in the run's log directory.

    One row per image: its index in the predict set, the file it came from (``sample``, where the data
    module names its samples), its label when the data has one, then the predicted class and
    max-softmax confidence at every size (``pred@8``, ``conf@8``, ...), or with ``adaptive_predict``
    the cascade's class and deciding size (``adaptive_pred``, ``adaptive_dims``), and the class names
    of the labels and predictions (``target_class``, ``class@8``, ``adaptive_pred_class``) when the
    model has them. Under DDP each rank
    writes ``predictions.rank{R}.csv`` for its shard.

    Example (CLI)::

        mrl-vision predict --config configs/quickstart.yaml --ckpt_path runs/.../last.ckpt
    """

    def __init__(self, output_dir: str | None = None, filename: str = "predictions.csv") -> None:
        super().__init__(write_interval="epoch")
        self.output_dir, self.filename = output_dir, filename
        self.path: Path | None = None

    @staticmethod
    def _sample_names(trainer: L.Trainer) -> list[str] | None:
        from .data import MatryoshkaDataModule

        dm = trainer.datamodule
        return dm.sample_names("predict") if isinstance(dm, MatryoshkaDataModule) else None

    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Sequence[Any], batch_indices: Sequence[Any]
    ) -> None:
        outputs = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        if not outputs:
            return
        cols: dict[str, torch.Tensor] = {}
        dims = list(pl_module.model.dims)
        if "target" in outputs[0]:
            cols["target"] = torch.cat([o["target"] for o in outputs]).cpu()
        if "preds" in outputs[0]:
            preds = torch.cat([o["preds"] for o in outputs]).cpu()
            conf = torch.cat([o["confidence"] for o in outputs]).cpu()
            cols.update({f"pred@{m}": preds[:, g] for g, m in enumerate(dims)})
            cols.update({f"conf@{m}": conf[:, g] for g, m in enumerate(dims)})
        for key in ("adaptive_pred", "adaptive_dims"):
            if key in outputs[0]:
                cols[key] = torch.cat([o[key] for o in outputs]).cpu()
        n = len(next(iter(cols.values())))
        indices = batch_indices[0] if batch_indices and isinstance(batch_indices[0], list) else batch_indices
        flat = [i for batch in indices if batch is not None for i in batch] if indices else []
        if len(flat) != n:  # loaders without a sampler (FFCV) report no indices: use the order
            flat = list(range(n))
        table: dict[str, list] = {"index": flat}
        names = self._sample_names(trainer)
        if names is not None and len(names) > max(flat, default=-1):
            table["sample"] = [names[i] for i in flat]
        table.update({k: [f"{float(x):.4f}" if v.is_floating_point() else int(x) for x in v] for k, v in cols.items()})
        classes = pl_module.model.class_names
        if classes is not None:  # the class name beside each predicted index
            for key in [k for k in cols if k.startswith("pred@") or k in ("target", "adaptive_pred")]:
                label = "class@" + key[5:] if key.startswith("pred@") else f"{key}_class"
                table[label] = [classes[int(i)] if 0 <= int(i) < len(classes) else "" for i in cols[key]]
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(list(table))
        writer.writerows(zip(*table.values()))
        name = self.filename
        if trainer.world_size > 1:
            stem, ext = os.path.splitext(name)
            name = f"{stem}.rank{trainer.global_rank}{ext}"
        out_dir = self.output_dir or trainer.log_dir or trainer.default_root_dir
        self.path = Path(out_dir) / name
        atomic_write_text(self.path, buf.getvalue())
        print(f"wrote {n} predictions to {self.path}")


class AccuracyReport(L.Callback):
    """The per-size accuracy table: printed, and written as ``{stage}_accuracy.csv`` and ``.png``
    (log-2 axis) into the run's log directory through :mod:`mrl_vision.report`, at the end of ``fit``
    (the last validation) and of ``test``. A 2D Matryoshka task (``eval_layers`` of several blocks) also
    gets its (block, size) grid printed and written as ``{stage}_grid.csv`` and a heatmap ``.png``.

    A model trained with an embedding loss gets its per-size retrieval table (``recall{K}``,
    ``knn_top1``) printed and written as ``{stage}_retrieval.csv`` and ``.png`` (Recall@1 against dims).

    The CLI adds it when a config has none. ``rows`` keeps the last table
    (``[{"dims", "top1", "top5"}]``, percent), ``grid`` the last grid (``[{"layers", "dims", "top1",
    "top5"}]``, percent; empty without one), ``retrieval`` the last retrieval table (``[{"dims", "recall1",
    ..., "knn_top1"}]``, percent; empty without one).
    """

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.grid: list[dict] = []
        self.retrieval: list[dict] = []

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, "test")

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from .report import (RETRIEVAL_METRICS, accuracy_rows, format_grid, format_table, grid_rows,
                             write_accuracy_report, write_grid_report)

        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"{stage}/")}
        self.rows = accuracy_rows(metrics, prefix=f"{stage}/")
        self.retrieval = accuracy_rows(metrics, prefix=f"{stage}/", families=RETRIEVAL_METRICS)
        layers = getattr(pl_module, "eval_layers", None)  # the last is the full depth
        self.grid = grid_rows(metrics, f"{stage}/", depth=layers[-1]) if layers and len(layers) > 1 else []
        out_dir = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank asks
        if not trainer.is_global_zero or not (self.rows or self.grid or self.retrieval):
            return
        model = pl_module.model
        name = f"{model.backbone_name} {model.head_kind or 'embedder'} {'validation' if stage == 'val' else stage}"
        if self.retrieval:
            title = f"{name} retrieval within the split"
            rank_zero_info("\n" + format_table(self.retrieval, title))
            csv_path, png_path = write_accuracy_report(self.retrieval, out_dir, stem=f"{stage}_retrieval", title=title,
                                                       metric="recall1")
            rank_zero_info(f"wrote {csv_path} and {png_path}")
        if self.rows:
            rank_zero_info("\n" + format_table(self.rows, f"{name} accuracy"))
            csv_path, png_path = write_accuracy_report(self.rows, out_dir, stem=f"{stage}_accuracy", title=f"{name} accuracy")
            rank_zero_info(f"wrote {csv_path} and {png_path}")
        if self.grid:
            title = f"{name} top-1 accuracy (%) by blocks x dims"
            rank_zero_info("\n" + format_grid(self.grid, title))
            csv_path, png_path = write_grid_report(self.grid, out_dir, stem=f"{stage}_grid", title=title)
            rank_zero_info(f"wrote {csv_path} and {png_path}")


def progressive_resolution(epoch: int, min_res: int, max_res: int, start_ramp: int, end_ramp: int, step: int = 32) -> int:
    """Training resolution at ``epoch``: ``min_res`` up to ``start_ramp``, ``max_res`` from
    ``end_ramp``, linear in between rounded to a multiple of ``step`` (the reference recipe)."""
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    frac = (epoch - start_ramp) / (end_ramp - start_ramp)
    return int(round((min_res + frac * (max_res - min_res)) / step)) * step


class ProgressiveResizing(L.Callback):
    """Grow the training crop from ``min_res`` to ``max_res`` between ``start_ramp`` and
    ``end_ramp`` epochs (multiples of ``step``), as in the FFCV ImageNet recipe (160 -> 192 px
    between epochs 29 and 34 of 40).

    Works with a data module whose ``resizable`` is true (``FFCVDataModule``: its
    ``set_train_resolution`` changes the decoder's output size, effective from the next epoch's first
    batch), also when a run resumes from a checkpoint mid-schedule.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: mrl_vision.callbacks.ProgressiveResizing
              init_args: {min_res: 160, max_res: 192, start_ramp: 29, end_ramp: 34}
    """

    def __init__(self, min_res: int = 160, max_res: int = 192, start_ramp: int = 29, end_ramp: int = 34, step: int = 32) -> None:
        if not 0 < min_res <= max_res:
            raise ValueError(f"need 0 < min_res <= max_res, got min_res={min_res}, max_res={max_res}")
        if end_ramp <= start_ramp:
            raise ValueError(f"end_ramp ({end_ramp}) must be after start_ramp ({start_ramp})")
        if step < 1 or min_res % step or max_res % step:
            raise ValueError(f"min_res ({min_res}) and max_res ({max_res}) must be multiples of step ({step})")
        self.min_res, self.max_res, self.start_ramp, self.end_ramp, self.step = min_res, max_res, start_ramp, end_ramp, step

    def resolution(self, epoch: int) -> int:
        return progressive_resolution(epoch, self.min_res, self.max_res, self.start_ramp, self.end_ramp, self.step)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from .data import MatryoshkaDataModule

        dm = trainer.datamodule
        if stage == "fit" and not (isinstance(dm, MatryoshkaDataModule) and dm.resizable):
            raise TypeError(
                f"ProgressiveResizing needs a data module that can change its training resolution; "
                f"{type(dm).__name__} cannot (use FFCVDataModule)"
            )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # FFCVDataModule's training loader starts decoding an epoch at its first batch, which comes
        # after this hook (also for the first epoch of a resumed run, once the epoch is restored).
        res = self.resolution(trainer.current_epoch)
        trainer.datamodule.set_train_resolution(res)
        pl_module.log("train/resolution", float(res), on_step=False, on_epoch=True)


def gather_eval_rows(trainer: L.Trainer, pl_module: L.LightningModule, rows: torch.Tensor) -> torch.Tensor:
    """All ranks' per-sample rows ``[N_local, F]`` as the whole evaluation set ``[N, F]``, in
    dataset order.

    Under DDP each rank evaluates the strided shard ``r, r + W, r + 2W, ...`` without repeats (the
    data modules' evaluation samplers), so shards differ by at most one row. They are padded to
    equal length for ``all_gather``, interleaved back into dataset order, and the padding (which
    lands at the end) is cut off: the rows equal those of a single-process run.
    """
    if trainer.world_size == 1:
        return rows
    sizes = pl_module.all_gather(torch.tensor(rows.shape[0], device=rows.device))  # [W]
    longest, total = int(sizes.max()), int(sizes.sum())
    padded = torch.cat([rows, rows.new_zeros(longest - rows.shape[0], rows.shape[1])])
    gathered = pl_module.all_gather(padded)  # [W, longest, F]
    world, _, f = gathered.shape
    return gathered.transpose(0, 1).reshape(world * longest, f)[:total]


class AdaptiveClassificationCallback(L.Callback):
    """Fit and evaluate the confidence cascade at the end of validation and test.

    Validation: the evaluated set (gathered across DDP ranks) is split, seeded, into a calibration
    part (``calibration_fraction``) on which thresholds are fitted with ``method`` and the rest on
    which they (and the fixed sizes, and the family of cascades in the curve) are evaluated. Test:
    the thresholds fitted on validation (in this run, or restored from the checkpoint) are evaluated
    on the whole test set, and so are the fixed sizes and the curve's family (traced on it); without
    fitted thresholds, the test set is split as in validation. Logs ``adaptive/top1``, ``adaptive/expected_dims`` and
    ``adaptive/expected_head_cost`` and, for comparing the tolerance met on each population, ``adaptive/largest_top1``
    (the largest size on the same samples as ``adaptive/top1``) and, where thresholds are fitted,
    ``adaptive/calibration_top1`` and ``adaptive/calibration_largest_top1`` (the fitted cascade and the
    largest size on the calibration part): calibration, held-out validation and test side by side
    (fractions in [0, 1]); rank 0 writes ``adaptive_{stage}_curve.csv`` and ``.png``
    (cascade trade-off beside the fixed sizes) into the log directory. The thresholds are stored
    in the model's ``adaptive_thresholds`` buffer (``task.model``), hence in every checkpoint and saved model.

    Args:
        method: ``tolerance`` (the cheapest cascade within ``tolerance`` of the largest size's
            accuracy), ``budget`` (the most accurate within ``budget`` expected dims) or
            ``pairwise`` (the reference's per-pair search).
        tolerance: accuracy drop allowed, as a fraction (0.005 = half a point).
        confidence: for ``method="tolerance"``, hold the tolerance with this confidence (e.g. 0.95):
            a cascade qualifies only when a lower confidence bound on its accuracy difference to the
            largest size on the calibration part (:func:`mrl_vision.adaptive.paired_lower_bound`) is
            within ``tolerance``, a margin for that part's sampling error, so that the drop also holds on
            test. ``None`` (the default, as before): the calibration accuracies as they are, which often
            lose more than ``tolerance`` on test. Recommended: 0.95.
        budget: expected dimensions, for ``method="budget"``.
        calibration_fraction / seed: the calibration split.
        write_curve: write the trade-off CSV and PNG.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: mrl_vision.callbacks.AdaptiveClassificationCallback
              init_args: {method: tolerance, tolerance: 0.005, confidence: 0.95}
    """

    def __init__(
        self,
        method: str = "tolerance",
        tolerance: float = 0.005,
        budget: float | None = None,
        calibration_fraction: float = 0.5,
        seed: int = 0,
        write_curve: bool = True,
        confidence: float | None = None,
    ) -> None:
        from .adaptive import METHODS, validate_confidence

        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
        self.confidence = validate_confidence(confidence)
        if confidence is not None and method != "tolerance":
            raise ValueError(f"confidence={confidence!r} applies to method='tolerance' only, not {method!r}")
        if method == "budget" and budget is None:
            raise ValueError("method='budget' needs budget (expected dimensions)")
        if not 0.0 < calibration_fraction < 1.0:
            raise ValueError(f"calibration_fraction must be in (0, 1), got {calibration_fraction}")
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}")
        self.method, self.tolerance, self.budget = method, tolerance, budget
        self.calibration_fraction, self.seed, self.write_curve = calibration_fraction, seed, write_curve
        self.thresholds: list[float] | None = None
        self.result: dict | None = None
        self._rows: list[torch.Tensor] = []

    # -- collecting
    def _start(self, *args: Any) -> None:
        self._rows = []

    on_validation_epoch_start = on_test_epoch_start = _start

    def _collect(self, trainer: L.Trainer, outputs: Any) -> None:
        from .adaptive import confidences

        if trainer.sanity_checking or not isinstance(outputs, dict) or "logits" not in outputs:
            return
        conf, preds = confidences(outputs["logits"])
        # One row per sample: G confidences, G predictions, the label (float64 holds them exactly).
        self._rows.append(torch.cat([conf.T.double(), preds.T.double(), outputs["target"].double()[:, None]], 1))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(trainer, outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(trainer, outputs)

    # -- fitting
    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from . import adaptive as A

        if trainer.sanity_checking or not self._rows:
            return
        model = pl_module.model
        g = len(model.dims)
        if g < 2:
            return
        rows = gather_eval_rows(trainer, pl_module, torch.cat(self._rows)).cpu()
        self._rows = []
        conf, preds, labels = rows[:, :g].T.float(), rows[:, g : 2 * g].T.long(), rows[:, 2 * g].long()
        dims = list(model.dims)
        fitted = model.adaptive_thresholds.detach().cpu()
        cal_idx, rest_idx = A.calibration_split(labels.numel(), self.calibration_fraction, self.seed)
        if stage == "test" and not bool(torch.isnan(fitted).any()):
            # fitted on validation: the cascade, the fixed sizes and the family's curve all on the
            # whole test set (one population per plot and table)
            thr = fitted
            eval_idx = cal_idx = rest_idx = torch.arange(labels.numel())
            fit_logs = {}
        else:
            eval_idx = rest_idx
            thr = A.fit_thresholds(
                conf[:, cal_idx], preds[:, cal_idx], labels[cal_idx], dims,
                method=self.method, tolerance=self.tolerance, budget=self.budget, confidence=self.confidence,
            )
            model.adaptive_thresholds.copy_(thr.to(model.adaptive_thresholds.device))
            cal = A.evaluate_cascade(conf[:, cal_idx], preds[:, cal_idx], labels[cal_idx], dims, thr)
            fit_logs = {
                "adaptive/calibration_top1": cal.accuracy,
                "adaptive/calibration_largest_top1": float(preds[-1, cal_idx].eq(labels[cal_idx]).double().mean()),
            }
        res = A.evaluate_cascade(conf[:, eval_idx], preds[:, eval_idx], labels[eval_idx], dims, thr)
        self.thresholds, self.result = res.thresholds, res.as_dict()
        pl_module.log_dict(
            {
                "adaptive/top1": res.accuracy,
                "adaptive/expected_dims": res.expected_dims,
                "adaptive/expected_head_cost": res.expected_head_cost,
                "adaptive/largest_top1": float(preds[-1, eval_idx].eq(labels[eval_idx]).double().mean()),
                **fit_logs,
            }
        )
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)  # log_dir is a collective under DDP: every rank asks
        if self.write_curve and trainer.is_global_zero:
            curve = A.tradeoff_curve(
                conf[:, cal_idx], preds[:, cal_idx], labels[cal_idx],
                conf[:, rest_idx], preds[:, rest_idx], labels[rest_idx], dims,
            )
            write_adaptive_curve(curve, res, out_dir, stage)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module, "test")

    def state_dict(self) -> dict[str, Any]:
        return {"thresholds": self.thresholds, "result": self.result, "method": self.method, "confidence": self.confidence}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.thresholds, self.result = state_dict.get("thresholds"), state_dict.get("result")


class KNNMonitor(L.Callback):
    """Per-size kNN top-1 of the validation images against a bank of training embeddings, as
    self-supervised frameworks monitor their representations: ``val/knn_top1@m`` for every size ``m``,
    a fraction in [0, 1] like ``val/top1@m``. Off unless added to the trainer's callbacks.

    At the start of each validation it embeds (eval mode, no autograd, the Trainer's precision)
    ``bank_size`` samples of the training split spread evenly over it (sample ``i * N // bank_size``:
    every class of a split stored class by class), read with the evaluation transform through the
    data module's ``eval_dataloader("train", subset=...)``; under DDP each rank reads its unpadded
    share of them and the shares are gathered in order, so every rank holds the same bank. Each
    validation image's pooled embedding (what
    ``validation_step`` returns under ``embedding``; the image itself, not its mirror, under flip TTA)
    is compared with the bank at each size: the first ``m`` dimensions, L2-normalised, cosine
    similarity (:func:`mrl_vision.retrieval.normalize_prefix`, :func:`~mrl_vision.retrieval.exact_search`);
    its ``k`` nearest training samples vote for its class (:func:`mrl_vision.retrieval.knn_vote`). Correct and total counts
    are summed over the ranks (whose validation shards hold every sample once), so the values equal a
    single process's. The sanity check is skipped.

    Args:
        bank_size: training samples in the bank (fewer when the split is smaller); at least ``k``.
        k: neighbours that vote.
        dims: the sizes to monitor, each in ``[1, width]`` (default: the model's ``dims``).
        every_n_epochs: during ``fit``, run at the validations of every n-th epoch (``validate`` always runs).
        temperature: ``None``: majority vote (a tie goes to the label of the nearer neighbour); a float ``T > 0``:
            DINO's weighted vote, each neighbour weighing ``exp(similarity / T)`` (DINO uses 0.07).

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: mrl_vision.callbacks.KNNMonitor
              init_args: {bank_size: 10000, k: 20}

    Example (CLI)::

        mrl-vision fit --config configs/quickstart.yaml \\
            --trainer.callbacks+=mrl_vision.callbacks.KNNMonitor --trainer.callbacks.bank_size 4000
    """

    def __init__(
        self,
        bank_size: int = 10000,
        k: int = 20,
        dims: list[int] | None = None,
        every_n_epochs: int = 1,
        temperature: float | None = None,
    ) -> None:
        for name, value in (("k", k), ("bank_size", bank_size), ("every_n_epochs", every_n_epochs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {name}={value!r}")
        if bank_size < k:
            raise ValueError(f"bank_size must be >= k: bank_size={bank_size} is below k={k}")
        if temperature is not None and not temperature > 0:
            raise ValueError(f"temperature must be > 0 (or None for a majority vote), got temperature={temperature!r}")
        if dims is not None:
            if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence) or not dims:
                raise ValueError(f"dims must be a non-empty list of sizes, got dims={dims!r}")
            bad = [m for m in dims if isinstance(m, bool) or not isinstance(m, int) or m < 1]
            if bad:
                raise ValueError(f"dims must be integers >= 1, got {bad[0]!r} in dims={list(dims)}")
        self.bank_size, self.k, self.every_n_epochs, self.temperature = bank_size, k, every_n_epochs, temperature
        self.dims = None if dims is None else list(dims)
        self.sizes: list[int] = []
        self._bank: list[torch.Tensor] | None = None  # per size: the normalised prefixes [B, m]
        self._bank_labels: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None  # correct per size, then the sample count

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from .data import MatryoshkaDataModule

        dm = trainer.datamodule
        if not isinstance(dm, MatryoshkaDataModule):
            raise ValueError(
                f"KNNMonitor reads the training split through a MatryoshkaDataModule's eval_dataloader; "
                f"got the data module {type(dm).__name__ if dm is not None else None}"
            )
        model = pl_module.model
        sizes = list(model.dims) if self.dims is None else self.dims
        bad = [m for m in sizes if m > model.width]
        if bad:
            raise ValueError(
                f"dims must be sizes in [1, {model.width}] (the model's embedding width), got {bad[0]} in dims={sizes}"
            )
        self.sizes = sizes

    def _runs_now(self, trainer: L.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        if trainer.state.fn == "fit":
            return (trainer.current_epoch + 1) % self.every_n_epochs == 0
        return True

    # -- the bank
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from .retrieval import normalize_prefix

        self._bank = self._bank_labels = self._counts = None
        if not self._runs_now(trainer):
            return
        z, labels = self._read_bank(trainer, pl_module)
        if labels.numel() < self.k:
            raise ValueError(f"the training split has {labels.numel()} samples, fewer than k={self.k} neighbours")
        self._bank = [normalize_prefix(z, m) for m in self.sizes]
        self._bank_labels = labels
        self._counts = torch.zeros(len(self.sizes) + 1, dtype=torch.long, device=z.device)

    def _read_bank(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[torch.Tensor, torch.Tensor]:
        """The pooled embeddings ``[B, d]`` (float32) and labels ``[B]`` of ``bank_size`` training samples
        spread evenly over the split (evaluation transform), the same on every rank: each rank reads
        its strided share of them and the shares are gathered back in order."""
        dm, model, device = trainer.datamodule, pl_module.model, pl_module.device
        total = dm.num_samples("train")
        size = min(self.bank_size, total)
        bank = [i * total // size for i in range(size)]  # evenly spaced: every class of a class-ordered split
        feats, labels = [], []
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), trainer.precision_plugin.val_step_context():
                for batch in dm.eval_dataloader("train", shard=True, subset=bank):
                    batch = dm.on_before_batch_transfer(batch, 0)
                    batch = dm.transfer_batch_to_device(batch, device, 0)
                    x, y = dm.on_after_batch_transfer(batch, 0)[:2]
                    feats.append(model.features(x).float())
                    labels.append(y.reshape(-1).long().clone())
        finally:
            model.train(was_training)
        z = torch.cat(feats) if feats else torch.zeros(0, model.width, device=device)
        y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
        z = gather_eval_rows(trainer, pl_module, z)
        y = gather_eval_rows(trainer, pl_module, y[:, None])[:, 0]
        return z, y

    # -- the votes
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        from .retrieval import exact_search, knn_vote, normalize_prefix

        if self._bank is None:
            return
        if not isinstance(outputs, dict) or "embedding" not in outputs or "target" not in outputs:
            raise RuntimeError(
                "KNNMonitor needs validation_step to return a dict with the batch's 'embedding' and 'target'"
            )
        z, target = outputs["embedding"], outputs["target"]
        for g, m in enumerate(self.sizes):
            scores, idx = exact_search(normalize_prefix(z, m), self._bank[g], self.k)
            pred = knn_vote(self._bank_labels[idx], scores, self.temperature)
            self._counts[g] += (pred == target).sum()
        self._counts[-1] += target.shape[0]

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._counts is None:
            return
        counts = self._counts
        if trainer.world_size > 1:  # every validation sample is in one rank's shard: a sum counts it once
            counts = trainer.strategy.reduce(counts.clone(), reduce_op="sum")
        total = counts[-1].clamp(min=1).double()
        for g, m in enumerate(self.sizes):
            pl_module.log(f"val/knn_top1@{m}", (counts[g].double() / total).float(), sync_dist=False)
        self._bank = self._bank_labels = self._counts = None


def write_adaptive_curve(curve: list[dict], result: Any, out_dir: Path, stage: str) -> tuple[Path, Path]:
    """``adaptive_{stage}_curve.csv`` (kind, expected_dims, accuracy %, thresholds) and a PNG of the
    cascade's accuracy against expected dims beside the fixed sizes, with the chosen cascade marked."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .files import atomic_path

    csv_path, png_path = out_dir / f"adaptive_{stage}_curve.csv", out_dir / f"adaptive_{stage}_curve.png"
    lines = ["kind,expected_dims,top1,thresholds"]
    for r in curve:
        lines.append(f"{r['kind']},{r['expected_dims']:.4f},{100 * r['accuracy']:.4f},{' '.join(f'{t:.6g}' for t in r['thresholds'])}")
    atomic_write_text(csv_path, "\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for kind, style in (("fixed", "s-"), ("cascade", "o-")):
        pts = [r for r in curve if r["kind"] == kind]
        ax.plot([r["expected_dims"] for r in pts], [100 * r["accuracy"] for r in pts], style,
                label="fixed size" if kind == "fixed" else "adaptive cascade", markersize=4)
    ax.plot([result.expected_dims], [100 * result.accuracy], "r*", markersize=12, label="chosen cascade")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("expected embedding dimensions")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"adaptive classification ({stage})")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return csv_path, png_path


class DepthWidthCascade(L.Callback):
    """Fit and evaluate the 2D cascade (:mod:`mrl_vision.cascade2d`: early exit over (block, size)
    points ordered by FLOPs) at the end of validation and test, for a task with ``eval_layers`` (or
    ``matryoshka_2d``), whose evaluation steps return ``layer_logits [K, G, N, C]``; for other tasks it
    does nothing.

    Validation: the evaluated set (gathered across DDP ranks) is split, seeded, into a calibration
    part (``calibration_fraction``), where the chain (default: the Pareto front of the fixed points
    there) and its thresholds are fitted with ``method``, and the rest, where the cascade, the fixed
    points and the curve's family are evaluated. Test: the chain and thresholds fitted on validation
    (in this run, or restored from the checkpoint: they are in this callback's ``state_dict``) are
    evaluated on the whole test set; without them (or when the grid of blocks and sizes differs), the
    test set is split as in validation. Costs are FLOPs per image (:class:`~mrl_vision.cascade2d.CostGrid`,
    counted once on the evaluated image size; doubled under ``eval_flip_tta``). Logs
    ``adaptive2d/top1``, ``adaptive2d/expected_gflops`` and ``adaptive2d/flops_fraction`` (of the last
    block at the largest size); rank 0 writes ``adaptive2d_{stage}_curve.csv`` and ``.png`` into the
    log directory. ``result`` keeps the last :class:`~mrl_vision.cascade2d.Cascade2dResult` (as a dict).

    Args:
        method: ``tolerance`` (the cheapest cascade within ``tolerance`` of the chain's last point,
            the full model in the default chain), ``budget`` (the most accurate within ``budget`` x the full model's FLOPs)
            or ``pairwise`` (the reference's per-pair search).
        tolerance: accuracy drop allowed, as a fraction (0.005 = half a point).
        budget: expected FLOPs as a fraction of the full model's, in (0, 1], for ``method="budget"``.
        calibration_fraction / seed: the calibration split.
        chain: fixed ``[block, size]`` points to cascade through, in order (default: the Pareto front).
        write_curve: write the trade-off CSV and PNG.
        confidence: with ``tolerance``, the tolerance must hold for a one-sided lower confidence bound
            (e.g. 0.95) on the accuracy difference, not only on the calibration set (as in
            :class:`AdaptiveClassificationCallback`); ``None``: on the calibration set.
        every_n_epochs: during ``fit``, fit at the validation of every n-th epoch and of the last one
            (on 250 calibration images and a 4 x 6 grid, the fit and the curve take seconds each);
            ``validate`` and ``test`` always run it.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: mrl_vision.callbacks.DepthWidthCascade
              init_args: {method: budget, budget: 0.5}
    """

    def __init__(
        self,
        method: str = "tolerance",
        tolerance: float = 0.005,
        budget: float | None = None,
        calibration_fraction: float = 0.5,
        seed: int = 0,
        chain: list[list[int]] | None = None,
        write_curve: bool = True,
        every_n_epochs: int = 1,
        confidence: float | None = None,
    ) -> None:
        from .adaptive import validate_confidence
        from .cascade2d import check_method

        check_method(method, tolerance, budget)
        self.confidence = validate_confidence(confidence)
        if confidence is not None and method != "tolerance":
            raise ValueError(f"confidence applies to method='tolerance' only, got method={method!r}")
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be an integer >= 1, got {every_n_epochs!r}")
        self.every_n_epochs = every_n_epochs
        if not 0.0 < calibration_fraction < 1.0:
            raise ValueError(f"calibration_fraction must be in (0, 1), got {calibration_fraction}")
        if chain is not None:
            bad = [p for p in chain if isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or len(p) != 2]
            if isinstance(chain, (str, bytes)) or bad or len(chain) < 2:
                raise ValueError(f"chain must list at least 2 [block, size] points, got {chain!r}")
            chain = [[int(b), int(m)] for b, m in chain]
        self.method, self.tolerance, self.budget, self.chain = method, tolerance, budget, chain
        self.calibration_fraction, self.seed, self.write_curve = calibration_fraction, seed, write_curve
        self.fitted: dict[str, Any] | None = None  # {"layers", "dims", "chain", "thresholds"} from validation
        self.result: dict | None = None
        self._rows: list[torch.Tensor] = []
        self._image_size: tuple[int, int] | None = None
        self._grid: Any = None

    # -- collecting
    def _start(self, *args: Any) -> None:
        self._rows = []

    on_validation_epoch_start = on_test_epoch_start = _start

    def _collect(self, trainer: L.Trainer, outputs: Any, batch: Any) -> None:
        from .cascade2d import grid_confidences

        if trainer.sanity_checking or not isinstance(outputs, dict) or "layer_logits" not in outputs:
            return
        if not self._runs_now(trainer):
            return
        conf, preds = grid_confidences(outputs["layer_logits"])  # [K, G, N]
        # One row per sample: K*G confidences, K*G predictions, the label (float64 holds them exactly).
        self._rows.append(torch.cat([conf.flatten(0, 1).T.double(), preds.flatten(0, 1).T.double(),
                                     outputs["target"].double()[:, None]], 1))
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        if isinstance(x, torch.Tensor) and x.ndim == 4:
            self._image_size = (int(x.shape[-2]), int(x.shape[-1]))

    def _runs_now(self, trainer: L.Trainer) -> bool:
        """Always outside ``fit``; in ``fit``, every ``every_n_epochs``-th epoch and the last."""
        if trainer.state.fn != "fit":
            return True
        epoch = trainer.current_epoch + 1
        return epoch % self.every_n_epochs == 0 or (trainer.max_epochs is not None and epoch >= trainer.max_epochs)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(trainer, outputs, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(trainer, outputs, batch)

    # -- fitting
    def _cost_grid(self, pl_module: L.LightningModule, layers: list[int]):
        from .cascade2d import CostGrid

        model = pl_module.model
        views = 2 if pl_module.hparams.get("eval_flip_tta", False) else 1
        size = self._image_size or model.input_size
        key = (tuple(layers), tuple(model.dims), size, views)
        if self._grid is None or self._grid[0] != key:
            self._grid = (key, CostGrid.from_model(model, layers, size, views=views))
        return self._grid[1]

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from . import adaptive as A
        from . import cascade2d as C

        layers = getattr(pl_module, "eval_layers", None)
        if trainer.sanity_checking or not self._rows or layers is None:
            self._rows = []
            return
        model = pl_module.model
        k, g = len(layers), len(model.dims)
        rows = gather_eval_rows(trainer, pl_module, torch.cat(self._rows)).cpu()
        self._rows = []
        n = rows.shape[0]
        conf = rows[:, : k * g].T.reshape(k, g, n).float()
        preds = rows[:, k * g : 2 * k * g].T.reshape(k, g, n).long()
        labels = rows[:, 2 * k * g].long()
        grid = self._cost_grid(pl_module, list(layers))
        cal_idx, rest_idx = A.calibration_split(n, self.calibration_fraction, self.seed)
        fitted = self.fitted
        if stage == "test" and fitted is not None and fitted["layers"] == list(layers) and fitted["dims"] == list(model.dims):
            # fitted on validation: the cascade, the fixed points and the curve all on the whole test set
            chain, thr = fitted["chain"], fitted["thresholds"]
            eval_idx = cal_idx = rest_idx = torch.arange(n)
        else:
            fit = C.fit_cascade(conf[:, :, cal_idx], preds[:, :, cal_idx], labels[cal_idx], grid, method=self.method,
                                tolerance=self.tolerance, budget=self.budget, chain=self.chain,
                                confidence=self.confidence)
            chain, thr = fit.chain, fit.thresholds
            self.fitted = {"layers": list(layers), "dims": list(model.dims), "chain": [list(p) for p in chain],
                           "thresholds": list(thr)}
            eval_idx = rest_idx
        res = C.evaluate_cascade(conf[:, :, eval_idx], preds[:, :, eval_idx], labels[eval_idx], grid, chain, thr)
        self.result = res.as_dict()
        pl_module.log_dict({
            "adaptive2d/top1": res.accuracy,
            "adaptive2d/expected_gflops": res.expected_gflops,
            "adaptive2d/flops_fraction": res.flops_fraction,
        })
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)  # log_dir is a collective under DDP: every rank asks
        if self.write_curve and trainer.is_global_zero:
            curve = C.tradeoff_curve(conf[:, :, cal_idx], preds[:, :, cal_idx], labels[cal_idx],
                                     conf[:, :, rest_idx], preds[:, :, rest_idx], labels[rest_idx], grid, chain)
            C.write_curve(curve, res, out_dir, stage)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module, "test")

    def state_dict(self) -> dict[str, Any]:
        return {"fitted": self.fitted, "result": self.result, "method": self.method}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.fitted, self.result = state_dict.get("fitted"), state_dict.get("result")
