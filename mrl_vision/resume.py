"""Resuming training: which checkpoint ``fit --ckpt_path last`` continues from, checking a checkpoint
before it is used, and writing checkpoints so that a crash never leaves half a file."""

from __future__ import annotations

import glob
import os
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint

from .files import atomic_path
from .heads import default_dims
from .model import upgrade_config

RESUME_ENV = "MRL_VISION_RESUME_FROM"

# The hyperparameters that decide the network's shape: a checkpoint that differs in one of them is
# another model (its weights would not load, or would mean something else).
ARCHITECTURE_KEYS = ("backbone", "backbone_kwargs", "blurpool", "layers", "head", "dims", "num_classes")
_DEFAULTS = {"backbone": "resnet18", "backbone_kwargs": {}, "blurpool": False, "layers": None, "head": "mrl",
             "dims": None, "num_classes": None}  # MatryoshkaModel's defaults


def check_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load the Lightning checkpoint at ``path`` (on the CPU, ``weights_only=True``) and return it.

    Raises ``FileNotFoundError`` when there is no such file and ``ValueError`` naming the path and the
    reason when it cannot be read (truncated by a crash during the save, corrupt, not a checkpoint,
    or holding objects that ``weights_only=True`` refuses) or is not a Lightning checkpoint (no
    ``state_dict``)::

        ValueError: checkpoint 'runs/q/version_0/checkpoints/last.ckpt' is unreadable (truncated or corrupt,
        1000 bytes): RuntimeError: PytorchStreamReader failed reading zip archive: failed finding central directory

    (one line). Loading reads the whole file: a big checkpoint takes as long as Lightning's own load.
    """
    ckpt, reason = _load(path)
    if ckpt is None:
        error = FileNotFoundError if reason == "does not exist" else ValueError
        raise error(f"checkpoint {str(path)!r} {reason}")
    return ckpt


def _load(path: str | os.PathLike) -> tuple[dict[str, Any] | None, str]:
    """(the checkpoint, "") or (None, why it cannot be used: "does not exist", "is unreadable ...")."""
    if not os.path.isfile(path):
        return None, "does not exist"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every way of failing is reported the same way
        return None, _load_failure(e, os.path.getsize(path))
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        what = f"a {type(ckpt).__name__}" if not isinstance(ckpt, dict) else "a dict without state_dict"
        return None, f"is not a Lightning checkpoint (it holds {what})"
    return ckpt, ""


def _load_failure(e: BaseException, size: int) -> str:
    """Why ``torch.load`` failed: the kind of failure, the file's size and the gist of the error."""
    import pickle

    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if isinstance(e, pickle.UnpicklingError) and "weights only" in str(e).lower():
        # The first line says only "Weights only load failed..."; the culprit is further down.
        culprit = next((line for line in lines if "Unsupported global" in line), "")
        culprit = culprit.split(" was not an allowed global")[0].replace("WeightsUnpickler error: ", "")
        return ("cannot be loaded with weights_only=True (it holds objects other than tensors and plain values"
                + (f": {culprit})" if culprit else ")"))
    gist = lines[0].split(". This is an internal miniz error")[0] if lines else ""
    if len(gist) > 160:
        gist = gist[:160] + "..."
    return f"is unreadable (truncated or corrupt, {size} bytes): {type(e).__name__}{': ' + gist if gist else ''}"


def _checkpoint_patterns(trainer: L.Trainer) -> list[str]:
    patterns = []
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath is not None:
            patterns.append(os.path.join(cb.dirpath, "*.ckpt"))
    if trainer.loggers and trainer.loggers[0].save_dir is not None:
        logger = trainer.loggers[0]
        patterns.append(os.path.join(logger.save_dir, str(logger.name or ""), "*", "checkpoints", "*.ckpt"))
    return patterns


