"""The memory plan for SD3.5 Large Turbo's published configs, the automatic choice of a mode, fp8 weight storage.

fp8 tolerance: the demo model (trained weights) at 256², 4 steps, bf16 compute on the CPU. float8_e4m3fn keeps 3
mantissa bits, so each weight moves by up to 1/16 of itself (about 3 % RMS); through 4 steps the picture moved by
PSNR 37 dB against bf16 (mean |difference| 0.8 of 255) when this was written. 30 dB (an RMS error of 8 of 255:
no visible change of shape, colour or position) leaves room for other kernels and thread counts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.jobs import make_job
from sd3serve.engine.loading import ModelLoadError, load_model
from sd3serve.engine.memory import MODES, GiB, MemoryPlan, NoModeFits, memory_plan
from sd3serve.engine.pipeline import build_pipeline
from sd3serve.settings import Settings
from sd35_large import write_configs


@pytest.fixture(scope="module")
def sd35_plan(tmp_path_factory: pytest.TempPathFactory) -> MemoryPlan:
    """SD3.5 Large Turbo's published configs (bench/sd35_large.py cites them), as config files only."""
    return memory_plan(write_configs(tmp_path_factory.mktemp("sd35") / "sd3.5-large-turbo"))


def mode(name: str) -> object:
    return next(m for m in MODES if m.name == name)


def test_weights_of_sd35_large_turbo(sd35_plan: MemoryPlan) -> None:
    c = sd35_plan.components
    # 8.1 B transformer parameters (published: "8.1 billion"), 4.8 B in T5-XXL's encoder, bf16 = 2 bytes each.
    assert 8.0e9 < c["transformer"].full / 2 < 8.2e9
    assert 4.7e9 < c["text_encoder_3"].full / 2 < 4.8e9
    # fp8 storage halves the transformer (all but the positional embedding and the input/output projections) and
    # T5 (all but its token embedding, kept in bf16: see acceleration.FP8_SKIP).
    assert c["transformer"].fp8 <= 0.51 * c["transformer"].full
    assert c["text_encoder_3"].fp8 <= 0.52 * c["text_encoder_3"].full


def test_sd35_large_turbo_fits_24_and_16_gib(sd35_plan: MemoryPlan) -> None:
    assert sd35_plan.need(mode("bf16"), 1024, 1) > 24 * GiB  # the reason for all this
    for budget, with_t5, expected in [(24, True, "fp8"), (16, True, "fp8-offload"), (24, False, "no-t5"),
                                      (16, False, "fp8-no-t5"), (80, True, "bf16")]:  # fmt: skip
        chosen, why = sd35_plan.choose(budget * GiB, size=2048, rows=1, with_t5=with_t5)
        assert chosen.name == expected, (budget, with_t5, why)
        assert sd35_plan.need(chosen, 2048, 1) <= budget * GiB
    table = sd35_plan.table()
    assert "| `fp8` |" in table and "| `fp8-offload` |" in table


def test_activation_peaks_grow_with_the_request(sd35_plan: MemoryPlan) -> None:
    t = sd35_plan.transformer_peak
    assert t[(1024, 1)] < t[(2048, 1)] < t[(2048, 4)]
    assert 3.5 < t[(1024, 4)] / t[(1024, 1)] < 4.5  # linear in rows
    # Above 1536 pixels the VAE decodes in tiles: 2048² costs about what 1024² does.
    assert sd35_plan.vae_peak[(2048, 1)] < 1.5 * sd35_plan.vae_peak[(1024, 1)]


def test_automatic_choice_with_fake_budgets() -> None:
    """Made-up figures: the first mode that fits is chosen, offload only on CUDA, and a clear refusal."""
    from sd3serve.engine.memory import ComponentBytes

    comp = lambda full, fp8: ComponentBytes(full=full * GiB, fp8=fp8 * GiB, buffers=0, largest_layer=0)  # noqa: E731
    plan = MemoryPlan(
        components={"text_encoder": comp(1, 1), "text_encoder_2": comp(1, 1), "text_encoder_3": comp(8, 4),
                    "transformer": comp(16, 8), "vae": comp(0, 0)},
        text_peak={"text_encoder": 0, "text_encoder_2": 0, "text_encoder_3": 0},
        transformer_peak={(1024, 1): GiB}, vae_peak={(1024, 1): GiB}, prompt_cache=0,
    )  # fmt: skip
    pick = lambda gib, **kw: plan.choose(int(gib * GiB), size=1024, rows=1, **kw)[0].name  # noqa: E731
    assert pick(40) == "bf16"  # 26 + 1 of activations, x1.1 + 0.5
    assert pick(26) == "t5-fp8"
    assert pick(20) == "fp8"
    assert pick(12) == "fp8-offload"
    assert pick(22, with_t5=False) == "no-t5"
    assert pick(13, with_t5=False) == "fp8-no-t5"
    with pytest.raises(NoModeFits, match="offload needs CUDA"):
        pick(12, allow_offload=False)
    with pytest.raises(NoModeFits, match=r"no memory mode fits 1\.0 GiB.*--no-t5") as refused:
        pick(1)
    bf16 = next(m for m in MODES if m.name == "bf16")
    assert f"(bf16 needs {plan.need(bf16, 1024, 1) / GiB:.1f}; t5-fp8 needs " in str(refused.value)  # in GiB


