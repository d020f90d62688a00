"""``mrl-vision``: a thin LightningCLI over the library.

    mrl-vision fit                                  # the quickstart (real MNIST digits, CPU-friendly)
    mrl-vision fit --config configs/quickstart.yaml --trainer.max_epochs 2
    mrl-vision test --config configs/quickstart.yaml --ckpt_path runs/quickstart/version_0/checkpoints/last.ckpt
    mrl-vision prepare data/imagenet/train data/imagenet/train.beton --max-resolution 512
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from importlib import resources
from typing import Sequence

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from .callbacks import PredictionWriter
from .model import MatryoshkaClassifier

TRAINER_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def quickstart_config() -> str:
    """Path of the embedded quickstart config (used when no ``--config`` is given)."""
    return str(resources.files("mrl_vision") / "configs" / "quickstart.yaml")


class MRLCLI(LightningCLI):
    """LightningCLI with ``num_classes`` linked from the data module to the model."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

    # Evaluation-time options: taken from this command, not from the checkpoint's hyperparameters
    # (LightningCLI re-applies those over the command line when --ckpt_path is given).
    EVAL_OPTIONS = ("adaptive_predict", "eval_flip_tta")

    def _parse_ckpt_path(self) -> None:
        sub = self.config.get("subcommand")
        model = self.config[sub].get("model") if sub else None
        keep = {k: model.get(k) for k in self.EVAL_OPTIONS if model is not None and model.get(k) is not None}
        super()._parse_ckpt_path()
        for key, value in keep.items():
            self.config[sub].model[key] = value

    def before_fit(self) -> None:
        if self.config_init["fit"].get("ckpt_path") == "last":
            self.config_init["fit"]["ckpt_path"] = resolve_last_checkpoint(self.trainer)

    def before_predict(self) -> None:
        if not any(isinstance(cb, PredictionWriter) for cb in self.trainer.callbacks):
            self.trainer.callbacks.append(PredictionWriter())


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


def with_default_config(args: Sequence[str]) -> list[str]:
    """Insert the quickstart config after the subcommand when the user gave no ``--config``."""
    args = list(args)
    if not args or args[0] not in TRAINER_SUBCOMMANDS:
        return args
    if any(a == "--config" or a.startswith("--config=") or a == "-c" for a in args[1:]):
        return args
    return [args[0], "--config", quickstart_config(), *args[1:]]


def prepare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mrl-vision prepare",
        description="Write an image folder tree (SOURCE/<class>/<image>) or the built-in 'quickstart' "
        "digits to an FFCV .beton file, with a sidecar OUTPUT.beton.json.",
    )
    p.add_argument("source", help="image folder tree, or 'quickstart'")
    p.add_argument("output", help="the .beton file to write")
    p.add_argument("--split", default="train", choices=["train", "val", "test"], help="quickstart split (default train)")
    p.add_argument("--max-resolution", type=int, default=None, help="cap on the longer side in pixels (default: none)")
    p.add_argument("--write-mode", default="raw", choices=["raw", "jpg", "proportion", "smart"],
                   help="raw pixels, JPEG, or JPEG with --compress-probability (default raw)")
    p.add_argument("--compress-probability", type=float, default=0.5, help="for --write-mode proportion")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--num-workers", type=int, default=-1, help="writer processes (default: all cores)")
    p.add_argument("--limit", type=int, default=None, help="at most this many images per class")
    p.add_argument("--seed", type=int, default=0, help="quickstart split seed")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    return p


def prepare(args: Sequence[str]) -> dict:
    """``mrl-vision prepare``: parse ``args`` and write the .beton file; returns its sidecar."""
    from .data.beton import write_beton

    a = prepare_parser().parse_args(list(args))
    try:
        info = write_beton(
            a.source, a.output, split=a.split, max_resolution=a.max_resolution, write_mode=a.write_mode,
            compress_probability=a.compress_probability, jpeg_quality=a.jpeg_quality,
            num_workers=a.num_workers, limit=a.limit, seed=a.seed, overwrite=a.overwrite,
        )
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        raise SystemExit(f"mrl-vision prepare: error: {e}") from None
    summary = {k: info[k] for k in ("num_samples", "num_classes", "file_size", "seconds")}
    print(f"wrote {a.output}: {json.dumps(summary)}")
    return info


