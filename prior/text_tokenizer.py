"""Captions -> fixed-length id rows for the prior: `[BOS] tokens [EOS] [PAD]...`.

Backends:
- SentencePiece trained here (`TextTokenizer.train`), unigram or BPE, with byte fallback so that
  emoji and CJK never become <unk>. Ids: pad 0, unk 1, bos 2, eos 3.
- Any Hugging Face tokenizer directory loaded through `AutoTokenizer` (T5, CLIP, GPT-2, Llama...).
  Special tokens are never added by HF; this class adds them the same way for every backend:
  BOS is the tokenizer's BOS (else its CLS) and is left out when it has neither (T5); EOS is its
  EOS (else SEP) and is required; PAD is its pad token, else EOS (GPT-2 and Llama have none).
- A bare SentencePiece `.model` file, with the ids it defines (pad falls back to EOS).

Captions longer than `text_length` are truncated (EOS is kept) with a warning, once per
tokenizer; the count is kept in `num_truncated`.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from codegrid.io import atomic_directory

CONFIG_NAME = "text_tokenizer.json"
SPM_NAME = "spm.model"
HF_DIR = "hf_tokenizer"
FORMAT = "codegrid-text-tokenizer"
MODEL_TYPES = ("unigram", "bpe")
SPECIAL_NAMES = ("pad", "unk", "bos", "eos")


def _field(config: dict, name: str, folder: Path):
    """`config[name]` of our saved config, or ValueError naming the file and the field."""
    if name not in config:
        raise ValueError(
            f"{folder / CONFIG_NAME} has no field {name!r}; the file is malformed: save the "
            "tokenizer again with TextTokenizer.save_pretrained"
        )
    return config[name]


class _SentencePiece:
    kind = "sentencepiece"

    def __init__(self, proto: bytes) -> None:
        self.proto = proto
        import sentencepiece as spm  # lazily: the models must import on a torch-only machine

        self.processor = spm.SentencePieceProcessor(model_proto=proto)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.processor.encode(texts, out_type=int)

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode(ids)

    def __len__(self) -> int:
        return self.processor.get_piece_size()

    def special_ids(self) -> dict[str, int | None]:
        p = self.processor
        ids = {"pad": p.pad_id(), "unk": p.unk_id(), "bos": p.bos_id(), "eos": p.eos_id()}
        return {name: (value if value >= 0 else None) for name, value in ids.items()}

    def save(self, folder: Path) -> None:
        (folder / SPM_NAME).write_bytes(self.proto)


class _HuggingFace:
    kind = "hf"

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def special_ids(self) -> dict[str, int | None]:
        t = self.tokenizer
        bos = t.bos_token_id if t.bos_token_id is not None else t.cls_token_id
        eos = t.eos_token_id if t.eos_token_id is not None else t.sep_token_id
        return {"pad": t.pad_token_id, "unk": t.unk_token_id, "bos": bos, "eos": eos}

    def save(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(str(folder / HF_DIR))


def _load_hf(source: str, local_files_only: bool) -> _HuggingFace:
    from transformers import AutoTokenizer  # deferred: importing transformers takes seconds

    return _HuggingFace(AutoTokenizer.from_pretrained(source, local_files_only=local_files_only))


class TextTokenizer:
    """Fixed-length caption ids.

    Attributes:
        text_length: length of every id row.
        pad_id, bos_id (None when the backend has no BOS), eos_id, unk_id (may be None).
        vocab_size: ids are in [0, vocab_size).
    """

    def __init__(self, backend, text_length: int, special_ids: dict[str, int | None]) -> None:
        self.backend = backend
        self.eos_id = special_ids["eos"]
        if self.eos_id is None:
            raise ValueError("the text tokenizer defines no EOS (or SEP) token; add one")
        self.bos_id = special_ids["bos"]
        self.pad_id = special_ids["pad"] if special_ids["pad"] is not None else self.eos_id
        self.unk_id = special_ids["unk"]
        self.num_special = 1 + (self.bos_id is not None)
        if not isinstance(text_length, int) or text_length < self.num_special + 1:
            raise ValueError(
                f"text_length={text_length!r} is too short; allowed: an int >= "
                f"{self.num_special + 1} ({self.num_special} special tokens + 1 caption token)"
            )
        self.text_length = text_length
        self.num_truncated = 0
        self._warned = {"truncation": False, "unknown": False}

    @property
    def vocab_size(self) -> int:
        return len(self.backend)

    def __repr__(self) -> str:
        return (
            f"TextTokenizer({self.backend.kind}, vocab_size={self.vocab_size}, "
            f"text_length={self.text_length}, pad={self.pad_id}, bos={self.bos_id}, "
            f"eos={self.eos_id})"
        )

    def __call__(self, captions: str | Sequence[str]) -> torch.Tensor:
        """captions (a str or B strs) -> LongTensor (B, text_length) of [BOS] ids [EOS] [PAD]..."""
        if isinstance(captions, str):
            captions = [captions]
        for index, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise ValueError(
                    f"caption {index} is {caption!r} ({type(caption).__name__}); captions must "
                    "be str (use '' for an empty caption)"
                )
        encoded = self.backend.encode(list(captions)) if captions else []
        rows = torch.tensor([self._row(ids) for ids in encoded], dtype=torch.long)  # (B, T)
        return rows.view(len(encoded), self.text_length)  # (B, T), also for B = 0

    def _row(self, ids: list[int]) -> list[int]:
        budget = self.text_length - self.num_special
        if len(ids) > budget:
            self.num_truncated += 1
            self._warn_once(
                "truncation",
                f"a caption of {len(ids)} tokens was truncated to {budget} (text_length="
                f"{self.text_length}); later truncations are counted in num_truncated",
            )
            ids = ids[:budget]
        if self.unk_id not in (None, self.eos_id, self.pad_id) and self.unk_id in ids:
            self._warn_once("unknown", "a caption has characters the tokenizer maps to <unk>")
        head = [] if self.bos_id is None else [self.bos_id]
        row = [*head, *ids, self.eos_id]
        return row + [self.pad_id] * (self.text_length - len(row))

    def _warn_once(self, key: str, message: str) -> None:
        if not self._warned[key]:
            self._warned[key] = True
            warnings.warn(message, UserWarning, stacklevel=4)

    def null_ids(self, batch_size: int = 1) -> torch.Tensor:
        """The empty caption's ids, (batch_size, text_length): the null condition for CFG."""
        row = torch.tensor(self._row([]), dtype=torch.long)
        return row.expand(batch_size, -1).clone()  # (B, T)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """One id row -> caption; BOS, everything from the first EOS on, and pads are dropped."""
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        if self.bos_id is not None and ids and ids[0] == self.bos_id:
            ids = ids[1:]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.backend.decode([i for i in ids if i != self.pad_id])

    def batch_decode(self, ids: torch.Tensor) -> list[str]:
        """(B, T) ids -> B captions."""
        return [self.decode(row) for row in ids]

    @classmethod
    def train(
        cls,
        captions: Sequence[str],
        vocab_size: int,
        text_length: int,
        model_type: str = "unigram",
        byte_fallback: bool = True,
        character_coverage: float = 1.0,
        normalization_rule_name: str = "nmt_nfkc",
        **spm_options,
    ) -> TextTokenizer:
        """Train SentencePiece in memory on `captions`.

        `vocab_size` is an upper bound (hard_vocab_limit=False, so tiny corpora work); the
        trained size is `vocab_size` of the result. With byte_fallback (the default) unseen
        characters become byte pieces, which needs vocab_size >= 260 + the distinct characters
        of the corpus; a smaller vocab_size raises ValueError naming the minimum. Pass
        byte_fallback=False for tiny vocabularies: unseen characters then map to <unk>, with a
        warning at encoding time.
        """
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={model_type!r} is invalid; allowed: {MODEL_TYPES}")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 8:
            raise ValueError(f"vocab_size={vocab_size!r} is invalid; allowed: an int >= 8")
        sentences = [caption for caption in captions if isinstance(caption, str) and caption]
        if not sentences:
            raise ValueError("captions holds no non-empty str to train the text tokenizer on")
        model = io.BytesIO()
        options = dict(
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            character_coverage=character_coverage,
            normalization_rule_name=normalization_rule_name,
            hard_vocab_limit=False,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            minloglevel=2,
        )
        try:
            import sentencepiece as spm

            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences), model_writer=model, **{**options, **spm_options}
            )
        except RuntimeError as error:
            needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(error))
            if needed is None:
                raise
            raise ValueError(
                f"vocab_size={vocab_size} is too small for this corpus with byte_fallback="
                f"{byte_fallback}; allowed: vocab_size >= {needed.group(1)}, or "
                "byte_fallback=False (unseen characters then map to <unk>)"
            ) from error
        backend = _SentencePiece(model.getvalue())
        return cls(backend, text_length, backend.special_ids())

    @classmethod
    def from_pretrained(
        cls, path: str | Path, text_length: int | None = None, allow_download: bool = False
    ) -> TextTokenizer:
        """Load our own saved folder, a local HF tokenizer dir, or a bare SentencePiece .model.

        `text_length` is required for HF dirs and .model files; for our own folder it overrides
        the saved value. A path that does not exist is a Hub id only with allow_download=True.
        """
        path = Path(path)
        if path.is_file():
            if path.suffix != ".model":
                raise ValueError(
                    f"{path} is a file but not a SentencePiece .model; pass a tokenizer "
                    "folder or a .model file"
                )
            backend = _SentencePiece(path.read_bytes())
        elif path.is_dir() and (path / CONFIG_NAME).is_file():
            return cls._from_own_folder(path, text_length)
        elif path.is_dir():
            backend = _load_hf(str(path), local_files_only=True)
        elif allow_download:
            backend = _load_hf(str(path), local_files_only=False)
        else:
            raise FileNotFoundError(
                f"text tokenizer {str(path)!r} not found; pass a local folder or .model file, "
                "or allow_download=True to fetch a Hugging Face Hub id"
            )
        if text_length is None:
            raise ValueError(f"text_length is required to load {path} (e.g. text_length=64)")
        return cls(backend, text_length, backend.special_ids())

    @classmethod
    def _from_own_folder(cls, folder: Path, text_length: int | None) -> TextTokenizer:
        try:
            config = json.loads((folder / CONFIG_NAME).read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{folder / CONFIG_NAME} is not valid JSON ({error})") from error
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise ValueError(f"{folder / CONFIG_NAME} is not a {FORMAT} config")
        kind = config.get("backend")
        if kind not in ("sentencepiece", "hf"):
            raise ValueError(
                f"{folder / CONFIG_NAME}: backend={kind!r}; allowed: sentencepiece, hf"
            )
        backend_path = folder / (SPM_NAME if kind == "sentencepiece" else HF_DIR)
        if not backend_path.exists():
            raise FileNotFoundError(f"{backend_path} not found; the tokenizer folder is incomplete")
        if kind == "sentencepiece":
            backend = _SentencePiece(backend_path.read_bytes())
        else:
            backend = _load_hf(str(backend_path), local_files_only=True)
        special = {name: _field(config, f"{name}_id", folder) for name in SPECIAL_NAMES}
        if text_length is None:
            text_length = _field(config, "text_length", folder)
        return cls(backend, text_length, special)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the backend and `text_tokenizer.json` atomically (codegrid.io)."""
        config = {
            "format": FORMAT,
            "backend": self.backend.kind,
            "text_length": self.text_length,
            "vocab_size": self.vocab_size,
            **{f"{name}_id": getattr(self, f"{name}_id") for name in SPECIAL_NAMES},
        }
        with atomic_directory(directory) as tmp:
            self.backend.save(tmp)
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        return Path(directory)
