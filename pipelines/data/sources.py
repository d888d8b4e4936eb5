"""Where image-caption pairs come from: candidates `(name, ref, caption)`, not yet decoded.

Layouts: an image folder (HF `imagefolder`: `metadata.jsonl`/`.csv` anywhere in the tree, with
`file_name` relative to that file's folder and a `text` or `caption` column, or `.txt` sidecars);
WebDataset tar shards (`key.png|jpg|jpeg|webp` + `key.txt`, key = member path up to the first
dot of its basename); any `datasets` dataset. Outcomes are tabled in `pipelines/data/images.py`.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch.distributed as dist
import torch.utils.data

from pipelines.data.decode import DataReport, decode_caption_bytes

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
TAR_IMAGE_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "webp"})
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
CAPTION_KEYS = ("text", "caption")
NULL_CAPTION = ""
SPLIT_NAMES = ("train", "validation", "test")
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # "name", "user/name"


@dataclass(frozen=True)
class Candidate:
    """One image to validate: a display name, a reference to its bytes, its raw caption.

    `non_utf8` marks a caption decoded with errors="replace"; it is counted only if the image
    turns out valid, so that every dropped image has exactly one reason.
    """

    name: str
    ref: Any  # str path | (shard path, offset, size) | row index
    caption: str | None  # None: no caption given at all
    non_utf8: bool = False


def _relative_image(meta: Path, root: Path, file_name: Any) -> Path | None:
    """The image a metadata `file_name` points to, or None if it is malformed or leaves root."""
    if not isinstance(file_name, str) or not file_name:
        return None
    path = (meta.parent / file_name).resolve()
    return path if path.is_relative_to(root) else None


def _caption_value(row: dict, caption_column: str | None) -> Any:
    """The caption field of a metadata row (`caption_column`, else "text" or "caption")."""
    keys = (caption_column,) if caption_column else CAPTION_KEYS
    return next((row[key] for key in keys if key in row), None)


def _read_jsonl(meta: Path, report: DataReport, caption_column: str | None) -> list[tuple]:
    rows = []
    for number, raw in enumerate(meta.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        label = f"{meta.name}:{number}"
        try:
            text = raw.decode("utf-8")
            bad_utf8 = False
        except UnicodeDecodeError:
            text, bad_utf8 = raw.decode("utf-8", errors="replace"), True
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            report.add("bad_metadata_line", label)
            continue
        caption = _caption_value(row, caption_column)
        if caption is not None and not isinstance(caption, str):
            report.add("bad_metadata_line", label)
            continue
        rows.append((label, row.get("file_name"), caption, bad_utf8))
    return rows


def _read_csv(meta: Path, report: DataReport, caption_column: str | None) -> list[tuple]:
    data = meta.read_bytes()
    try:
        text, bad_utf8 = data.decode("utf-8-sig"), False
    except UnicodeDecodeError:
        text, bad_utf8 = data.decode("utf-8", errors="replace"), True
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    while True:
        label = f"{meta.name}:{reader.line_num + 1}"
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error:
            report.add("bad_metadata_line", label)
            continue
        if None in row or None in row.values():  # too many or too few fields on this line
            report.add("bad_metadata_line", label)
            continue
        caption = _caption_value(row, caption_column)
        flagged = bad_utf8 and caption is not None and "\ufffd" in caption
        rows.append((label, row.get("file_name"), caption, flagged))
    return rows


def scan_image_folder(
    root: str | Path, report: DataReport, caption_column: str | None = None
) -> list[Candidate]:
    """Candidates of an image folder; metadata problems and missing files are counted.

    Every metadata row is one candidate (so one image may carry several captions); images that
    no metadata row names use their `.txt` sidecar, or no caption. Files whose extension is not
    an image extension are ignored unless a metadata row names them. Sorted by name.
    """
    root = Path(root).resolve()
    files = sorted(path for path in root.rglob("*") if path.is_file())
    candidates, covered = [], set()
    for meta in (path for path in files if path.name in METADATA_NAMES):
        read = _read_jsonl if meta.suffix == ".jsonl" else _read_csv
        for label, file_name, caption, bad_utf8 in read(meta, report, caption_column):
            path = _relative_image(meta, root, file_name)
            if path is None:
                report.add("bad_metadata_line", label)
            elif not path.is_file():
                report.add("missing_file", str(file_name))
            else:
                covered.add(path)
                name = str(path.relative_to(root))
                candidates.append(Candidate(name, str(path), caption, bad_utf8))
    for path in files:
        if path.suffix.lower() not in IMAGE_EXTENSIONS or path in covered:
            continue
        name = str(path.relative_to(root))
        sidecar = path.with_suffix(".txt")
        caption, bad_utf8 = None, False
        if sidecar.is_file():
            caption, bad_utf8 = decode_caption_bytes(sidecar.read_bytes())
        candidates.append(Candidate(name, str(path), caption, bad_utf8))
    return sorted(candidates, key=lambda candidate: candidate.name)


def _split_key(member_name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first dot of the basename, ext = the rest."""
    folder, _, base = member_name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def iter_tar_samples(shard: str | Path, report: DataReport) -> Iterator[tuple[str, dict]]:
    """Yield `(key, {ext: (offset, size, bytes-or-None)})` per sample of one tar shard, in order.

    Caption bytes are read; image bytes are left on disk (offset and size). A shard that cannot
    be read, or that ends early, is counted as bad_shard and its readable samples are kept.
    """
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(shard, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_key(member.name)
                data = tar.extractfile(member).read() if ext == "txt" else None
                samples.setdefault(key, {})[ext] = (member.offset_data, member.size, data)
    except (tarfile.TarError, OSError, EOFError):
        report.add("bad_shard", str(shard))
    yield from samples.items()


def scan_tar_shards(shards: list[Path], report: DataReport) -> list[Candidate]:
    """Candidates of WebDataset tar shards; an image without `key.txt` has no caption."""
    candidates = []
    for shard in shards:
        for key, parts in iter_tar_samples(shard, report):
            image_ext = next((ext for ext in parts if ext in TAR_IMAGE_EXTENSIONS), None)
            if image_ext is None:
                continue
            offset, size, _ = parts[image_ext]
            name = f"{Path(shard).name}:{key}.{image_ext}"
            caption, bad_utf8 = None, False
            if "txt" in parts:
                caption, bad_utf8 = decode_caption_bytes(parts["txt"][2])
            candidates.append(Candidate(name, (str(shard), offset, size), caption, bad_utf8))
    return candidates


def read_tar_member(ref: tuple[str, int, int]) -> bytes:
    """The bytes of a tar member given `(shard, offset, size)`."""
    shard, offset, size = ref
    with open(shard, "rb") as handle:
        handle.seek(offset)
        return handle.read(size)


def find_tar_shards(source: str | Path) -> list[Path]:
    """Tar shards named by a `.tar` file, a folder holding `.tar` files, or a glob pattern."""
    path = Path(source)
    if path.is_file() and path.suffix == ".tar":
        return [path]
    if path.is_dir():
        return sorted(path.glob("*.tar"))
    if any(char in str(source) for char in "*?["):
        return sorted(Path(match) for match in glob.glob(str(source)) if match.endswith(".tar"))
    return []


# ---------------------------------------------------------------- `datasets` sources
IMAGE_COLUMN_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp")
CAPTION_COLUMN_NAMES = ("caption", "text", "prompt", "txt", "sentence")


def find_columns(
    features: Any, image_column: str | None, caption_column: str | None, source: str
) -> tuple[str, str]:
    """Pick the image and caption columns of a `datasets` dataset (explicit names win)."""
    names = list(features)
    for parameter, value in (("image_column", image_column), ("caption_column", caption_column)):
        if value is not None and value not in names:
            raise ValueError(f"{parameter}={value!r} is not a column of {source}; columns: {names}")
    if image_column is None:
        typed = [name for name in names if isinstance(features[name], datasets.Image)]
        image_column = next(iter(typed + [n for n in IMAGE_COLUMN_NAMES if n in names]), None)
    if caption_column is None:
        caption_column = next((name for name in CAPTION_COLUMN_NAMES if name in names), None)
    if image_column is None or caption_column is None:
        raise ValueError(
            f"{source}: cannot tell which columns hold the image and the caption (columns: "
            f"{names}); pass image_column= and caption_column="
        )
    return image_column, caption_column


def undecoded(dataset: Any, image_column: str) -> Any:
    """The dataset with its Image column left as bytes/path, so a bad row cannot raise on access."""
    if isinstance(dataset.features[image_column], datasets.Image):
        return dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


def payload_of(value: Any) -> Any:
    """What `decode_image` reads from a cell: bytes, a path, a PIL image, or None."""
    if isinstance(value, dict):  # a datasets Image cell: b"" is an empty file, not "no bytes"
        return value["bytes"] if value.get("bytes") is not None else value.get("path")
    return value


class DatasetColumnReader:
    """Picklable `ref -> payload` reader for one column of a `datasets.Dataset`."""

    def __init__(self, dataset: Any, column: str):
        self.dataset = dataset.select_columns([column])
        self.column = column

    def __call__(self, ref: int) -> Any:
        return payload_of(self.dataset[int(ref)][self.column])

    def iter_payloads(self, indices: list[int], batch_size: int = 256) -> Iterator[Any]:
        """Payloads of `indices`, read in batches (fast for a validation pass)."""
        for batch in self.dataset.select(indices).iter(batch_size=batch_size):
            yield from (payload_of(value) for value in batch[self.column])


def scan_dataset(dataset: Any, caption_column: str) -> list[Candidate]:
    """One candidate per row; a None caption is a missing caption."""
    captions = dataset[caption_column]
    return [
        Candidate(f"row {index}", index, None if caption is None else str(caption))
        for index, caption in enumerate(captions)
    ]


# ---------------------------------------------------------------- streams
def consumer_index() -> tuple[int, int]:
    """(index, count) of this reader among all ranks x DataLoader workers."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + worker, world * workers


def stream_tar(
    shards: list[Path], report: DataReport, num_samples: int | None = None
) -> Iterator[Candidate]:
    """This consumer's samples of tar shards, with image bytes as `ref`.

    Whole shards are dealt out when there are at least as many shards as consumers and no
    `num_samples` limit; otherwise every consumer reads the shards in order, keeps every
    `count`-th sample, and only consumer 0 counts unreadable shards. With `num_samples`, only
    the first num_samples samples of the shards (in order) are read, by all consumers together.
    """
    index, count = consumer_index()
    by_shard = len(shards) >= count and num_samples is None
    shard_report = report if by_shard or index == 0 else DataReport()
    position = 0
    for shard in shards[index::count] if by_shard else shards:
        for candidate in scan_tar_shards([shard], shard_report):
            if num_samples is not None and position >= num_samples:
                return
            position += 1
            if by_shard or (position - 1) % count == index:
                data = read_tar_member(candidate.ref)
                yield Candidate(candidate.name, data, candidate.caption, candidate.non_utf8)


def stream_dataset(
    dataset: Any,
    image_column: str,
    caption_column: str,
    report: DataReport,
    num_samples: int | None = None,
):
    """This rank's rows of a streaming `datasets.IterableDataset`, payloads as `ref`.

    Rows are split across ranks here; `datasets` itself splits them across DataLoader workers.
    With `num_samples`, only the dataset's first num_samples rows are read (before the split);
    a multi-shard stream shared by several ranks or workers then raises ValueError.
    `report` is unused (rows cannot fail before decoding; the signature matches stream_tar).
    """
    from datasets.distributed import split_dataset_by_node

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    rows = undecoded(dataset, image_column)
    if num_samples is not None:
        streamed = isinstance(rows, datasets.IterableDataset)
        consumers = consumer_index()[1]
        if streamed and rows.n_shards > 1 and consumers > 1:
            # datasets' take() is split per shard when ranks or workers share the stream, so
            # the consumers would read rows from every shard, not the stream's first ones.
            raise ValueError(
                f"num_samples={num_samples} with a {rows.n_shards}-shard streaming dataset read "
                f"by {consumers} ranks x workers would not read its first rows; stream with one "
                "process and --num-workers 0, or load it without streaming"
            )
        rows = rows.take(min(num_samples, num_samples if streamed else len(rows)))
    mine = split_dataset_by_node(rows, rank=rank, world_size=world)
    for number, row in enumerate(mine):
        caption = row.get(caption_column)
        caption = None if caption is None else str(caption)
        yield Candidate(
            f"stream row {number} of rank {rank}", payload_of(row[image_column]), caption
        )


def resolve_source(
    source: Any, split: str, streaming: bool, num_samples: int | None, seed: int, resolution: int
) -> tuple[str, Any, str]:
    """Classify `source` as ("shapes"|"dataset", Dataset), ("folder", Path) or ("tar", shards).

    Returns (kind, value, label) where label names the source in messages.
    """
    if isinstance(source, str) and source == "shapes":
        from pipelines.data.shapes import make_shapes_dataset

        extra = {} if num_samples is None else {"num_samples": num_samples}
        dataset = make_shapes_dataset(split=split, resolution=resolution, seed=seed, **extra)
        return "shapes", dataset, f"shapes[{split}]"
    if isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in source:
            raise ValueError(f"split={split!r} is not in the dataset; splits: {list(source)}")
        source = source[split]
    elif isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        _only_train(split, "a single dataset (not a DatasetDict)")
    if isinstance(source, datasets.IterableDataset) and not streaming:
        raise ValueError("an IterableDataset source needs streaming=True")
    if isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        return "dataset", source, f"dataset[{split}]"
    label, path = str(source), Path(source)
    shards = find_tar_shards(source)
    if shards:
        _only_train(split, f"{label} is a set of .tar shards, which")
        return "tar", shards, label
    if path.is_dir() and (
        (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    ):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.Dataset):
            _only_train(split, f"{label} holds a single saved Dataset (not a DatasetDict), which")
        kind, value, _ = resolve_source(loaded, split, streaming, num_samples, seed, resolution)
        return kind, value, label
    if path.is_dir():
        splits = sorted(child.name for child in path.iterdir() if child.name in SPLIT_NAMES)
        if splits:
            if split not in splits:
                raise ValueError(f"split={split!r}: {path} has split folders {splits} only")
            return "folder", path / split, f"{label}/{split}"
        _only_train(split, f"{path} has no split subfolders ({', '.join(SPLIT_NAMES)}), so it")
        return "folder", path, label
    if path.exists() or not HUB_NAME.fullmatch(label):
        raise FileNotFoundError(
            f"source={label!r} is not an image folder, a .tar shard or a save_to_disk folder"
        )
    try:  # a Hub name such as "user/dataset" (needs the network or the local HF cache)
        loaded = datasets.load_dataset(label, split=split, streaming=streaming)
    except OSError as error:  # includes datasets' DatasetNotFoundError
        raise FileNotFoundError(
            f"source={label!r} is not a local path, and loading it as a Hub dataset failed: {error}"
        ) from error
    return "dataset", loaded, label


def _only_train(split: str, what: str) -> None:
    """ValueError unless split is "train", the only split of a source without splits."""
    if split != "train":
        raise ValueError(
            f"split={split!r}: {what} only has split='train'; pass split='train' (--split train), "
            "or a source "
            f"with a {split!r} split (a DatasetDict, or split subfolders such as {split}/)"
        )


def available_splits(source: Any) -> list[str] | None:
    """The splits `source` offers (a bare dataset, folder or shard set offers only "train");
    None for a Hub name, whose splits are only known online."""
    if isinstance(source, str) and source == "shapes":
        return list(SPLIT_NAMES)
    if isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return list(source)
    if isinstance(source, (datasets.Dataset, datasets.IterableDataset)) or find_tar_shards(source):
        return ["train"]
    path = Path(source)
    if (path / "dataset_dict.json").is_file():
        return list(json.loads((path / "dataset_dict.json").read_text())["splits"])
    if path.is_dir():
        return sorted(child.name for child in path.iterdir() if child.name in SPLIT_NAMES) or [
            "train"
        ]
    return None
