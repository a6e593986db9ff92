"""The memory plan's arithmetic, pinned to bytes worked out by hand for a small made-up model.

Every number below is computed in the comments from the plan's documented model (engine/memory.py): weights
resident without offload; under model offload one component at a time plus the VAE, which stays resident; under
sequential offload the buffers plus one streamed layer; the sampler's six float32 latent-sized tensors on top of
the transformer's and the VAE's activations; fp8 storage adds a bf16 copy of the largest layer while it runs.
"""

from __future__ import annotations

import math

import pytest
import torch

from sd3serve.engine.memory import (
    FRAGMENTATION,
    MODES,
    RESERVE,
    ComponentBytes,
    MemoryMode,
    MemoryPlan,
    NoModeFits,
    _latent_state,
    tensor_bytes,
)

SIZE, ROWS = 64, 1
# 64 px a side -> 8x8 latents of 16 channels; six float32 tensors: 6 * 16 * 8 * 8 * 4 bytes.
LATENTS = 24_576


def mode(name: str) -> MemoryMode:
    return next(m for m in MODES if m.name == name)


@pytest.fixture
def plan() -> MemoryPlan:
    return MemoryPlan(
        components={
            "text_encoder": ComponentBytes(full=1_000, fp8=1_000, buffers=10, largest_layer=100),
            "text_encoder_2": ComponentBytes(full=2_000, fp8=2_000, buffers=20, largest_layer=200),
            "text_encoder_3": ComponentBytes(full=8_000, fp8=4_500, buffers=30, largest_layer=800),
            "transformer": ComponentBytes(full=20_000, fp8=11_000, buffers=40, largest_layer=1_600),
            "vae": ComponentBytes(full=3_000, fp8=3_000, buffers=50, largest_layer=300),
        },
        text_peak={"text_encoder": 11, "text_encoder_2": 22, "text_encoder_3": 333},
        transformer_peak={(SIZE, ROWS): 5_000},
        vae_peak={(SIZE, ROWS): 7_000},
        prompt_cache=100,
    )


def test_latents_are_six_float32_tensors() -> None:
    assert _latent_state(64, 1) == LATENTS == 6 * 16 * 8 * 8 * 4
    assert _latent_state(128, 2) == 6 * 2 * 16 * 16 * 16 * 4 == 196_608  # rows and area both scale it


def test_tensor_bytes_counts_parameters_and_buffers_at_their_width() -> None:
    layer = torch.nn.Linear(3, 4).to(torch.bfloat16)  # 12 weights + 4 biases, 2 bytes each
    assert tensor_bytes(layer) == 32
    norm = torch.nn.BatchNorm1d(5)  # float32: weight, bias, running mean and var (5 each), an int64 counter
    assert tensor_bytes(norm) == 4 * 5 * 4 + 8


def test_weights_per_mode(plan: MemoryPlan) -> None:
    assert plan.weights(mode("bf16")) == 1_000 + 2_000 + 8_000 + 20_000 + 3_000 == 34_000
    assert plan.weights(mode("t5-fp8")) == 1_000 + 2_000 + 4_500 + 20_000 + 3_000 == 30_500
    assert plan.weights(mode("fp8")) == 1_000 + 2_000 + 4_500 + 11_000 + 3_000 == 21_500
    assert plan.weights(mode("no-t5")) == 1_000 + 2_000 + 20_000 + 3_000 == 26_000


def test_peak_without_offload(plan: MemoryPlan) -> None:
    # bf16: all weights + prompt cache + the largest stage, the VAE's decode (7 000 + latents = 31 576).
    assert plan.peak(mode("bf16"), SIZE, ROWS) == 34_000 + 100 + 7_000 + LATENTS == 65_676
    # fp8: the transformer's stage gains its largest layer's bf16 copy (5 000 + 1 600 + latents = 31 176), still
    # under the VAE's 31 576.
    assert plan.peak(mode("fp8"), SIZE, ROWS) == 21_500 + 100 + 7_000 + LATENTS == 53_176


