"""Resuming training: which checkpoint ``fit --ckpt_path last`` continues from."""

from __future__ import annotations

import glob
import os

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


RESUME_ENV = "MRL_VISION_RESUME_FROM"


def resolve_last_checkpoint(trainer: L.Trainer) -> str | None:
    """What ``fit --ckpt_path last`` resumes from: the newest ``last*.ckpt`` of this experiment.

    Lightning looks for ``last.ckpt`` in the checkpoint folder of *this* run only, and with a logger
    every run gets a new version folder (``runs/NAME/version_K/checkpoints``), so ``last`` would never
    find the previous run. Here the candidates are the ``last*.ckpt`` files in the ``dirpath`` of every
    ``ModelCheckpoint`` that has one, and in ``SAVE_DIR/NAME/*/checkpoints/`` of the first logger; the
    newest by modification time wins. The resumed run logs to a new version folder (nothing is
    overwritten) and continues the epoch and step count of the checkpoint.

    Under DDP the first process resolves the path and hands it to the processes it launches through
    the environment (``MRL_VISION_RESUME_FROM``), so every rank loads the same file. Returns ``None``
    (start from scratch, with a warning, as Lightning does) when there is none.
    """
    inherited = os.environ.get(RESUME_ENV)
    if inherited and int(os.environ.get("LOCAL_RANK", "0")) > 0:
        return inherited
    patterns = []
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath is not None:
            patterns.append(os.path.join(cb.dirpath, "last*.ckpt"))
    if trainer.loggers and trainer.loggers[0].save_dir is not None:
        logger = trainer.loggers[0]
        patterns.append(os.path.join(logger.save_dir, str(logger.name or ""), "*", "checkpoints", "last*.ckpt"))
    found = {p for pattern in patterns for p in glob.glob(pattern) if os.path.isfile(p)}
    if not found:
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(f"--ckpt_path last: no last*.ckpt under {' or '.join(patterns) or 'any checkpoint folder'}; "
                       "training starts from scratch")
        return None
    path = max(found, key=os.path.getmtime)
    os.environ[RESUME_ENV] = path
    print(f"mrl-vision: resuming from {path}", flush=True)
    return path