def _candidates(patterns: list[str]) -> list[str]:
    """The checkpoint files matching ``patterns``, newest first (``last*.ckpt`` first among equals)."""
    found: dict[str, str] = {}
    for pattern in patterns:
        for p in glob.glob(pattern):
            if os.path.isfile(p):
                found.setdefault(os.path.realpath(p), p)
    return sorted(found.values(), key=lambda p: (os.path.getmtime(p), os.path.basename(p).startswith("last")),
                  reverse=True)


def _architecture(hparams: dict[str, Any]) -> dict[str, Any]:
    config = upgrade_config(dict(hparams))
    arch = {k: config.get(k, _DEFAULTS[k]) for k in ARCHITECTURE_KEYS}
    arch["backbone_kwargs"] = dict(arch["backbone_kwargs"] or {})
    arch["blurpool"] = bool(arch["blurpool"])
    if arch["dims"] is not None:
        arch["dims"] = [int(m) for m in arch["dims"]]
    return arch


def _default_dims(head: str, width: int) -> list[int]:
    return [width] if head in ("ff", "ff_projection") else default_dims(width)


def architecture_differences(checkpoint_hparams: dict[str, Any], model: L.LightningModule) -> list[str]:
    """The architecture hyperparameters (:data:`ARCHITECTURE_KEYS`) in which a checkpoint's
    ``hyper_parameters`` differ from ``model``'s, as ``"backbone: checkpoint resnet18, this run
    mobilenetv3_small_050"``; empty when the checkpoint is of the same model. ``dims: null`` (the
    default) equals the default sizes of the same backbone and head written out."""
    ckpt, this = _architecture(checkpoint_hparams), _architecture(dict(model.hparams))
    width = getattr(getattr(model, "model", None), "width", None)
    same_backbone = all(ckpt[k] == this[k] for k in ("backbone", "backbone_kwargs", "blurpool", "head"))
    if (ckpt["dims"] is None) != (this["dims"] is None) and same_backbone and isinstance(width, int):
        ckpt["dims"] = ckpt["dims"] if ckpt["dims"] is not None else _default_dims(ckpt["head"], width)
        this["dims"] = this["dims"] if this["dims"] is not None else _default_dims(this["head"], width)
    return [f"{k}: checkpoint {_show(ckpt[k])}, this run {_show(this[k])}" for k in ARCHITECTURE_KEYS if ckpt[k] != this[k]]


def _show(value: Any) -> str:
    return "default" if value is None else str(value)


def _why_not(path: str, model: L.LightningModule | None) -> tuple[str, str] | None:
    """``None`` when ``fit`` can resume from ``path``, else (kind, reason): kind ``unreadable``,
    ``incomplete`` or ``other-model``."""
    ckpt, reason = _load(path)
    if ckpt is None:
        return "unreadable", reason
    if "optimizer_states" not in ckpt or "loops" not in ckpt:
        return "incomplete", "holds the weights only (save_weights_only): no optimizer or loop state to resume"
    if model is None:
        return None
    hparams = ckpt.get("hyper_parameters")
    if not hparams:
        return "other-model", "has no model hyperparameters (not written by mrl-vision fit)"
    diff = architecture_differences(hparams, model)
    return ("other-model", "is of another model (" + "; ".join(diff) + ")") if diff else None


