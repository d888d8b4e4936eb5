"""Reranking: the image-caption scorer, the prior's code likelihood, candidate choice in the
pipeline, and its serialisation. Tiny random components, no training: seconds."""

from __future__ import annotations

import json

import pytest
import torch
from test_pipeline import CAPTIONS, PROMPTS, seeded, tiny_prior, tiny_vqgan

from pipelines import CandidateSet, ImageTextScorer, ScorerConfig, TextToImagePipeline
from pipelines.candidates import row_generators
from pipelines.scorer import contrastive_loss
from prior import TextTokenizer, code_log_likelihood


@pytest.fixture(scope="module")
def text_tokenizer() -> TextTokenizer:
    return TextTokenizer.train(CAPTIONS, vocab_size=48, text_length=40, byte_fallback=False)


def tiny_scorer(text_tokenizer: TextTokenizer, **overrides) -> ImageTextScorer:
    values = dict(
        text_vocab_size=text_tokenizer.vocab_size,
        text_pad_id=text_tokenizer.pad_id,
        channels=(4, 8),
        pooled_grid=2,
        embed_dim=8,
    )
    return ImageTextScorer(ScorerConfig(**{**values, **overrides}))


@pytest.fixture(scope="module")
def components(text_tokenizer):
    torch.manual_seed(0)
    return tiny_vqgan(), tiny_prior(text_tokenizer), text_tokenizer, tiny_scorer(text_tokenizer)


@pytest.fixture
def pipeline(components) -> TextToImagePipeline:
    image_tokenizer, prior, text_tokenizer, scorer = components
    return TextToImagePipeline(image_tokenizer, prior, text_tokenizer, scorer=scorer)


# ---------------------------------------------------------------------------------- scorer
def test_scorer_embeddings_are_unit_vectors_and_logits_are_scaled_cosines(components):
    scorer, text_tokenizer = components[3], components[2]
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    text = text_tokenizer(CAPTIONS[:3])
    image_embeds, text_embeds = scorer.encode_images(images), scorer.encode_text(text)
    assert image_embeds.shape == text_embeds.shape == (3, 8)
    torch.testing.assert_close(image_embeds.norm(dim=-1), torch.ones(3))
    logits = scorer(images, text)  # (3, 3)
    cosines = image_embeds @ text_embeds.T
    torch.testing.assert_close(logits, scorer.logit_scale.exp() * cosines)
    torch.testing.assert_close(scorer.similarity(images, text), cosines.diagonal())


def test_scorer_text_is_a_bag_of_words_without_pads(components):
    scorer, text_tokenizer = components[3], components[2]
    ids = text_tokenizer(CAPTIONS[:1])  # (1, T): BOS, words, EOS, pads
    words = ids[0][ids[0] != text_tokenizer.pad_id]
    shuffled = torch.full_like(ids, text_tokenizer.pad_id)
    shuffled[0, -len(words) :] = words.flip(0)  # reversed and moved to the end of the row
    torch.testing.assert_close(scorer.encode_text(shuffled), scorer.encode_text(ids))
    other = text_tokenizer(CAPTIONS[1:2])
    assert not torch.allclose(scorer.encode_text(other), scorer.encode_text(ids))


def test_scorer_sees_where_things_are(components):
    """The pool keeps a grid, so moving the same content changes the image embedding."""
    scorer = components[3]
    left = -torch.ones(1, 3, 16, 16)
    left[..., 2:6, 2:6] = 1.0
    right = left.flip(-1)
    assert not torch.allclose(scorer.encode_images(left), scorer.encode_images(right), atol=1e-4)


def test_scorer_save_load_round_trip(components, tmp_path):
    scorer, text_tokenizer = components[3], components[2]
    scorer.save_pretrained(tmp_path / "scorer")
    loaded = ImageTextScorer.from_pretrained(tmp_path / "scorer")
    assert loaded.config == scorer.config
    images, text = torch.rand(2, 3, 16, 16) * 2 - 1, text_tokenizer(PROMPTS)
    torch.testing.assert_close(loaded(images, text), scorer(images, text), rtol=0, atol=0)
    assert json.loads((tmp_path / "scorer" / "config.json").read_text())["channels"] == [4, 8]


@pytest.mark.parametrize(
    "field, value",
    [
        ("embed_dim", 0),
        ("channels", ()),
        ("text_pad_id", 48),
        ("text_pad_id", 1.5),
        ("pooled_grid", 1.5),
    ],
)
def test_scorer_config_rejects_bad_values(text_tokenizer, field, value):
    with pytest.raises(ValueError, match=field):
        tiny_scorer(text_tokenizer, **{field: value})


def test_scorer_rejects_ids_outside_its_vocabulary(components):
    scorer = components[3]
    with pytest.raises(ValueError, match="text_vocab_size"):
        scorer.encode_text(torch.full((1, 4), 48, dtype=torch.long))


