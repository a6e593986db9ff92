"""Loading from a diffusers directory, without T5, and the errors for what cannot be loaded."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
from transformers.utils import logging as transformers_logging

from helpers.jobs import make_job
from sd3serve.engine.loading import ModelLoadError, demo_model_dir, load_model
from sd3serve.settings import Settings


def test_directory_with_t5(tiny_model_dir: Path) -> None:
    model = load_model(Settings(model=tiny_model_dir, device="cpu"))
    assert model.pipe.text_encoder_3 is not None
    assert model.flow.shift == 3.0
    assert model.size_multiple == 16


def test_t5_is_optional(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert load_model(Settings(model=tiny_model_dir, device="cpu", load_t5=False)).pipe.text_encoder_3 is None
    no_t5 = tmp_path / "no_t5"
    shutil.copytree(tiny_model_dir, no_t5, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
    assert load_model(Settings(model=no_t5, device="cpu")).pipe.text_encoder_3 is None


def test_shift_comes_from_the_scheduler_config(tiny_model_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "shift5"
    shutil.copytree(tiny_model_dir, other)
    cfg = other / "scheduler" / "scheduler_config.json"
    cfg.write_text(cfg.read_text().replace('"shift": 3.0', '"shift": 5.0'))
    assert load_model(Settings(model=other, device="cpu")).flow.shift == 5.0


def test_errors_are_clear(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(Settings(model=tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"model_index\.json"):
        load_model(Settings(model=tmp_path / "empty"))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken, ignore=shutil.ignore_patterns("vae"))
    with pytest.raises(ModelLoadError, match="vae/"):
        load_model(Settings(model=broken))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="single-file"):
        load_model(Settings(model=tmp_path / "weights.bin"))
    (tmp_path / "sd3.safetensors").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="model-config-dir"):
        load_model(Settings(model=tmp_path / "sd3.safetensors"))


def test_loading_a_model_turns_the_hub_off_and_the_library_logs_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    verbosity = transformers_logging.get_verbosity()
    try:
        transformers_logging.set_verbosity_warning()
        with pytest.raises(ModelLoadError):
            load_model(Settings(model=tmp_path / "missing"))  # the settings come first, before any file is read
        assert os.environ["HF_HUB_OFFLINE"] == "1" and huggingface_hub.constants.is_offline_mode()
        assert transformers_logging.get_verbosity() == transformers_logging.ERROR
    finally:
        transformers_logging.set_verbosity(verbosity)


def test_an_offline_setting_of_the_user_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ModelLoadError):
        load_model(Settings(model=tmp_path / "missing"))
    assert os.environ["HF_HUB_OFFLINE"] == "0" and not huggingface_hub.constants.is_offline_mode()


def test_the_embedded_demo_model_is_the_default(tmp_path: Path) -> None:
    model = load_model(Settings(data_dir=tmp_path, device="cpu"))
    assert model.source.startswith("embedded demo model")
    assert model.pipe.text_encoder_3 is not None and model.flow.shift == 3.0
    size = sum(f.stat().st_size for f in demo_model_dir().rglob("*") if f.is_file())
    assert size <= 30 * 2**20


def test_single_file_checkpoint_gives_the_same_images(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A ComfyUI-style transformer-only checkpoint plus a config directory loads the same model."""
    import numpy as np

    from helpers.original_format import save_transformer_single_file
    from sd3serve.engine.pipeline import SD3Pipeline

    ckpt = save_transformer_single_file(tiny_model_dir, tmp_path / "sd3_tiny.safetensors")
    single = load_model(Settings(model=ckpt, model_config_dir=tiny_model_dir, device="cpu"))
    directory = load_model(Settings(model=tiny_model_dir, device="cpu"))
    job = make_job(prompt="a cat", steps=2, guidance_scale=2.0, seed=3)
    a, b = SD3Pipeline(single)(job).images[0], SD3Pipeline(directory)(job).images[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert single.pipe.text_encoder_3 is not None
    no_t5 = load_model(Settings(model=ckpt, model_config_dir=tiny_model_dir, device="cpu", load_t5=False))
    assert no_t5.pipe.text_encoder_3 is None
    with pytest.raises(ModelLoadError, match="model_index"):
        load_model(Settings(model=ckpt, model_config_dir=tmp_path))


def test_device_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """cuda:N is CUDA (compare the device's type, never its name); unknown names are refused."""
    import torch
    from pydantic import ValidationError

    from sd3serve.engine.loading import parse_device, resolve_device

    assert parse_device("cuda:0").type == "cuda" and parse_device("cuda:1").index == 1
    assert parse_device("cuda").type == "cuda" and parse_device("cpu").type == "cpu"
    with pytest.raises(ModelLoadError, match="unknown device"):
        parse_device("gpu")
    assert Settings(device="cuda:1").device == "cuda:1"
    with pytest.raises(ValidationError):
        Settings(device="cuda:x")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match="no CUDA device"):
        resolve_device("cuda:0")
    assert resolve_device("auto").type == "cpu"


def test_bench_builds_full_size_modules_with_their_buffers() -> None:
    """bench/sd35_large.py materialises full-size modules from meta parameters: the buffers (CLIP's position ids,
    the transformer's positional embedding) must equal those of a normally constructed module. CLIP-L at full size;
    the transformer at full width with one block instead of 38 (its buffers do not depend on the depth)."""
    
    import torch

    from sd35_large import configs, construct, materialize

    cfg = configs()
    cfg["transformer"]["num_layers"] = 1
    for name in ("text_encoder", "transformer"):
        built = materialize(name, cfg[name], dtype=torch.bfloat16, device="cpu")
        reference = construct(name, cfg[name]).to(torch.bfloat16)
        expected = dict(reference.named_buffers())
        assert expected, name
        for key, buffer in built.named_buffers():
            assert torch.equal(buffer, expected[key]), (name, key)
        assert all(p.dtype == torch.bfloat16 for p in built.parameters())
