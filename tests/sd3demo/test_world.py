from __future__ import annotations

import random

import numpy as np
import pytest

from sd3demo import world


def test_captions_round_trip() -> None:
    rng = random.Random(0)
    for _ in range(300):
        scene = world.random_scene(rng)
        assert world.parse_caption(scene.caption()) == scene


def test_seed_request_parses_with_defaults() -> None:
    scene = world.parse_caption("a red circle on a blue background")
    assert (scene.colour, scene.shape, scene.background) == ("red", "circle", "blue")
    assert (scene.position, scene.size) == ("center", "medium")
    assert world.parse_caption("A small orange cross at the top left.").background == "white"
    assert world.parse_caption("a white square").background == "black"


@pytest.mark.parametrize("text", ["a red dog", "a red circle on a red background", "two circles", ""])
def test_outside_the_grammar(text: str) -> None:
    with pytest.raises(ValueError):
        world.parse_caption(text)


def test_held_out_triples_never_trained() -> None:
    held = world.held_out_triples()
    assert len(held) == len(world.all_triples()) // 10
    assert ("red", "circle", "blue") not in held
    rng = random.Random(1)
    assert all(world.training_scene(rng).triple not in held for _ in range(2000))
    assert all(s.triple in held for s in world.held_out_scenes(100))
    # Every pair of a held-out triple is still seen in training.
    trained = set(world.all_triples()) - held
    for c, s, b in held:
        assert any(t[:2] == (c, s) for t in trained)
        assert any((t[0], t[2]) == (c, b) for t in trained)
        assert any(t[1:] == (s, b) for t in trained)


def test_render_is_deterministic_and_scale_free() -> None:
    scene = world.Scene("blue", "triangle", "yellow", position="bottom right", size="large")
    a = np.asarray(world.render(scene, 512))
    assert (a == np.asarray(world.render(scene, 512))).all()
    small = np.asarray(world.render(scene, 128)).astype(int)
    down = np.asarray(world.render(scene, 512).resize((128, 128))).astype(int)
    assert (np.abs(small - down).max(-1) > 60).mean() < 0.03