def test_contrastive_loss_is_log_b_at_chance_and_ignores_duplicate_captions():
    text = torch.tensor([[5, 6], [5, 6], [7, 8], [9, 9]])  # rows 0 and 1 are one caption
    loss = contrastive_loss(torch.zeros(4, 4), text)
    # Rows 0 and 1 choose among 3 entries (the duplicate is masked), rows 2 and 3 among 4.
    expected = (2 * torch.log(torch.tensor(3.0)) + 2 * torch.log(torch.tensor(4.0))) / 4
    torch.testing.assert_close(loss, expected)
    logits = torch.randn(4, 4)
    changed = logits.clone()
    changed[0, 1], changed[1, 0] = 50.0, -50.0  # a duplicate's entries carry no gradient signal
    torch.testing.assert_close(contrastive_loss(changed, text), contrastive_loss(logits, text))


# ---------------------------------------------------------------------------------- likelihood
def test_code_log_likelihood_matches_the_training_loss(components):
    prior, text_tokenizer = components[1], components[2]
    prior.eval()
    text = text_tokenizer(CAPTIONS)  # (4, T)
    codes = torch.randint(0, 32, (4, 4, 4), generator=seeded(0))
    summed = code_log_likelihood(prior, text, codes)  # (4,)
    assert summed.shape == (4,) and bool((summed <= 0).all())
    for row in range(4):
        loss = prior(text[row : row + 1], codes[row : row + 1]).image_loss
        torch.testing.assert_close(summed[row], -loss * 16)


# ---------------------------------------------------------------------------------- candidates
def test_candidate_set_picks_the_best_combined_score():
    codes = torch.arange(2 * 3).reshape(2, 3, 1, 1)
    similarity = torch.tensor([[0.1, 0.5, 0.2], [0.3, 0.3, 0.0]])
    log_likelihood = torch.tensor([[-1.0, -9.0, -2.0], [-5.0, -4.0, -1.0]])
    candidates = CandidateSet(codes, similarity, log_likelihood)
    assert candidates.best(0.0).tolist() == [1, 0]  # ties keep the earliest
    assert candidates.best(1.0).tolist() == [0, 2]
    assert candidates.best_codes(1.0).flatten().tolist() == [0, 5]
    alone = CandidateSet(codes, None, log_likelihood)
    assert alone.best(0.5).tolist() == [0, 2]


def test_row_generators_fan_out_and_keep_the_one_candidate_behaviour():
    per_image = [seeded(index) for index in range(4)]
    assert row_generators(per_image, 2, 2) == per_image  # used as they are
    rows = row_generators([seeded(0), seeded(1)], 2, 2, num_candidates=3)
    assert len(rows) == 12
    again = row_generators([seeded(0), seeded(1)], 2, 2, num_candidates=3)
    assert [g.initial_seed() for g in rows] == [g.initial_seed() for g in again]
    with pytest.raises(ValueError, match="one per prompt"):
        row_generators([seeded(0)] * 3, 2, 2)


# ---------------------------------------------------------------------------------- pipeline
def test_one_candidate_is_the_plain_pipeline(pipeline, components):
    plain = TextToImagePipeline(*components[:3])
    options = dict(output_type="pt", show_progress=False)
    reranker = pipeline(PROMPTS, generator=seeded(3), **options).images
    torch.testing.assert_close(reranker, plain(PROMPTS, generator=seeded(3), **options).images)


@pytest.mark.parametrize("weight", [0.0, 0.05])
def test_call_returns_the_best_of_its_candidates(pipeline, weight):
    options = dict(num_images_per_prompt=2, show_progress=False)
    candidates = pipeline.sample_candidates(PROMPTS, 5, generator=seeded(4), **options)
    assert candidates.codes.shape == (4, 5, 4, 4)
    assert candidates.similarity.shape == candidates.log_likelihood.shape == (4, 5)
    output = pipeline(
        PROMPTS,
        num_candidates=5,
        likelihood_weight=weight,
        generator=seeded(4),
        output_type="pt",
        **options,
    )
    torch.testing.assert_close(output.codes, candidates.best_codes(weight))
    # The scores are those of the decoded candidates, recomputed here one at a time.
    text = pipeline.text_tokenizer(PROMPTS).repeat_interleave(2, dim=0)  # (4, T)
    with torch.inference_mode():
        for image in range(4):
            codes = candidates.codes[image]  # (5, h, w)
            rows = text[image : image + 1].expand(5, -1)
            cosine = pipeline.scorer.similarity(pipeline.image_tokenizer.decode(codes), rows)
            torch.testing.assert_close(candidates.similarity[image], cosine, atol=1e-5, rtol=1e-5)
            likelihood = code_log_likelihood(pipeline.prior, rows, codes)
            torch.testing.assert_close(candidates.log_likelihood[image], likelihood)
        decoded = (pipeline.image_tokenizer.decode(output.codes).clamp(-1, 1) + 1) / 2
    torch.testing.assert_close(output.images, decoded, atol=1 / 255, rtol=0)