def report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mrl-vision report",
        description="Read run folders (CSV logger versions, truncate outputs) and write top-1 vs dimensions "
        "(PNG, log-2 axis), a Markdown and a CSV table, and the adaptive trade-off when a run has one.",
    )
    p.add_argument("runs", nargs="+", help="run folders, e.g. runs/quickstart/version_0")
    p.add_argument("--out", default="runs/report", help="output folder (default runs/report)")
    p.add_argument("--title", default="", help="figure and table title")
    return p


def report(args: Sequence[str]) -> dict:
    """``mrl-vision report``: parse ``args``, write the report, print its table; returns the written paths."""
    from .report import write_report

    a = report_parser().parse_args(list(args))
    try:
        written = write_report(a.runs, a.out, title=a.title)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"mrl-vision report: error: {e}") from None
    print(written["md"].read_text(), end="")
    if "adaptive_md" in written:
        print("\nadaptive classification\n\n" + written["adaptive_md"].read_text(), end="")
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return written


def truncate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mrl-vision truncate",
        description="Post-hoc truncation of a trained (standard) model: at each size m, a linear probe on the "
        "first m embedding dimensions and one on an SVD projection to m dimensions, fitted on the training "
        "split and scored on the evaluation split. Other arguments (--config, --data.*) choose the data "
        "as for fit (default: the quickstart).",
    )
    p.add_argument("--ckpt_path", required=True, help="the checkpoint of the model to truncate")
    p.add_argument("--out", required=True, help="output folder: truncation.csv and truncation.json")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="sizes (default 8, 16, ... the width)")
    p.add_argument("--fit-split", default="train", choices=["train", "val"], help="split the probes are fitted on")
    p.add_argument("--eval-split", default="test", choices=["val", "test"], help="split they are scored on")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="L2 penalty of the probes")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", help="where embeddings are computed")
    return p


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def truncate(args: Sequence[str]) -> list[dict]:
    """``mrl-vision truncate``: probes per size on a checkpoint's embeddings, ``truncation.{csv,json}``."""
    from .report import markdown_table
    from .truncation import truncate_model, write_truncation

    a, rest = truncate_parser().parse_known_args(list(args))
    if not os.path.isfile(a.ckpt_path):
        raise SystemExit(f"mrl-vision truncate: error: checkpoint {a.ckpt_path!r} does not exist")
    if not any(x in ("--config", "-c") or x.startswith("--config=") for x in rest):
        rest = ["--config", quickstart_config(), *rest]
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it sees both args and sys.argv
    try:
        dm = cli([*rest, "--trainer.logger", "false"], run=False).datamodule
    finally:
        sys.argv = argv
    model = MatryoshkaClassifier.load_from_checkpoint(a.ckpt_path, map_location="cpu")
    try:
        rows, meta = truncate_model(model, dm, a.sizes, a.fit_split, a.eval_split, a.weight_decay, a.device)
    except ValueError as e:
        raise SystemExit(f"mrl-vision truncate: error: {e}") from None
    meta["ckpt_path"] = a.ckpt_path
    csv_path = write_truncation(a.out, rows, meta)
    print(f"post-hoc truncation of {a.ckpt_path} ({model.head_kind} head at {model.nesting}); probes fitted on "
          f"{meta['num_fit']} {a.fit_split} images, top-1 % on {meta['num_eval']} {a.eval_split} images:")
    print(markdown_table(rows), end="")
    print(f"its own classifier at {model.nesting[-1]} dims: {meta['own_classifier_top1']:.2f} %; wrote {csv_path}")
    return rows


COMMANDS = {"prepare": prepare, "report": report, "truncate": truncate}


def main(args: Sequence[str] | None = None) -> None:
    """Console entry point of ``mrl-vision``."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in COMMANDS:
        COMMANDS[argv[0]](argv[1:])
        return
    cli(args)


def cli(args: Sequence[str] | None = None, run: bool = True) -> MRLCLI:
    """Build (and by default run) the CLI; ``args`` defaults to ``sys.argv[1:]``.

    Example (from Python or a test)::

        cli(["fit", "--trainer.fast_dev_run", "1"])
    """
    if args is None:  # from the console: LightningCLI reads sys.argv itself
        sys.argv[1:] = with_default_config(sys.argv[1:])
    else:
        args = with_default_config(args)
    return MRLCLI(
        MatryoshkaClassifier,
        L.LightningDataModule,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":  # pragma: no cover
    main()