def resolve_last_checkpoint(trainer: L.Trainer, model: L.LightningModule | None = None) -> str | None:
    """What ``fit --ckpt_path last`` resumes from: the newest readable checkpoint of this model.

    Lightning looks for ``last.ckpt`` in the checkpoint folder of *this* run only, and with a logger
    every run gets a new version folder (``runs/NAME/version_K/checkpoints``), so ``last`` would never
    find the previous run. Here the candidates are the ``*.ckpt`` files in the ``dirpath`` of every
    ``ModelCheckpoint`` that has one, and in ``SAVE_DIR/NAME/*/checkpoints/`` of the first logger,
    newest (by modification time) first. Skipped, each with a printed line that names the file and
    why: a file that does not load (``torch.load(..., weights_only=True)`` fails: truncated by a crash
    during the save, or corrupt), one written with ``save_weights_only``, and one of another model:
    its architecture hyperparameters (:data:`ARCHITECTURE_KEYS`) differ from ``model``'s (default
    ``trainer.lightning_module``; the CLI passes its model, which the trainer does not hold before
    ``fit``). The resumed run logs to a new version folder (nothing is overwritten) and continues the
    epoch and step count of the checkpoint.

    Returns ``None`` (start from scratch, with a warning, as Lightning does) when there is no
    checkpoint at all; raises ``SystemExit`` with a one-line message naming the newest checkpoint and
    why it cannot be used (``backbone: checkpoint resnet18, this run mobilenetv3_small_050``) when
    there are checkpoints but none fits: training silently from scratch is not what ``last`` asked for.

    Under DDP the first process resolves the path and hands it to the processes it launches through
    the environment (``MRL_VISION_RESUME_FROM``), so every rank loads the same file.
    """
    inherited = os.environ.get(RESUME_ENV)
    if inherited and int(os.environ.get("LOCAL_RANK", "0")) > 0:
        return inherited
    model = model if model is not None else trainer.lightning_module
    patterns = _checkpoint_patterns(trainer)
    candidates = _candidates(patterns)
    if not candidates:
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(f"--ckpt_path last: no checkpoint under {' or '.join(patterns) or 'any checkpoint folder'}; "
                       "training starts from scratch")
        return None
    skipped: list[tuple[str, str, str]] = []
    for path in candidates:
        why = _why_not(path, model)
        if why is None:
            break
        skipped.append((path, *why))
        print(f"mrl-vision: --ckpt_path last: skipping {path}: it {why[1]}", flush=True)
    else:
        newest, kind, reason = skipped[0]
        message = f"--ckpt_path last: none of the {len(candidates)} checkpoints fits this run; the newest, {newest}, {reason}"
        if kind != "other-model":
            other = next((s for s in skipped if s[1] == "other-model"), None)
            if other is not None:
                message += f"; the newest readable one, {other[0]}, {other[2]}"
        raise SystemExit(f"mrl-vision fit: error: {message}. Give --ckpt_path FILE, or log this run to its own "
                         "folder (--trainer.logger.init_args.name NAME) to start it from scratch")
    os.environ[RESUME_ENV] = path
    note = f" (the newest usable checkpoint; {len(skipped)} newer skipped)" if skipped else ""
    print(f"mrl-vision: resuming from {path}{note}", flush=True)
    return path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` that writes each local checkpoint to a temporary file beside
    it (``.NAME.<random>.tmp``) and renames it into place: a crash or ``SIGKILL`` during a save leaves
    the previous file (or none), never a truncated one. Remote paths (``s3://``, ...) are written as
    Lightning writes them. A kill during a save can leave the temporary file behind (not a ``*.ckpt``,
    so nothing reads it).

    Lightning 2.6 writes through an fsspec transaction: the bytes go to a temporary file in the
    system's temporary folder, which is then moved onto the checkpoint's path; that move is a rename
    (atomic) only when both are on one filesystem, and otherwise a copy, which a kill can cut short
    (and the whole checkpoint passes through ``/tmp``, often a RAM disk). Here the temporary file is
    always beside the checkpoint.

    Enable it as a Trainer plugin::

        trainer:
          plugins:
            - class_path: mrl_vision.resume.AtomicCheckpointIO

    (``--trainer.plugins mrl_vision.resume.AtomicCheckpointIO``), or with
    :func:`use_atomic_checkpoint_io` on a built Trainer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        from fsspec.implementations.local import LocalFileSystem

        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_path(str(path).removeprefix("file://")) as tmp:
            torch.save(checkpoint, tmp)


def use_atomic_checkpoint_io(trainer: L.Trainer) -> bool:
    """Give ``trainer``'s strategy an :class:`AtomicCheckpointIO` where it writes with Lightning's plain
    ``TorchCheckpointIO`` (another checkpoint IO, e.g. a sharded strategy's, is left alone); returns
    whether it did."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
        return True
    return False
