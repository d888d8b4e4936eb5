"""Training curves as a picture: OUTPUT/curves.png, drawn from OUTPUT/metrics.jsonl.

TensorBoard shows the same numbers, but a PNG in the run folder can be looked at without a
server, also for runs made with --report-to none (the demo's). Each panel plots some metric
keys against the step; a key that a run never logged is left out, and so is an empty panel.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

CURVES = "curves.png"  # the picture's name in a run folder


class Panel(NamedTuple):
    """A subplot: `keys` of metrics.jsonl against the step; noisy per-step series are drawn
    faint with a trailing mean over them when `smooth` (not for exact series like the lr)."""

    title: str
    keys: tuple[str, ...]
    log_y: bool = False  # non-positive values are left out of a log axis
    smooth: bool = True


# The panels of the training jobs.
TOKENIZER = [
    Panel("losses", ("rec_loss", "quantizer_loss", "perceptual_loss"), log_y=True),
    Panel("GAN losses", ("g_loss", "d_loss")),  # a hinge generator loss is often negative
    Panel("validation PSNR (dB)", ("val_psnr",)),
    Panel("codebook perplexity", ("perplexity", "val_perplexity")),
    Panel("learning rate", ("lr",), smooth=False),
]
PRIOR = [
    Panel("loss (nats per token)", ("loss", "val_loss"), log_y=True),
    Panel("learning rate", ("lr",), smooth=False),
]
SCORER = [
    Panel("contrastive loss (nats)", ("loss", "val_loss"), log_y=True),
    Panel("validation accuracy", ("val_accuracy",), smooth=False),
    Panel("logit scale", ("logit_scale",), smooth=False),
    Panel("learning rate", ("lr",), smooth=False),
]


def read_series(path: Path) -> dict[str, tuple[list[int], list[float]]]:
    """{key: (steps, values)} of the finite numbers in a metrics.jsonl, of the latest run only.

    Lines that are not a JSON object with a step (the tail of a killed write) are ignored, as
    resume drops them anyway. A step lower than the line before it means a new run started from
    scratch in the same folder (resume truncates, a fresh start does not): the series restart.
    """
    series: dict[str, tuple[list[int], list[float]]] = {}
    last_step = -math.inf
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
        if step < last_step:
            series.clear()
        last_step = step
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                steps, values = series.setdefault(key, ([], []))
                steps.append(step)
                values.append(float(value))
    return series


def _smooth(values: list[float], window: int) -> np.ndarray:
    """Trailing mean over `window` points; the noisy per-step losses read better with it."""
    total = np.cumsum(values)  # (N,)
    total[window:] = total[window:] - total[:-window]  # the right side is a new array
    return total / np.minimum(np.arange(1, len(values) + 1), window)


def plot_curves(metrics_path: Path, out_path: Path, panels: list[Panel]) -> Path | None:
    """Write the panels that have data to `out_path` (atomically); None if none has."""
    # The Figure class, not pyplot: no global backend or figure registry to set or leak into
    # (the pattern matplotlib documents for web servers). Imported here, where it is used: it
    # loads the font manager, which costs about half a second.
    from matplotlib.figure import Figure

    series = read_series(metrics_path) if metrics_path.is_file() else {}
    shown = [panel for panel in panels if any(key in series for key in panel.keys)]
    if not shown:
        return None
    figure = Figure(figsize=(4.2 * len(shown), 3.2))
    axes = figure.subplots(1, len(shown), squeeze=False)
    for axis, panel in zip(axes[0], shown):
        for key in (key for key in panel.keys if key in series):
            steps, values = series[key]
            line = axis.plot(steps, values, alpha=0.3, linewidth=0.8)[0]
            window = max(1, len(values) // 25) if panel.smooth else 1
            if window > 1:
                axis.plot(steps, _smooth(values, window), color=line.get_color(), label=key)
            else:
                line.set(
                    alpha=1.0, linewidth=1.5, label=key, marker="o" if len(values) < 20 else ""
                )
        if panel.log_y:
            axis.set_yscale("log", nonpositive="mask")
        axis.set(title=panel.title, xlabel="step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    tmp = out_path.with_name(out_path.name + ".tmp.png")
    figure.savefig(tmp, dpi=100)
    os.replace(tmp, out_path)
    return out_path
