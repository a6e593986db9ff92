from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from helpers.jobs import make_job
from sd3demo import world
from sd3demo.train import Schedule, build_tokenizers, train

DEMO = Path(__file__).resolve().parents[2] / "src" / "sd3serve" / "models" / "demo"
# The schedule of a few steps the tests train with: seconds, not minutes.
TINY = Schedule(
    vae_steps=2, pool={256: 4, 512: 2}, text_steps=2, text_batch=4, steps=3, mix={256: (0.7, 2), 512: (0.3, 1)},
    warmup=1,
)  # fmt: skip


def test_every_vocabulary_word_is_one_token() -> None:
    clip, t5 = build_tokenizers()
    for word in world.VOCABULARY:
        assert clip.tokenize(word) == [word + "</w>"]
        assert t5.tokenize(word) == ["▁" + word]
    assert clip.tokenize("zebra") != []  # any text still tokenizes, by characters


def test_a_few_training_steps_write_a_loadable_model(tmp_path: Path) -> None:
    from sd3serve.engine.loading import load_model
    from sd3serve.engine.pipeline import SD3Pipeline
    from sd3serve.settings import Settings

    out = tmp_path / "demo"
    before = torch.get_num_threads()
    try:
        times = train(out, sched=TINY, seed=3)
    finally:
        torch.set_num_threads(before)
    assert times["total"] > 0
    info = json.loads((out / "training.json").read_text())
    assert info["schedule"]["steps"] == 3
    model = load_model(Settings(model=out, device="cpu"))
    assert model.vae_scale_factor == 16
    job = make_job(prompt="a red circle on a blue background", steps=2, seed=0, width=96)
    result = SD3Pipeline(model)(job)
    assert result.images[0].size == (96, 64)


def test_text_encoders_learn_the_attributes_and_end_frozen() -> None:
    from sd3demo.train import DemoConfig, build_components, pretrain_text_encoders

    torch.manual_seed(0)
    comps = build_components(DemoConfig(seed=1))
    before = torch.get_num_threads()
    try:
        report = pretrain_text_encoders(comps, Schedule(text_steps=60, text_batch=32, text_lr=3e-3), random.Random(0))
    finally:
        torch.set_num_threads(before)
    # Chance is 1/3 to 1/9 per attribute; 60 small steps already name most of them, on captions of any triple.
    assert report["attribute_accuracy"] > 0.5
    encoders = (comps.text_encoder, comps.text_encoder_2, comps.text_encoder_3)
    assert not any(p.requires_grad for m in encoders for p in m.parameters())


def test_jointly_trained_text_encoders_and_object_weight(tmp_path: Path) -> None:
    """The two training options the shipped model does not use still train and save a loadable model."""
    from sd3serve.engine.loading import load_model
    from sd3serve.settings import Settings

    sched = Schedule(
        vae_steps=2, pool={256: 4}, text_steps=2, text_batch=4, steps=3, mix={256: (1.0, 2)}, warmup=1,
        object_weight=4.0, train_text_encoders=True,
    )  # fmt: skip
    before = torch.get_num_threads()
    try:
        train(tmp_path / "demo", sched=sched, seed=3)
    finally:
        torch.set_num_threads(before)
    assert load_model(Settings(model=tmp_path / "demo", device="cpu")).vae_scale_factor == 16


def test_schedule_scales_with_minutes() -> None:
    small, full = Schedule.for_minutes(5), Schedule.for_minutes(50)
    assert small.steps < full.steps and small.vae_steps < full.vae_steps
    assert full == Schedule()


def test_a_rerun_writes_the_same_weights(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    try:
        for run in ("a", "b"):
            train(tmp_path / run, sched=TINY, seed=3, threads=1)
    finally:
        torch.set_num_threads(before)
    weights = sorted(f.relative_to(tmp_path / "a") for f in (tmp_path / "a").rglob("*.safetensors"))
    assert len(weights) == 5
    for f in weights:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_shipped_tokenizers_are_the_trainers() -> None:
    from transformers import CLIPTokenizer, T5TokenizerFast

    if not (DEMO / "model_index.json").exists():
        pytest.skip("no trained demo model in the package")
    clip, t5 = build_tokenizers()
    shipped = [CLIPTokenizer.from_pretrained(DEMO / d) for d in ("tokenizer", "tokenizer_2")]
    shipped_t5 = T5TokenizerFast.from_pretrained(DEMO / "tokenizer_3")
    rng = random.Random(0)
    texts = [world.random_scene(rng).caption() for _ in range(300)] + ["a zebra", "Read the REDNESS!", ""]
    for text in texts:
        for tok in shipped:
            assert tok(text).input_ids == clip(text).input_ids, text
        assert shipped_t5(text).input_ids == t5(text).input_ids, text
    assert [tok.get_vocab() for tok in shipped] == [clip.get_vocab()] * 2
    assert shipped_t5.get_vocab() == t5.get_vocab()
    assert [tok.model_max_length for tok in shipped] == [clip.model_max_length] * 2
    assert shipped_t5.model_max_length == t5.model_max_length
