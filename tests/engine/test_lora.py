"""LoRA adapters in the engine: the formats, the per-batch hooks, the LRU cache and batching by adapter set."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from helpers.engines import started
from helpers.jobs import make_job
from lora_files import RANK, peft_file, random_layers
from sd3serve.engine.batching import BatchingEngine
from sd3serve.engine.job import GenerationJob
from sd3serve.engine.loading import LoadedModel
from sd3serve.engine.lora import LoraFormatError, LoraLibrary, linear_modules, parse_state_dict
from sd3serve.engine.lora_names import check_adapters
from sd3serve.engine.pipeline import SD3Pipeline
from sd3serve.errors import InvalidRequest
from sd3serve.settings import Settings

JOB = make_job(steps=2)  # fmt: skip
def kohya_file(path: Path, layers: dict[str, tuple[torch.Tensor, torch.Tensor]], *, alpha: float) -> Path:
    """Kohya's naming; the up matrix scaled so that alpha / rank cancels out."""
    state = {}
    for name, (down, up) in layers.items():
        key = "lora_transformer_" + name.replace(".", "_")
        state[f"{key}.lora_down.weight"] = down.clone()
        state[f"{key}.lora_up.weight"] = (up * RANK / alpha).contiguous()
        state[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(state, str(path))
    return path


def mmdit_file(path: Path, layers: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Path:
    """SD3 trainers' MMDiT naming: one fused qkv (its down shared by q, k and v) and attn proj."""
    q, k, v = (layers[f"transformer_blocks.0.attn.to_{x}"] for x in "qkv")
    down = q[0]
    state = {
        "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": down.contiguous(),
        "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.cat([q[1], k[1], v[1]]).contiguous(),
        "lora_unet_joint_blocks_0_x_block_attn_proj.lora_down.weight": layers["transformer_blocks.0.attn.to_out.0"][0],
        "lora_unet_joint_blocks_0_x_block_attn_proj.lora_up.weight": layers["transformer_blocks.0.attn.to_out.0"][1],
    }
    save_file(state, str(path))
    return path


def pixels(pipe: SD3Pipeline, job: GenerationJob) -> np.ndarray:
    return np.asarray(pipe(job).images[0])


@pytest.fixture
def lora_dir(tmp_path: Path, tiny_model: LoadedModel) -> Path:
    peft_file(tmp_path / "alpha.safetensors", random_layers(tiny_model, 1))
    peft_file(tmp_path / "beta.safetensors", random_layers(tiny_model, 2))
    return tmp_path


def pipeline(model: LoadedModel, lora_dir: Path, budget: int = 2**30) -> SD3Pipeline:
    return SD3Pipeline(model, loras=LoraLibrary(lora_dir, budget))


def test_an_adapter_acts_only_on_its_own_thread(tiny_model: LoadedModel, lora_dir: Path) -> None:
    """Model workers share the weights: a batch on another thread, run while an adapter is applied here, computes
    without it."""
    import threading

    from sd3serve.engine.lora import applied

    pipe = pipeline(tiny_model, lora_dir)
    base = pixels(pipe, JOB)
    seen: list[np.ndarray] = []
    with applied(tiny_model.pipe.transformer, pipe.loras, (("alpha", 1.0),)):
        other = threading.Thread(target=lambda: seen.append(pixels(pipe, JOB)))
        other.start()
        other.join()
    assert len(seen) == 1 and np.array_equal(seen[0], base)
    assert not np.array_equal(pixels(pipe, dataclasses.replace(JOB, loras=(("alpha", 1.0),))), base)


def test_an_adapter_changes_the_picture_and_leaves_no_trace(tiny_model: LoadedModel, lora_dir: Path) -> None:
    pipe = pipeline(tiny_model, lora_dir)
    base = pixels(pipe, JOB)
    weights = {n: p.clone() for n, p in tiny_model.pipe.transformer.state_dict().items()}
    adapted = pixels(pipe, dataclasses.replace(JOB, loras=(("alpha", 1.0),)))
    assert not np.array_equal(base, adapted)
    assert np.array_equal(pixels(pipe, JOB), base)  # nothing leaks into a request without it
    for name, p in tiny_model.pipe.transformer.state_dict().items():
        assert torch.equal(p, weights[name])  # the shared weights were never written
    zero = pixels(pipe, dataclasses.replace(JOB, loras=(("alpha", 0.0),)))
    assert np.array_equal(zero, base)
    both = pixels(pipe, dataclasses.replace(JOB, loras=(("alpha", 1.0), ("beta", 0.5))))
    assert not np.array_equal(both, adapted)


def test_the_formats_give_the_same_picture(tiny_model: LoadedModel, tmp_path: Path) -> None:
    layers = random_layers(tiny_model, 3)
    q = layers["transformer_blocks.0.attn.to_q"][0]
    for name in ("to_k", "to_v"):  # the MMDiT file shares one down matrix for q, k and v
        layers[f"transformer_blocks.0.attn.{name}"] = (q, layers[f"transformer_blocks.0.attn.{name}"][1])
    peft_file(tmp_path / "peft.safetensors", layers)
    kohya_file(tmp_path / "kohya.safetensors", layers, alpha=1.0)
    mmdit_file(tmp_path / "mmdit.safetensors", layers)
    pipe = pipeline(tiny_model, tmp_path)
    peft = pixels(pipe, dataclasses.replace(JOB, loras=(("peft", 0.7),)))
    for other in ("kohya", "mmdit"):
        got = pixels(pipe, dataclasses.replace(JOB, loras=((other, 0.7),)))
        assert np.abs(got.astype(int) - peft.astype(int)).max() <= 1, other  # alpha's float rounding at most


def test_the_lru_evicts_and_reloads_without_changing_pictures(tiny_model: LoadedModel, lora_dir: Path) -> None:
    one = LoraLibrary(lora_dir, 2**30).get("alpha", set(linear_modules(tiny_model.pipe.transformer))).nbytes
    pipe = pipeline(tiny_model, lora_dir, budget=one + one // 2)  # room for one adapter
    a = dataclasses.replace(JOB, loras=(("alpha", 1.0),))
    b = dataclasses.replace(JOB, loras=(("beta", 1.0),))
    first = pixels(pipe, a)
    assert pipe.loras.cached == ["alpha"]
    pixels(pipe, b)
    assert pipe.loras.cached == ["beta"] and pipe.loras.evictions == 1
    again = pixels(pipe, a)
    assert pipe.loras.loads == 3 and pipe.loras.nbytes <= one + one // 2
    assert np.array_equal(first, again)
    pixels(pipe, a)
    assert pipe.loras.loads == 3  # a hit


def test_an_unknown_adapter_is_a_400_listing_the_names(lora_dir: Path) -> None:
    with pytest.raises(InvalidRequest, match=r"unknown adapter 'gamma'.*alpha, beta"):
        check_adapters(lora_dir, ["alpha", "gamma"])
    with pytest.raises(InvalidRequest, match="--lora-dir"):
        check_adapters(None, ["alpha"])
    check_adapters(lora_dir, ["beta"])


def test_a_file_that_does_not_fit_the_model_is_refused(tiny_model: LoadedModel) -> None:
    modules = set(linear_modules(tiny_model.pipe.transformer))
    with pytest.raises(LoraFormatError, match="no layer"):
        parse_state_dict("x", {"transformer.nowhere.lora_A.weight": torch.zeros(1, 2),
                               "transformer.nowhere.lora_B.weight": torch.zeros(2, 1)}, modules)  # fmt: skip
    with pytest.raises(LoraFormatError, match="unrecognised key"):
        parse_state_dict("x", {"something.else": torch.zeros(1)}, modules)
    with pytest.raises(LoraFormatError, match="lacks"):
        parse_state_dict("x", {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(1, 2)}, modules)


def test_requests_are_batched_only_with_the_same_adapter_set(tiny_model: LoadedModel, lora_dir: Path) -> None:
    jobs = [
        dataclasses.replace(JOB, loras=(("alpha", 1.0),)),
        dataclasses.replace(JOB, seed=6, loras=(("alpha", 1.0),)),  # shares the first's batch
        dataclasses.replace(JOB, seed=7, loras=(("beta", 1.0),)),
        dataclasses.replace(JOB, seed=8),
        dataclasses.replace(JOB, seed=9, loras=(("alpha", 0.5),)),
    ]
    sizes: list[int] = []

    async def batched() -> list[object]:
        settings = Settings(device="cpu", batch_wait_ms=300, max_batch_images=8, lora_dir=lora_dir)
        async with started(BatchingEngine(settings, tiny_model, on_batch=lambda n, s: sizes.append(n))) as engine:
            return list(await asyncio.gather(*(engine.generate(j, request_id=f"r{i}") for i, j in enumerate(jobs))))

    results = asyncio.run(batched())
    assert sorted(sizes) == [1, 1, 1, 2]  # one batch per adapter set (and none without)
    alone = pipeline(tiny_model, lora_dir)
    for job, result in zip(jobs, results, strict=True):
        assert np.array_equal(np.asarray(result.images[0]), pixels(alone, job))  # type: ignore[attr-defined]