def test_the_fp8_cast_copy_counts_when_it_decides_the_peak() -> None:
    plan = MemoryPlan(
        components={
            "text_encoder": ComponentBytes(full=10, fp8=10, buffers=0, largest_layer=1),
            "text_encoder_2": ComponentBytes(full=10, fp8=10, buffers=0, largest_layer=1),
            "transformer": ComponentBytes(full=4_000, fp8=2_000, buffers=0, largest_layer=900),
            "vae": ComponentBytes(full=10, fp8=10, buffers=0, largest_layer=1),
        },
        text_peak={"text_encoder": 1, "text_encoder_2": 1},
        transformer_peak={(SIZE, ROWS): 500},
        vae_peak={(SIZE, ROWS): 400},
        prompt_cache=0,
    )
    # fp8 without T5: weights 10 + 10 + 2 000 + 10; the transformer's stage 500 + 900 (cast) + latents.
    assert plan.peak(mode("fp8-no-t5"), SIZE, ROWS) == 2_030 + 500 + 900 + LATENTS
    # bf16 without T5: no cast copy.
    assert plan.peak(mode("no-t5"), SIZE, ROWS) == 4_030 + 500 + LATENTS


def test_model_offload_keeps_the_vae_resident(plan: MemoryPlan) -> None:
    # One component at a time: the largest is the transformer, 20 000 weights + 5 000 + latents = 49 576; the VAE
    # (3 000) stays on the GPU beside it; plus the prompt cache.
    assert plan.peak(mode("offload"), SIZE, ROWS) == 100 + 3_000 + 20_000 + 5_000 + LATENTS == 52_676
    # fp8: the transformer is 11 000 and runs with its 1 600 cast copy (37 176); the VAE's own stage, 3 000 + 7 000
    # + latents = 34 576, is smaller.
    assert plan.peak(mode("fp8-offload"), SIZE, ROWS) == 100 + 3_000 + 11_000 + 5_000 + 1_600 + LATENTS == 45_276


def test_sequential_offload_streams_one_layer(plan: MemoryPlan) -> None:
    # Buffers of all five (150) + the largest layer streamed (1 600) + the largest stage (the VAE's, 31 576).
    assert plan.peak(mode("fp8-sequential"), SIZE, ROWS) == 100 + 150 + 1_600 + 7_000 + LATENTS == 33_426
    # Without T5: its buffers (30) are not there.
    assert plan.peak(mode("fp8-sequential-no-t5"), SIZE, ROWS) == 100 + 120 + 1_600 + 7_000 + LATENTS


def test_need_adds_fragmentation_and_the_reserve(plan: MemoryPlan) -> None:
    assert FRAGMENTATION == 1.10 and RESERVE == 2**29
    assert plan.need(mode("bf16"), SIZE, ROWS) == math.ceil(1.1 * 65_676) + 2**29 == 72_244 + 536_870_912


def test_choose_at_the_budget_edge(plan: MemoryPlan) -> None:
    bf16 = plan.need(mode("bf16"), SIZE, ROWS)
    assert plan.choose(bf16, size=SIZE, rows=ROWS)[0].name == "bf16"  # exactly the need fits
    assert plan.choose(bf16 - 1, size=SIZE, rows=ROWS)[0].name == "t5-fp8"  # one byte less: the next mode
    smallest = min(plan.need(m, SIZE, ROWS) for m in plan.candidates(with_t5=True, allow_offload=True))
    assert plan.choose(smallest, size=SIZE, rows=ROWS)[0].name == "fp8-sequential"
    with pytest.raises(NoModeFits, match="pass --no-t5"):
        plan.choose(smallest - 1, size=SIZE, rows=ROWS)
    # Without offload (not CUDA) the offload modes are not candidates.
    with pytest.raises(NoModeFits, match="offload needs CUDA"):
        plan.choose(plan.need(mode("fp8"), SIZE, ROWS) - 1, size=SIZE, rows=ROWS, allow_offload=False)
