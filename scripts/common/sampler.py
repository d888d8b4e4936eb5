"""Deterministic, resumable batches: the sample indices are a pure function of the step.

Each epoch is a permutation of the dataset drawn from a generator seeded with (seed, epoch), cut
into `steps_per_epoch = N // global_batch` global batches (the remainder of each permutation is
dropped, as DistributedSampler(drop_last=True) does, so a batch never repeats a sample). Within
step s (at position p = s mod steps_per_epoch of its epoch), micro-batch m of the gradient
accumulation and rank r read the permutation at

    offset = p * global_batch + (m * world_size + r) * batch_size

so the ranks read disjoint consecutive slices, their union is the batch a single process with
`batch_size * world_size` reads, and a resumed run jumps to any step without reading the data
before it (the data-loader position is the step number in the checkpoint).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch


class StepSampler:
    """Sample indices of every (step, micro-batch) for one rank."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        accumulation: int = 1,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        self.num_samples, self.batch_size = num_samples, batch_size
        self.accumulation, self.world_size, self.rank = accumulation, world_size, rank
        self.seed, self.shuffle = seed, shuffle
        if num_samples < self.global_batch_size:
            raise ValueError(
                f"the training set has {num_samples} samples, fewer than one global batch of "
                f"{self.global_batch_size} (--batch-size {batch_size} x {world_size} processes x "
                f"{accumulation} accumulation steps); lower --batch-size or add data"
            )
        self.steps_per_epoch = num_samples // self.global_batch_size
        self._permutations: dict[int, np.ndarray] = {}

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size * self.accumulation

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            self._permutations.clear()  # steps move forward: one epoch at a time is enough
            if self.shuffle:
                state = np.random.SeedSequence([self.seed, epoch]).generate_state(2)
                order = np.random.default_rng(state).permutation(self.num_samples)
            else:
                order = np.arange(self.num_samples)
            self._permutations[epoch] = order
        return self._permutations[epoch]

    def epoch_of(self, step: int) -> int:
        """The epoch that optimizer step `step` belongs to."""
        return step // self.steps_per_epoch

    def indices(self, step: int, micro: int = 0) -> tuple[np.ndarray, int]:
        """(indices, epoch): this rank's `batch_size` sample indices of (step, micro)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        start = position * self.global_batch_size
        start += (micro * self.world_size + self.rank) * self.batch_size
        return self._permutation(epoch)[start : start + self.batch_size], epoch


class StepBatches(torch.utils.data.Dataset):
    """Item k = the collated micro-batch number k of this rank (k = step * accumulation + m).

    Wrapping a map-style dataset this way lets a DataLoader with workers prefetch batches while
    the order stays a function of k alone. If the dataset has `set_epoch`, it is set to the
    batch's epoch before reading (random crops/flips of that epoch, in any worker).
    """

    def __init__(self, dataset: Any, sampler: StepSampler, collate) -> None:
        self.dataset, self.sampler, self.collate = dataset, sampler, collate

    def __len__(self) -> int:  # effectively unbounded; the training loop decides when to stop
        return 2**62

    def __getitem__(self, k: int) -> Any:
        step, micro = divmod(k, self.sampler.accumulation)
        indices, epoch = self.sampler.indices(step, micro)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        items = [self.dataset[index] for index in indices.tolist()]
        batch = self.collate(items)
        batch["index"] = torch.from_numpy(indices)
        return batch


def record_indices(
    output_dir: str | os.PathLike, rank: int, indices: np.ndarray | torch.Tensor
) -> None:
    """Append one line of sample indices to OUTPUT/samples-rank<rank>.txt (a debug trace that
    the multi-process tests read to check that ranks train on disjoint samples)."""
    path = Path(output_dir) / f"samples-rank{rank}.txt"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(" ".join(str(int(index)) for index in indices) + "\n")
