"""Shared pieces of the benchmarks: the timing protocol, result rows, peak memory, matmul peak.

Protocol (issue 7): both sides of a ratio run in the same process under the same
`torch.set_num_threads`, after a warm-up, and each figure is the median of at least 5 runs.
The two sides are interleaved in ABBA order (ours, reference, reference, ours, ...) so that a
slow drift of the shared machine's load hits both sides alike.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class Settings:
    """What every benchmark reads: threads, runs, warm-ups, tiny shapes (`smoke`), device."""

    threads: int = 2
    runs: int = 5
    warmup: int = 1
    smoke: bool = False
    seed: int = 0
    nocache_grid: int = 8
    extract_images: int = 8
    device: str = "cpu"
    levers: bool = False
    compile_levers: bool = False


@dataclass
class Row:
    """One line of the results table.

    `ratio` is always "how much better ours is" in the direction of `target`: for times it is
    theirs/ours when `higher_is_better`, or ours/theirs when the target is a ceiling.
    """

    bench: str
    metric: str
    ours: float | None = None
    reference: float | None = None
    unit: str = ""
    ratio: float | None = None
    target: float | None = None
    higher_is_better: bool = True
    note: str = ""
    extra: dict = field(default_factory=dict)
    passed: bool | None = None  # set on equivalence checks only; False fails the run

    @property
    def met(self) -> bool | None:
        """Check rows: passed. Ratio rows: whether the target is met. Else None."""
        if self.passed is not None:
            return self.passed
        if self.ratio is None or self.target is None:
            return None
        return self.ratio >= self.target if self.higher_is_better else self.ratio <= self.target

    def to_dict(self) -> dict:
        """JSON-able fields plus `met`."""
        return {**asdict(self), "met": self.met}


class EquivalenceError(AssertionError):
    """An optimised path disagrees with its reference beyond the stated tolerance."""


def set_threads(threads: int) -> None:
    """The same intra-op thread count for both sides of every ratio."""
    if threads < 1:
        raise ValueError(f"--threads={threads} is invalid; use an integer >= 1")
    torch.set_num_threads(threads)


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device) -> float:
    """Seconds of one call of `fn`, the device synchronised before and after."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def time_pair(
    ours: Callable[[], object],
    reference: Callable[[], object],
    settings: Settings,
    *,
    inference: bool = True,
    runs: int | None = None,
) -> tuple[float, float, dict]:
    """Median seconds of `ours` and `reference`, interleaved ABBA after `settings.warmup`
    warm-up calls of each; returns (ours_s, reference_s, raw timings)."""
    runs = settings.runs if runs is None else runs
    context = torch.inference_mode() if inference else contextlib.nullcontext()
    times: dict[str, list[float]] = {"ours": [], "reference": []}
    with context:
        for _ in range(settings.warmup):
            ours()
            reference()
        for index in range(runs):
            order = [("ours", ours), ("reference", reference)]
            for name, fn in order if index % 2 == 0 else order[::-1]:
                times[name].append(timed(fn, settings.device))
    return statistics.median(times["ours"]), statistics.median(times["reference"]), times


def time_one(
    fn: Callable[[], object], settings: Settings, *, inference: bool = True, runs: int | None = None
) -> tuple[float, list[float]]:
    """Median seconds of `fn` after `settings.warmup` warm-up calls."""
    runs = settings.runs if runs is None else runs
    context = torch.inference_mode() if inference else contextlib.nullcontext()
    with context:
        for _ in range(settings.warmup):
            fn()
        times = [timed(fn, settings.device) for _ in range(runs)]
    return statistics.median(times), times


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def peak_memory(device: torch.device | str = "cpu", interval_s: float = 0.002) -> Iterator[dict]:
    """Peak memory above the level at entry, in bytes, stored in the yielded dict as "peak".

    CUDA: `torch.cuda.max_memory_allocated`. CPU: the resident set size sampled every
    `interval_s` by a thread (torch ops release the GIL, so the sampler runs during them);
    allocations shorter than the interval can be missed, so this is a lower bound.
    """
    result: dict = {"peak": 0, "method": ""}
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield result
        torch.cuda.synchronize()
        result.update(peak=torch.cuda.max_memory_allocated() - base, method="cuda allocator")
        return
    base, peak, stop = _current_rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _current_rss_bytes())
            stop.wait(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        stop.set()
        sampler.join()
        peak[0] = max(peak[0], _current_rss_bytes())
        result.update(peak=max(peak[0] - base, 0), method="RSS sampled every 2 ms")


def matmul_peak_flops(
    size: int, dtype: torch.dtype, settings: Settings, device: str | torch.device = "cpu"
) -> float:
    """Measured FLOP/s of a (size x size) @ (size x size) matmul: 2 * size**3 / median time."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, generator=generator, device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator, device=device, dtype=dtype)
    seconds, _ = time_one(lambda: a @ b, settings)
    return 2 * size**3 / seconds


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (slope, intercept) of ys against xs."""
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / var
    return slope, mean_y - slope * mean_x


def format_value(value: float | None) -> str:
    """Four significant digits, or "-" for a missing value."""
    if value is None:
        return "-"
    if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
        return str(value)
    return f"{value:.4g}"


def format_table(rows: list[Row]) -> str:
    """A Markdown table of every row: ours, reference, ratio, target and whether it is met."""
    header = "| bench | metric | ours | reference | unit | ratio | target | met | note |"
    lines = [header, "|" + "---|" * 9]
    for row in rows:
        target = "-"
        if row.target is not None:
            target = ("≥ " if row.higher_is_better else "≤ ") + format_value(row.target)
        met = {None: "-", True: "yes", False: "NO"}[row.met]
        if row.passed is not None:
            met = "pass" if row.passed else "FAIL"
        cells = [row.bench, row.metric, format_value(row.ours), format_value(row.reference)]
        cells += [row.unit, format_value(row.ratio), target, met, row.note]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