@pytest.mark.parametrize("max_batch_size", [1, 7])
def test_reranked_image_depends_only_on_its_generator(pipeline, max_batch_size):
    def first_image(prompts, generators):
        return pipeline(
            prompts,
            num_candidates=3,
            generator=generators,
            max_batch_size=max_batch_size,
            show_progress=False,
        ).codes[0]

    alone = first_image(PROMPTS[:1], [seeded(11)])
    with_another = first_image(PROMPTS, [seeded(11), seeded(12)])
    torch.testing.assert_close(alone, with_another, rtol=0, atol=0)


def test_likelihood_alone_ranks_without_a_scorer(components):
    plain = TextToImagePipeline(*components[:3])
    with pytest.raises(ValueError, match="no scorer"):
        plain(PROMPTS, num_candidates=2, show_progress=False)
    candidates = plain.sample_candidates(PROMPTS, 4, generator=seeded(5), show_progress=False)
    assert candidates.similarity is None
    output = plain(
        PROMPTS, num_candidates=4, likelihood_weight=1.0, generator=seeded(5), show_progress=False
    )
    best = candidates.log_likelihood.argmax(dim=1)
    torch.testing.assert_close(output.codes, candidates.codes[torch.arange(2), best])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_candidates": 0}, "num_candidates"),
        ({"num_candidates": 2.0}, "num_candidates"),
        ({"likelihood_weight": -1.0}, "likelihood_weight"),
        ({"likelihood_weight": float("nan")}, "likelihood_weight"),
    ],
)
def test_bad_rerank_arguments_raise_value_error(pipeline, kwargs, name):
    with pytest.raises(ValueError, match=name):
        pipeline(PROMPTS, show_progress=False, **kwargs)


def test_candidates_without_a_way_to_choose_are_refused_at_construction(components):
    with pytest.raises(ValueError, match="num_candidates=4 with likelihood_weight=0"):
        TextToImagePipeline(*components[:3], config=dict(resolution=16, num_candidates=4))
    config = dict(resolution=16, num_candidates=4, likelihood_weight=0.1)
    assert TextToImagePipeline(*components[:3], config=config).config.num_candidates == 4


def test_scorer_of_another_text_tokenizer_is_refused(components):
    image_tokenizer, prior, text_tokenizer, _ = components
    other = tiny_scorer(text_tokenizer, text_pad_id=text_tokenizer.pad_id + 1)
    with pytest.raises(ValueError, match="scorer mismatch"):
        TextToImagePipeline(image_tokenizer, prior, text_tokenizer, scorer=other)
    small = tiny_scorer(text_tokenizer, text_vocab_size=8)
    with pytest.raises(ValueError, match="scorer mismatch"):
        TextToImagePipeline(image_tokenizer, prior, text_tokenizer, scorer=small)
    with pytest.raises(ValueError, match="not an image-caption scorer"):
        TextToImagePipeline(image_tokenizer, prior, text_tokenizer, scorer=prior)


def test_save_load_keeps_the_scorer_and_the_rerank_defaults(components, tmp_path):
    scorer = components[3]
    config = dict(resolution=16, num_candidates=3, likelihood_weight=0.02)
    pipeline = TextToImagePipeline(*components[:3], config=config, scorer=scorer)
    pipeline.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["scorer"] == ["pipelines", "ImageTextScorer"]
    loaded = TextToImagePipeline.from_pretrained(tmp_path / "pipe")
    assert loaded.config.num_candidates == 3 and loaded.config.likelihood_weight == 0.02
    first = loaded(PROMPTS, generator=seeded(6), show_progress=False).codes
    torch.testing.assert_close(
        first, pipeline(PROMPTS, generator=seeded(6), show_progress=False).codes
    )


def test_a_pipeline_without_scorer_saves_null_and_old_folders_load(components, tmp_path):
    plain = TextToImagePipeline(*components[:3])
    plain.save_pretrained(tmp_path / "pipe")
    path = tmp_path / "pipe" / "model_index.json"
    index = json.loads(path.read_text())
    assert index["scorer"] == [None, None] and not (tmp_path / "pipe" / "scorer").exists()
    assert TextToImagePipeline.from_pretrained(tmp_path / "pipe").scorer is None
    del index["scorer"]  # a folder written before the scorer existed
    path.write_text(json.dumps(index))
    assert TextToImagePipeline.from_pretrained(tmp_path / "pipe").scorer is None
    config = tmp_path / "pipe" / "pipeline_config.json"
    values = json.loads(config.read_text())
    config.write_text(json.dumps({k: v for k, v in values.items() if k != "num_candidates"}))
    loaded = TextToImagePipeline.from_pretrained(tmp_path / "pipe", scorer=components[3])
    assert loaded.scorer is components[3] and loaded.config.num_candidates == 1
