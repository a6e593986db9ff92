"""A seed is pinned to its noise: the values a user gets for a seed must never change between releases."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers.jobs import make_job
from sd3serve.engine import samplers
from sd3serve.engine.loading import LoadedModel
from sd3serve.engine.noise import BatchNoise
from sd3serve.engine.pipeline import SD3Pipeline

# torch.randn(4, generator=torch.Generator().manual_seed(s)) on the CPU (torch 2.13), written out.
FIRST_DRAWS = {
    1234: [0.04613046, 0.40240282, -1.01152909, 0.21673824],
    1235: [-0.69997138, 1.91544890, 0.06576599, 0.44753188],
}
# A draw of 16 values or more takes torch's vectorised path: other values, the same for any such shape.
LATENT_FIRST_DRAWS_1234 = [-0.11171857, -0.49659011, 0.16307370, -0.88168776]
JOB = make_job(seed=1234, height=96, batch_size=2)  # fmt: skip


def test_seed_1234_gives_these_first_values() -> None:
    noise = BatchNoise([1234])
    first = noise(torch.empty(1, 4))
    torch.testing.assert_close(first, torch.tensor([FIRST_DRAWS[1234]]), rtol=0, atol=1e-7)
    assert not torch.equal(noise(torch.empty(1, 4)), first)  # the stream goes on, it does not restart


def test_a_latent_sized_draw_for_seed_1234_starts_with_these_values() -> None:
    latent = BatchNoise([1234])(torch.empty(1, 16, 12, 8))
    torch.testing.assert_close(latent[0].flatten()[:4], torch.tensor(LATENT_FIRST_DRAWS_1234), rtol=0, atol=1e-7)


def test_a_float64_latent_gets_the_float32_draw() -> None:
    """Noise is drawn in float32 whatever the latent's dtype (float64 draws are other numbers), then cast."""
    latent = BatchNoise([1234])(torch.empty(1, 16, 12, 8, dtype=torch.float64))
    assert latent.dtype == torch.float64
    expected = torch.tensor(LATENT_FIRST_DRAWS_1234, dtype=torch.float64)
    torch.testing.assert_close(latent[0].flatten()[:4], expected, rtol=0, atol=1e-7)


def test_each_image_of_a_batch_draws_from_its_own_seed() -> None:
    batch = BatchNoise([1234, 1235])(torch.empty(2, 4, dtype=torch.float64))
    torch.testing.assert_close(batch, torch.tensor([FIRST_DRAWS[1234], FIRST_DRAWS[1235]], dtype=torch.float64),
                               rtol=0, atol=1e-7)  # fmt: skip
    assert batch.dtype == torch.float64  # drawn in float32 on the CPU, then cast: the same values in any dtype


def test_noise_for_another_batch_size_is_refused() -> None:
    with pytest.raises(ValueError, match="2 seeds"):
        BatchNoise([1, 2])(torch.empty(3, 4))


def test_pipeline_start_noise_is_the_seeds_generator(tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sampler starts from x = σ_0 · randn(latent shape, Generator().manual_seed(seed + i)) for image i."""
    seen: dict[str, torch.Tensor] = {}

    def capture(model: object, x: torch.Tensor, sigmas: torch.Tensor, **_: object) -> torch.Tensor:
        seen["x"], seen["sigmas"] = x.clone(), sigmas.clone()
        return x

    monkeypatch.setitem(samplers.SAMPLERS, "euler", capture)
    SD3Pipeline(tiny_model)(JOB)
    channels, f = tiny_model.pipe.transformer.config.in_channels, tiny_model.vae_scale_factor
    shape = (channels, JOB.height // f, JOB.width // f)
    assert seen["x"].shape == (2, *shape)
    assert float(seen["sigmas"][0]) == 1.0  # "simple" starts at σ = 1: x is the noise itself
    for i in range(2):
        expected = torch.randn(shape, generator=torch.Generator().manual_seed(JOB.seed + i))
        torch.testing.assert_close(seen["x"][i], expected, rtol=0, atol=0)
    torch.testing.assert_close(seen["x"][0].flatten()[:4], torch.tensor(LATENT_FIRST_DRAWS_1234), rtol=0, atol=1e-7)


def test_pipeline_start_noise_of_a_later_image_equals_its_own_request(
    tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    starts: list[torch.Tensor] = []

    def capture(model: object, x: torch.Tensor, sigmas: torch.Tensor, **_: object) -> torch.Tensor:
        starts.append(x.clone())
        return x

    monkeypatch.setitem(samplers.SAMPLERS, "euler", capture)
    pipe = SD3Pipeline(tiny_model)
    pipe(JOB)
    pipe(dataclasses.replace(JOB, seed=JOB.seed + 1, batch_size=1))
    torch.testing.assert_close(starts[0][1], starts[1][0], rtol=0, atol=0)
