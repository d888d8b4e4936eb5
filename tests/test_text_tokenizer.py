"""Text tokenizer: SentencePiece training, HF tokenizer dirs built locally, layout, round trips."""

from __future__ import annotations

import io
import json
import warnings

import pytest
import sentencepiece as spm
import torch

from prior import TextTokenizer

CAPTIONS = [
    "a small red circle on the left",
    "a large blue square at the top on a gray background",
    "a green triangle in the center",
    "a yellow star at the bottom right",
    "two shapes: a purple cross and an orange diamond",
    "a white heart below a black hexagon",
] * 10
ROUND_TRIP = ["a red circle on the left", "a large green triangle", ""]
UNSEEN = ["a red 🙂 circle 漢字 ümlaut", "星と月 🌙"]


@pytest.fixture(scope="module", params=["unigram", "bpe"])
def trained(request):
    return TextTokenizer.train(CAPTIONS, vocab_size=320, text_length=48, model_type=request.param)


def test_layout_bos_tokens_eos_pad(trained):
    ids = trained(["a red circle", ""])
    assert ids.shape == (2, 48) and ids.dtype == torch.long
    assert (trained.pad_id, trained.unk_id, trained.bos_id, trained.eos_id) == (0, 1, 2, 3)
    row = ids[0].tolist()
    end = row.index(3)
    assert row[0] == 2 and end > 1 and set(row[end + 1 :]) == {0}
    assert ids[1].tolist() == [2, 3] + [0] * 46
    assert torch.equal(trained.null_ids(3), ids[1].expand(3, -1))
    assert ids.max() < trained.vocab_size <= 320


def test_round_trip_and_byte_fallback_for_emoji_and_cjk(trained):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither truncation nor <unk> may be reported
        for caption in ROUND_TRIP + UNSEEN:
            ids = trained([caption])[0]
            assert trained.unk_id not in ids.tolist()
            assert trained.decode(ids) == caption
    assert trained.batch_decode(trained(ROUND_TRIP)) == ROUND_TRIP


def test_truncation_warns_once_and_keeps_eos(trained):
    long_caption = " ".join(CAPTIONS[:6])
    with pytest.warns(UserWarning, match="truncated"):
        ids = trained([long_caption, long_caption])
    assert (ids[:, -1] == trained.eos_id).all() and trained.num_truncated == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trained([long_caption])
    assert trained.num_truncated == 3
    assert long_caption.startswith(trained.decode(ids[0]))


def test_save_and_load_own_folder(trained, tmp_path):
    trained.save_pretrained(tmp_path / "tok")
    loaded = TextTokenizer.from_pretrained(tmp_path / "tok")
    assert torch.equal(loaded(ROUND_TRIP + UNSEEN), trained(ROUND_TRIP + UNSEEN))
    assert (loaded.vocab_size, loaded.text_length) == (trained.vocab_size, 48)
    assert TextTokenizer.from_pretrained(tmp_path / "tok", text_length=8).text_length == 8
    bare = TextTokenizer.from_pretrained(tmp_path / "tok" / "spm.model", text_length=48)
    assert torch.equal(bare(ROUND_TRIP), trained(ROUND_TRIP))
    (tmp_path / "tok" / "spm.model").unlink()
    with pytest.raises(FileNotFoundError, match=r"spm\.model not found"):
        TextTokenizer.from_pretrained(tmp_path / "tok")


def test_small_vocab_needs_byte_fallback_off():
    with pytest.raises(ValueError, match=r"vocab_size=64 .* vocab_size >= \d+"):
        TextTokenizer.train(CAPTIONS, vocab_size=64, text_length=16)
    small = TextTokenizer.train(CAPTIONS, vocab_size=64, text_length=32, byte_fallback=False)
    assert small.vocab_size <= 64
    assert small.decode(small(["a red circle"])[0]) == "a red circle"
    with pytest.warns(UserWarning, match="<unk>"):
        ids = small(UNSEEN[:1])
    assert small.unk_id in ids.tolist()[0]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(vocab_size=320, text_length=2), ValueError, "text_length=2"),
        (dict(vocab_size=320, text_length=16, model_type="word"), ValueError, "model_type"),
    ],
)
def test_train_validation(kwargs, error, message):
    with pytest.raises(error, match=message):
        TextTokenizer.train(CAPTIONS, **kwargs)


def test_bad_captions_and_paths(trained, tmp_path):
    with pytest.raises(ValueError, match="caption 1 is None"):
        trained(["ok", None])
    with pytest.raises(FileNotFoundError, match="allow_download"):
        TextTokenizer.from_pretrained(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a SentencePiece"):
        TextTokenizer.from_pretrained(tmp_path / "notes.txt")


def gpt2_style_dir(path):
    """A byte-level BPE trained here, wrapped as GPT2TokenizerFast (pad None, bos = eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(CAPTIONS, trainer)
    special = "<|endoftext|>"
    wrapped = GPT2TokenizerFast(
        tokenizer_object=backend, bos_token=special, eos_token=special, unk_token=special
    )
    wrapped.save_pretrained(str(path))
    return path


def t5_style_dir(path):
    """A SentencePiece model with T5's layout (pad 0, eos 1, unk 2, no BOS) as spiece.model."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CAPTIONS),
        model_writer=model,
        vocab_size=60,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    path.mkdir()
    (path / "spiece.model").write_bytes(model.getvalue())
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer"}))
    return path


def test_hf_gpt2_style_dir(tmp_path):
    tok = TextTokenizer.from_pretrained(gpt2_style_dir(tmp_path / "gpt2"), text_length=40)
    eos = tok.eos_id
    assert tok.bos_id == eos and tok.pad_id == eos  # GPT-2 has no pad token: pad = eos
    ids = tok(ROUND_TRIP + UNSEEN)
    assert ids.shape == (5, 40) and ids[2].tolist() == [eos] * 40
    # Byte-level BPE: everything round-trips, emoji and CJK included.
    assert tok.batch_decode(ids) == ROUND_TRIP + UNSEEN
    tok.save_pretrained(tmp_path / "saved")
    assert torch.equal(TextTokenizer.from_pretrained(tmp_path / "saved")(ROUND_TRIP), ids[:3])
    with pytest.raises(ValueError, match="text_length is required"):
        TextTokenizer.from_pretrained(tmp_path / "gpt2")


def test_hf_t5_style_dir_has_no_bos(tmp_path):
    tok = TextTokenizer.from_pretrained(t5_style_dir(tmp_path / "t5"), text_length=24)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (None, 1, 0, 2)
    ids = tok(ROUND_TRIP)
    assert ids[2].tolist() == [1] + [0] * 23  # the empty caption is EOS then pads
    assert ids[0, 0] not in (0, 1) and tok.batch_decode(ids) == ROUND_TRIP
    tok.save_pretrained(tmp_path / "saved")
    reloaded = TextTokenizer.from_pretrained(tmp_path / "saved")
    assert torch.equal(reloaded(ROUND_TRIP), ids) and reloaded.bos_id is None
