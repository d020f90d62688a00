"""A trained run back in memory: its model and its data module, from what ``mrl-vision fit`` wrote.

One function, :func:`load_run`, used by ``mrl-vision truncate``, the analysis notebooks and the
benchmarks: the weights from a checkpoint (or a ``save_pretrained`` folder), the data module rebuilt
through the CLI's own parser from the run's saved ``config.yaml`` (or from CLI-style arguments).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .model import CONFIG_NAME, MatryoshkaModel, check_same_classes


def find_weights(path: str | os.PathLike) -> Path:
    """The weights ``path`` names: a checkpoint file, a saved model folder, or a run folder
    (``runs/NAME/VERSION``, whose ``checkpoints/last.ckpt`` is taken)."""
    p = Path(path)
    if p.is_file() or (p / CONFIG_NAME).is_file():
        return p
    if (p / "checkpoints" / "last.ckpt").is_file():
        return p / "checkpoints" / "last.ckpt"
    if p.is_dir():
        raise FileNotFoundError(f"{str(p)!r} holds no checkpoints/last.ckpt and no {CONFIG_NAME}: give a run folder "
                                "(runs/NAME/VERSION), a checkpoint or a saved model folder")
    raise FileNotFoundError(f"{str(p)!r} does not exist")


def run_config(path: str | os.PathLike) -> Path | None:
    """The ``config.yaml`` of the run that ``path`` (a run folder or a checkpoint in its
    ``checkpoints/`` folder) belongs to, or None."""
    p = Path(path)
    for folder in (p, p.parent.parent) if p.is_file() else (p,):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    return None


def build_datamodule(config: str | os.PathLike | None = None, args: Sequence[str] = ()):
    """The data module of a saved run ``config.yaml``, or of CLI-style ``args`` (``--config ...``,
    ``--data.init_args.root ...``; without ``--config``, the quickstart's), through the CLI parser."""
    import yaml

    from .cli import cli, quickstart_config

    args = list(args)
    if args or config is None:
        if not any(a in ("--config", "-c") or a.startswith("--config=") for a in args):
            args = ["--config", quickstart_config(), *args]
        return cli([*args, "--trainer.logger", "false", "--trainer.accelerator", "cpu"], run=False).datamodule
    saved = yaml.safe_load(Path(config).read_text()) or {}
    if "data" not in saved:
        raise ValueError(f"{str(config)!r} has no data section: give a config.yaml written by mrl-vision")
    model = {**(saved.get("model") or {}), "pretrained": False, "pretrained_file": None}
    trainer = {"logger": False, "accelerator": "cpu", "devices": 1}
    return cli({"data": saved["data"], "model": model, "trainer": trainer}, run=False).datamodule


def load_run(path: str | os.PathLike, data_args: Sequence[str] = (), map_location: str = "cpu"):
    """``(model, datamodule)`` of a run: ``path`` is a run folder, a checkpoint or a saved model
    folder; the data module comes from ``data_args`` when given, else from the run's ``config.yaml``,
    else the quickstart. The model is a :class:`MatryoshkaModel` in eval mode; ``ValueError`` when its
    classes are not the data module's.

    Example::

        model, dm = load_run("runs/quickstart/version_0")
        loader = dm.eval_dataloader("test")
    """
    model = MatryoshkaModel.load(find_weights(path), map_location)
    datamodule = build_datamodule(None if data_args else run_config(path), data_args)
    check_same_classes(model.num_classes, model.class_names, datamodule.class_names)
    return model, datamodule
