"""The run folder of a training job: arguments, logs, metrics and TensorBoard.

    OUTPUT/args.json          the parsed arguments (rewritten on each start)
    OUTPUT/train.log          a plain-text log (main process), appended across resumes
    OUTPUT/metrics.jsonl      one JSON object per logged step: {"step": ..., "<name>": value}
    OUTPUT/tensorboard/       TensorBoard events through accelerate's trackers (--report-to)
    OUTPUT/curves.png         the metrics as plots, redrawn at each validation (common/curves.py)

On resume, metric lines after the resumed step are dropped first: they came from the killed
run's steps that are now repeated, and keeping them would duplicate those steps.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from common.curves import CURVES, Panel, plot_curves

METRICS = "metrics.jsonl"


def _no_accelerator_device() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return not (torch.cuda.is_available() or (mps is not None and mps.is_available()))


def make_accelerator(args: argparse.Namespace, **kwargs: Any) -> Accelerator:
    """Apply --num-threads, then build an Accelerator (TensorBoard logging to OUTPUT/tensorboard
    when `args.report_to` is "tensorboard").

    Without a GPU it is built with cpu=True: otherwise accelerate silently falls back to one
    process per rank (DistributedType.NO) under `accelerate launch --multi_gpu` on CPU, and
    every rank would train alone on the whole data."""
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    project = ProjectConfiguration(
        project_dir=str(args.output_dir), logging_dir=str(Path(args.output_dir) / "tensorboard")
    )
    log_with = None if args.report_to == "none" else args.report_to
    return Accelerator(
        mixed_precision=args.mixed_precision,
        cpu=args.cpu or _no_accelerator_device(),
        log_with=log_with,
        project_config=project,
        **kwargs,
    )


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _scalar_config(args: argparse.Namespace) -> dict[str, Any]:
    """TensorBoard's hparams accept only int/float/str/bool."""
    return {
        key: value if isinstance(value, int | float | str | bool) else str(value)
        for key, value in vars(args).items()
    }


class RunFolder:
    """Creates OUTPUT, writes args.json, and routes log lines and metrics (main process only)."""

    def __init__(self, accelerator: Accelerator, args: argparse.Namespace, job: str) -> None:
        self.accelerator = accelerator
        self.started = time.monotonic()  # the start of the run, for --time-budget-minutes
        self.path = Path(args.output_dir)
        self.is_main = accelerator.is_main_process
        self.logger = logging.getLogger(f"codegrid.{job}.{id(self)}")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        if self.is_main:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                self._write_args(args)
            except OSError as error:
                raise OSError(
                    error.errno,
                    f"--output-dir {self.path} is not writable ({error.strerror}); choose a "
                    "folder on a writable disk with free space",
                ) from error
            formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
            for handler in (
                logging.FileHandler(self.path / "train.log"),
                logging.StreamHandler(sys.stderr),
            ):
                handler.setFormatter(formatter)
                self.logger.addHandler(handler)
        else:
            self.logger.addHandler(logging.NullHandler())
        if accelerator.log_with:
            accelerator.init_trackers(job, config=_scalar_config(args))

    def _write_args(self, args: argparse.Namespace) -> None:
        values = {key: _plain(value) for key, value in vars(args).items()}
        tmp = self.path / "args.json.tmp"
        tmp.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.path / "args.json")

    def info(self, message: str) -> None:
        self.logger.info(message)

    def warning(self, message: str) -> None:
        self.logger.warning(message)

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        """Append {"step": step, **values} to metrics.jsonl and send it to the trackers."""
        clean = {key: float(value) for key, value in values.items()}
        if self.is_main:
            record = {
                "step": step,
                **{k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()},
            }
            with open(self.path / METRICS, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        if self.accelerator.log_with:
            self.accelerator.log(clean, step=step)

    def write_curves(self, panels: list[Panel]) -> None:
        """Redraw OUTPUT/curves.png from metrics.jsonl (main process). A picture is not worth
        a training run: a failure to draw it is logged as a warning, and training goes on."""
        if not self.is_main:
            return
        try:
            plot_curves(self.path / METRICS, self.path / CURVES, panels)
        except ImportError as error:  # a dependency missing from a hand-made environment
            self.warning(f"{CURVES} not written: {error}; pip install 'matplotlib>=3.7'")
        except (OSError, ValueError) as error:
            self.warning(f"{CURVES} not written: {type(error).__name__}: {error}")

    def truncate_metrics(self, after_step: int) -> None:
        """Drop metric lines with step > after_step (steps the resumed run repeats)."""
        path = self.path / METRICS
        if not self.is_main or not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= after_step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut off by the kill
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def close(self) -> None:
        """End the trackers and release the log file."""
        if self.accelerator.log_with:
            self.accelerator.end_training()
        for handler in list(self.logger.handlers):
            handler.close()
            self.logger.removeHandler(handler)
