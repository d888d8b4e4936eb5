"""Image-caption data for both training jobs: robust decoding, transforms and datasets.

`load_image_caption_dataset(source, ...)` accepts "shapes", an image folder, WebDataset tar
shards, a `datasets.Dataset`, a folder written by `save_to_disk`, or a Hub name. It returns a
torch `Dataset` (or, with `streaming=True`, an `IterableDataset`) of
`{"image": FloatTensor (3, R, R) in [-1, 1], "caption": str}` with a `report` of skipped files.

Map-style sources are validated once, in the calling process, before training: every candidate
is decoded, bad ones are skipped and counted, and the index of good ones is kept. Streams are
checked as they are read and count into a per-process report.

What happens to each kind of bad input (reason names are `DataReport.counts` keys):

| input                                            | outcome                             |
|--------------------------------------------------|-------------------------------------|
| zero-byte file                                   | skipped, `empty_file`               |
| text file named .png, header cut off             | skipped, `not_an_image`             |
| truncated or broken PNG/JPEG data                | skipped, `corrupt`                  |
| JPEG with damaged entropy-coded bytes            | used: PIL decodes it (undetectable) |
| width*height > max_pixels (decompression bomb)   | skipped, `too_large`, before decode |
| shorter side < min_size (default 8, e.g. 1x1)    | skipped, `too_small`                |
| float ("F") or out-of-range 32-bit images        | skipped, `unsupported_mode`         |
| smaller than the crop but >= min_size            | used, resized up (bicubic)          |
| RGBA, LA, palette or RGB/L with transparency     | used, composited onto `background`  |
| grayscale, CMYK, palette without transparency    | used, converted to RGB              |
| 16-bit grayscale                                 | used, value/257 rounded (0x8080->128) |
| EXIF orientation                                 | used, rotated upright               |
| metadata line: bad JSON/CSV, no file_name, ../   | line skipped, `bad_metadata_line`   |
| metadata names a file that does not exist        | skipped, `missing_file`             |
| a path that cannot be read (a folder, no access) | skipped, `missing_file`             |
| unreadable or truncated tar shard                | readable samples kept, `bad_shard`  |
| no caption (no row, no sidecar, null)            | null caption "", `missing_caption`  |
| empty or whitespace caption                      | null caption "", `empty_caption`    |
| caption not valid UTF-8                          | U+FFFD replacement, `non_utf8_caption` |
| very long, emoji or CJK caption                  | used unchanged (stripped)           |
| same file name in two folders                    | both used                           |

With `missing_caption="skip"`, missing and empty captions drop the image
(`skipped_missing_caption`). A source without any valid image raises ValueError.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from pipelines.data import sources
from pipelines.data.decode import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIZE,
    WHITE,
    DataReport,
    DecodeOptions,
    ImageDecodeError,
    decode_image,
    reduce_report,
    to_rgb,
)
from pipelines.data.sources import Candidate

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MIN_SIZE",
    "DataReport",
    "DecodeOptions",
    "ImageCaptionDataset",
    "ImageDecodeError",
    "ImageTransform",
    "StreamingImageCaptionDataset",
    "decode_image",
    "load_image_caption_dataset",
    "reduce_report",
    "to_rgb",
]


@dataclass
class ImageTransform:
    """PIL RGB -> FloatTensor (3, R, R) in [-1, 1]: resize, crop, optional random flip and
    colour-channel shuffle.

    The shorter side is resized to `resolution` (up or down, bicubic), then a square is cut out
    (`crop` "center" or "random"). `flip=True` mirrors with probability 1/2, for training only.
    `channel_shuffle=p` permutes the RGB channels with probability p (a uniformly random one of
    the six orders, identity included), for an image tokenizer's training only: it shows the
    tokenizer every shape in more colours, and it leaves grays (black, white) unchanged. A
    prior must not see it, since the caption would no longer name the colour.
    Randomness comes only from `generator`, so a seeded generator gives the same output.
    """

    resolution: int
    crop: str = "center"
    flip: bool = False
    channel_shuffle: float = 0.0

    def __post_init__(self):
        if not isinstance(self.resolution, int) or self.resolution <= 0:
            raise ValueError(f"resolution={self.resolution!r}: use a positive int, e.g. 32")
        if self.crop not in ("center", "random"):
            raise ValueError(f"crop={self.crop!r}: use 'center' or 'random'")
        if not 0.0 <= self.channel_shuffle <= 1.0:
            raise ValueError(
                f"channel_shuffle={self.channel_shuffle!r}: use a probability in [0, 1] (0: off)"
            )

    def __call__(
        self, image: Image.Image, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """PIL RGB image of any size -> FloatTensor (3, R, R) in [-1, 1], R = resolution;
        random crops, flips and shuffles draw only from `generator`."""
        size = self.resolution
        width, height = image.size
        scale = size / min(width, height)
        new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
        if new_size != image.size:
            image = image.resize(new_size, Image.Resampling.BICUBIC)
        width, height = new_size
        if self.crop == "random":
            left = int(torch.randint(0, width - size + 1, (1,), generator=generator))
            top = int(torch.randint(0, height - size + 1, (1,), generator=generator))
        else:
            left, top = (width - size) // 2, (height - size) // 2
        image = image.crop((left, top, left + size, top + size))
        if self.flip and bool(torch.rand(1, generator=generator) < 0.5):
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # (R, R, 3)
        if self.channel_shuffle and bool(torch.rand(1, generator=generator) < self.channel_shuffle):
            pixels = pixels[..., torch.randperm(3, generator=generator)]  # (R, R, 3) reordered
        return pixels.permute(2, 0, 1).float() / 127.5 - 1.0  # (3, R, R) in [-1, 1]


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator that depends only on (seed, epoch, index): independent of worker layout."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def _caption(candidate: Candidate, report: DataReport, missing_caption: str) -> str | None:
    """The caption to train on ("" is the null caption), or None when the item is dropped."""
    text = None if candidate.caption is None else candidate.caption.strip()
    if not text:
        if missing_caption == "skip":
            report.add("skipped_missing_caption", candidate.name)
            return None
        report.add("missing_caption" if text is None else "empty_caption", candidate.name)
        return sources.NULL_CAPTION
    if candidate.non_utf8:
        report.add("non_utf8_caption", candidate.name)
    return text


def _read_path(ref: str) -> str:
    """Folder refs are paths, which `decode_image` reads itself (picklable for workers)."""
    return ref


def _validate(candidates, reader, options, missing_caption, distributed) -> tuple[list, DataReport]:
    """Decode every candidate once; returns sorted [(position, ref, caption)] and the report.

    With `distributed` and an initialized process group, each rank checks every world-th
    candidate and the results are all-gathered, so every rank ends with the same index.
    """
    parallel = distributed and dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if parallel else (0, 1)
    positions = list(range(rank, len(candidates), world))
    if isinstance(reader, sources.DatasetColumnReader):
        payloads = reader.iter_payloads(positions)
    else:
        payloads = (reader(candidates[position].ref) for position in positions)
    report, valid = DataReport(), []
    for position, payload in zip(positions, payloads):
        candidate = candidates[position]
        try:
            decode_image(payload, **vars(options))
        except ImageDecodeError as error:
            report.add(error.reason, candidate.name)
            continue
        caption = _caption(candidate, report, missing_caption)
        if caption is not None:
            valid.append((position, candidate.ref, caption))
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (valid, report.to_dict()))
        valid = sorted(entry for part, _ in gathered for entry in part)
        report = DataReport()
        for _, values in gathered:
            report.merge(DataReport.from_dict(values))
    report.num_valid = len(valid)
    return valid, report


class ImageCaptionDataset(torch.utils.data.Dataset):
    """A validated map-style dataset of `{"image": (3, R, R) in [-1, 1], "caption": str}`.

    Random crops and flips use a generator seeded by (seed, epoch, index), so items do not
    depend on the number of DataLoader workers; call `set_epoch` before each epoch.
    """

    def __init__(self, entries, names, reader, transform, report, options, seed=0, extras=None):
        self.entries = entries  # [(ref, caption)]
        self.names = names  # display names, for warnings
        self.reader, self.transform, self.report = reader, transform, report
        self.options, self.seed, self.epoch = options, seed, 0
        self.extra_table = extras  # datasets.Dataset of pass-through columns, indexed by ref

    def __len__(self) -> int:
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        """Select the random crops/flips of `epoch`."""
        self.epoch = int(epoch)

    @property
    def captions(self) -> list[str]:
        """All captions, in index order (e.g. to train the text tokenizer)."""
        return [caption for _, caption in self.entries]

    def extras(self, index: int) -> dict[str, Any]:
        """Other columns of a `datasets` source (e.g. Shapes attributes); {} for folders."""
        return {} if self.extra_table is None else self.extra_table[int(self.entries[index][0])]

    def subset(self, indices: list[int]) -> ImageCaptionDataset:
        """A dataset of the given items (sharing this report)."""
        entries = [self.entries[index] for index in indices]
        names = [self.names[index] for index in indices]
        return ImageCaptionDataset(entries, names, self.reader, self.transform, self.report,
                                   self.options, self.seed, self.extra_table)  # fmt: skip

    def __getitem__(self, index: int) -> dict[str, Any]:
        for offset in range(len(self)):
            position = (index + offset) % len(self)
            ref, caption = self.entries[position]
            try:
                image = decode_image(self.reader(ref), **vars(self.options))
            except ImageDecodeError as error:  # the file changed after validation
                warnings.warn(f"{self.names[position]} is now unreadable ({error}); using the "
                              "next item", UserWarning, stacklevel=2)  # fmt: skip
                continue
            generator = item_generator(self.seed, self.epoch, index)
            return {"image": self.transform(image, generator), "caption": caption}
        raise ValueError(
            f"none of the {len(self)} validated items of this dataset (first: "
            f"{self.names[0] if self.names else None}) can be decoded any more: the files "
            "changed after validation; check the data and load the dataset again"
        )


class StreamingImageCaptionDataset(torch.utils.data.IterableDataset):
    """Decode-as-you-read items from tar shards or a streaming `datasets` dataset.

    Each rank and DataLoader worker reads its own share; random crops and flips depend on
    (seed, epoch, reader). Bad items are skipped and counted in
    `report`, which covers this process only (scope "rank"): exact with num_workers=0 and
    summed over ranks by `reduce_report`; a worker warns with its own counts when it finishes.
    """

    def __init__(self, open_stream, transform, options, missing_caption, seed=0, source=""):
        self.open_stream, self.transform, self.options = open_stream, transform, options
        self.missing_caption, self.seed, self.source, self.epoch = missing_caption, seed, source, 0
        self.report = DataReport(scope="rank")

    def set_epoch(self, epoch: int) -> None:
        """Select the random crops/flips of `epoch`."""
        self.epoch = int(epoch)

    def __iter__(self):
        generator = item_generator(self.seed, self.epoch, sources.consumer_index()[0])
        for candidate in self.open_stream(self.report):
            try:
                image = decode_image(candidate.ref, **vars(self.options))
            except ImageDecodeError as error:
                self.report.add(error.reason, candidate.name)
                continue
            caption = _caption(candidate, self.report, self.missing_caption)
            if caption is not None:
                self.report.num_valid += 1
                yield {"image": self.transform(image, generator), "caption": caption}
        self.report.warn(self.source)


def load_image_caption_dataset(
    source: Any,
    *,
    split: str = "train",
    resolution: int = 32,
    crop: str = "center",
    flip: bool = False,
    channel_shuffle: float = 0.0,
    transform: ImageTransform | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    streaming: bool = False,
    num_samples: int | None = None,
    seed: int = 0,
    missing_caption: str = "null",
    background: tuple[int, int, int] = WHITE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int = DEFAULT_MIN_SIZE,
    distributed: bool = False,
) -> ImageCaptionDataset | StreamingImageCaptionDataset:
    """Build a validated dataset of `{"image": (3, R, R) in [-1, 1], "caption": str}`.

    Args:
        source: "shapes"; an image folder (with `split` subfolders or not); a `.tar` shard, a
            folder of shards or a glob; a `save_to_disk` folder; a `datasets.Dataset`,
            `DatasetDict` or `IterableDataset`; or a Hub dataset name (needs the network).
        split: the split to read ("train", "validation", ...).
        resolution, crop, flip, channel_shuffle: the default `ImageTransform` (ignored when
            `transform` is given).
        num_samples: Shapes: how many to generate; other sources: only the first
            `num_samples` candidates are read (with `streaming`, the first of the whole stream,
            shared out among ranks and DataLoader workers; a multi-shard `datasets` stream
            with more than one reader raises ValueError, since its take() splits per shard).
        seed: Shapes' seed and the seed of random crops and flips.
        missing_caption: "null" (use the null caption "", counted) or "skip" (drop, counted).
        background, max_pixels, min_size: see `decode_image`.
        distributed: split the validation pass over torch.distributed ranks and all-gather
            the index (every rank must call this); otherwise each caller validates everything.

    Raises:
        ValueError: bad arguments, or no valid image in the source.
        FileNotFoundError: a path-like source that does not exist.
    """
    if missing_caption not in ("null", "skip"):
        raise ValueError(f"missing_caption={missing_caption!r}: use 'null' or 'skip'")
    transform = transform or ImageTransform(resolution, crop, flip, channel_shuffle)
    options = DecodeOptions(tuple(background), max_pixels, min_size)
    kind, value, label = sources.resolve_source(source, split, streaming, num_samples, seed,
                                                resolution)  # fmt: skip
    if streaming:
        stream = _stream(kind, value, label, image_column, caption_column, num_samples)
        return StreamingImageCaptionDataset(
            stream, transform, options, missing_caption, seed, label
        )
    scan_report = DataReport()
    candidates, reader, extras = _scan(
        kind, value, label, image_column, caption_column, scan_report
    )
    if num_samples is not None and kind != "shapes":
        candidates = candidates[:num_samples]
    valid, report = _validate(candidates, reader, options, missing_caption, distributed)
    report.merge(scan_report)
    if not valid:
        raise ValueError(
            f"data source {label} has no valid image among {len(candidates)} candidates "
            f"({report.summary()}); check the path and the image files"
        )
    if not distributed or not dist.is_initialized() or dist.get_rank() == 0:
        report.warn(label)
    entries = [(ref, caption) for _, ref, caption in valid]
    names = [candidates[position].name for position, _, _ in valid]
    return ImageCaptionDataset(entries, names, reader, transform, report, options, seed, extras)


def _stream(
    kind: str,
    value: Any,
    label: str,
    image_column: str | None,
    caption_column: str | None,
    num_samples: int | None = None,
) -> Callable:
    """The record stream of a streaming source, tar shards or a `datasets` source, stopped
    after its first `num_samples` candidates (None: all)."""
    if kind == "dataset":
        image_column, caption_column = sources.find_columns(
            value.features, image_column, caption_column, label
        )
        return partial(
            sources.stream_dataset, value, image_column, caption_column, num_samples=num_samples
        )
    if kind == "tar":
        return partial(sources.stream_tar, value, num_samples=num_samples)
    raise ValueError(f"streaming=True needs tar shards or a `datasets` source, not {label}")


def _scan(
    kind: str,
    value: Any,
    label: str,
    image_column: str | None,
    caption_column: str | None,
    report: DataReport,
) -> tuple[list[Candidate], Callable, Any]:
    """(candidates, reader, extra columns or None) of a map-style source; what the scan itself
    skips (bad metadata lines, missing files) is counted in `report`."""
    if kind == "folder":
        return sources.scan_image_folder(value, report, caption_column), _read_path, None
    if kind == "tar":
        return sources.scan_tar_shards(value, report), sources.read_tar_member, None
    image_column, caption_column = sources.find_columns(
        value.features, image_column, caption_column, label
    )
    value = sources.undecoded(value, image_column)
    reader = sources.DatasetColumnReader(value, image_column)
    extras = value.remove_columns([image_column, caption_column])
    return sources.scan_dataset(value, caption_column), reader, extras