def test_memory_budget_at_load(tiny_model_dir: Path) -> None:
    model = load_model(Settings(model=tiny_model_dir, device="cpu", memory_budget="64"))
    assert model.memory is not None and model.memory.name == "bf16"
    with pytest.raises(ModelLoadError, match="no memory mode fits"):
        load_model(Settings(model=tiny_model_dir, device="cpu", memory_budget="0.01"))
    with pytest.raises(ModelLoadError, match="CUDA"):
        load_model(Settings(model=tiny_model_dir, device="cpu", memory_budget="auto"))


def transformer_bytes(model: object) -> int:
    t = model.pipe.transformer  # type: ignore[attr-defined]
    return sum(p.numel() * p.element_size() for p in t.parameters())


def test_fp8_storage_halves_the_transformer_and_pictures_stay_close() -> None:
    job = make_job(
        prompt="a red circle at the top left on a blue background", steps=4, seed=4, sampler="dpmpp_2m",
        scheduler="sgm_uniform", width=256, height=256,
    )  # fmt: skip
    full = build_pipeline(Settings(device="cpu", dtype="bfloat16", prompt_cache_mb=0))
    fp8 = build_pipeline(Settings(device="cpu", dtype="bfloat16", prompt_cache_mb=0, weights="fp8"))
    assert fp8.model.pipe.transformer.transformer_blocks[0].ff.net[0].proj.weight.dtype == torch.float8_e4m3fn
    assert fp8.model.pipe.text_encoder_3.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float8_e4m3fn
    # The demo model is small: its positional embedding and projections (kept in bf16) weigh more than at full size.
    assert transformer_bytes(fp8.model) <= 0.6 * transformer_bytes(full.model)
    a, b = (np.asarray(p(job).images[0]).astype(float) for p in (full, fp8))
    psnr = 10 * np.log10(255**2 / np.mean((a - b) ** 2))
    assert psnr >= 30, psnr


def test_plan_command_prints_the_table(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sd3serve.cli import main

    assert main(["plan", "--model", str(tiny_model_dir), "--budget", "1"]) == 0
    out = capsys.readouterr().out
    assert "| `fp8` |" in out and "1 GiB: bf16" in out


def test_the_table_has_as_many_cells_in_every_row(sd35_plan: MemoryPlan) -> None:
    """A Markdown table whose separator row has more or fewer cells than its header is not rendered as a table."""
    rows = sd35_plan.table(budgets=(24, 16, 8)).splitlines()
    cells = {row.count("|") for row in rows}
    assert len(rows) > 2 and cells == {rows[0].count("|")}
    assert set(rows[1].replace("|", "").split()) == {"---"}


@pytest.mark.parametrize(("config", "window"), [(None, 256), ({"model_max_length": 16}, 16),
                                                ({"model_max_length": 512}, 256), ({}, 256)])  # fmt: skip
def test_the_plans_t5_window_comes_from_the_t5_tokenizer(tmp_path: Path, config: dict | None, window: int) -> None:
    """As the engine pads (windows.t5_window): the T5 tokenizer's own limit where shorter than 256."""
    import json

    from sd3serve.engine.memory import t5_tokens

    if config is not None:
        (tmp_path / "tokenizer_3").mkdir()
        (tmp_path / "tokenizer_3" / "tokenizer_config.json").write_text(json.dumps(config))
        (tmp_path / "tokenizer_2").mkdir()  # CLIP's limits are not T5's
        (tmp_path / "tokenizer_2" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8}))
    assert t5_tokens(tmp_path) == window


def test_every_new_tensor_of_an_op_counts_even_after_one_that_reuses_an_input() -> None:
    """An op's outputs can mix a view of an input (no new memory) with new tensors: each new one is counted."""
    from sd3serve.engine.memory import _AllocationTracker

    x = torch.empty(16, device="meta")
    tracker = _AllocationTracker()
    out = tracker.__torch_dispatch__(lambda t: (t.view(4, 4), torch.empty(100, device="meta")), (), (x,))
    assert tracker.peak == 400 and tracker.live == 400
    del out
