"""Loading an SD3-family model from a diffusers directory, a single-file checkpoint, or the embedded demo.

Nothing is downloaded: every load is ``local_files_only`` and a missing file is a clear error.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import huggingface_hub.constants
import torch
from huggingface_hub.utils import disable_progress_bars
from transformers.utils import logging as transformers_logging

from sd3serve.engine.acceleration import prepare_weights, wanted
from sd3serve.engine.flow import FlowSampling
from sd3serve.engine.memory import NoModeFits, budget_bytes, memory_plan
from sd3serve.engine.model import LoadedModel, MemoryMode
from sd3serve.settings import Settings

# Importing diffusers' pipelines makes transformers log advisory warnings (no torchvision: the PIL image processors
# stand in, which SD3 does not use). Hide them for this import only; the process's log settings stay as they were.
_verbosity = transformers_logging.get_verbosity()
transformers_logging.set_verbosity_error()
try:
    from diffusers import StableDiffusion3Pipeline
    from diffusers.utils import logging as diffusers_logging
finally:
    transformers_logging.set_verbosity(_verbosity)

log = logging.getLogger(__name__)

DEMO_MODEL_VERSION = "shapes-v3"
DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "demo"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


class ModelLoadError(RuntimeError):
    pass


def parse_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` (compare ``.type``, never the name: ``cuda:0`` is CUDA too)."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ModelLoadError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")
    return torch.device(name)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = parse_device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {name!r} was asked for but torch sees no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelLoadError(f"device {name!r}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def demo_model_dir() -> Path:
    """The embedded demo model: trained by ``python -m sd3demo.train`` (``tools/``), shipped in the package."""
    path = DEMO_MODEL_DIR
    if not (path / "model_index.json").exists():
        raise ModelLoadError(f"the embedded demo model is missing from the package ({path}); reinstall sd3serve")
    return path


def configure_libraries() -> None:
    """Process-wide settings for serving, applied by :func:`load_model` (idempotent): nothing is ever downloaded
    at run time, so an accidental hub call fails at once instead of hanging; no progress bars, errors only.

    An ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) the user set is kept as it is.
    """
    if "HF_HUB_OFFLINE" not in os.environ and "TRANSFORMERS_OFFLINE" not in os.environ:
        os.environ["HF_HUB_OFFLINE"] = "1"
        huggingface_hub.constants.HF_HUB_OFFLINE = True  # read from the environment when huggingface_hub loaded
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # read at every warning
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") is None:  # the variable has priority over the call
        disable_progress_bars()
    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def mode_as_set(settings: Settings) -> MemoryMode:
    fp8_t5 = settings.weights in ("fp8", "t5-fp8")
    return MemoryMode(
        name="as set",
        transformer="fp8" if settings.weights == "fp8" else "full",
        t5="off" if not settings.load_t5 else ("fp8" if fp8_t5 else "full"),
        offload=settings.offload,
        about="from SD3SERVE_WEIGHTS, SD3SERVE_OFFLOAD and --no-t5",
    )


def forward_rows(settings: Settings, device: torch.device) -> int:
    """The most images one transformer or VAE call sees: 1 with exact batches, else the batch (doubled: CFG)."""
    if settings.exact_batches:
        return 1
    return 2 * (settings.max_batch_images or (4 if device.type == "cuda" else 1))


LARGEST_SIZE = 2048  # pixels a side: the largest request the API accepts


def choose_memory_mode(settings: Settings, config_dir: Path, device: torch.device) -> MemoryMode:
    """The mode as set, or, with a memory budget, the fastest that fits the largest request this server takes."""
    if settings.memory_budget == "off":
        return mode_as_set(settings)
    rows = forward_rows(settings, device)
    try:
        budget = budget_bytes(settings.memory_budget, device)
        plan = memory_plan(config_dir, prompt_cache_bytes=int(settings.prompt_cache_mb * 2**20),
                           shapes=((LARGEST_SIZE, rows),))  # fmt: skip
        mode, why = plan.choose(
            budget, size=LARGEST_SIZE, rows=rows, with_t5=settings.load_t5, allow_offload=device.type == "cuda"
        )
    except (NoModeFits, FileNotFoundError) as e:
        raise ModelLoadError(f"--memory-budget {settings.memory_budget}: {e}") from e
    log.info("%s", why)
    return mode


def load_model(settings: Settings) -> LoadedModel:
    configure_libraries()
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    if settings.model is None:
        path = demo_model_dir()
        source = f"embedded demo model ({DEMO_MODEL_VERSION}, {path})"
        log.warning(
            "No --model given: serving the built-in DEMO model (%s): a tiny SD3-architecture model trained on "
            "coloured shapes (docs/models.md says what it can draw), not SD3.5. Pass --model PATH for real weights.",
            DEMO_MODEL_VERSION,
        )
    else:
        path = settings.model.expanduser()
        source = str(path)
    config_dir = path if path.is_dir() else settings.model_config_dir
    memory = choose_memory_mode(settings, config_dir, device) if config_dir else mode_as_set(settings)
    load_t5 = memory.t5 != "off"
    if path.is_dir():
        pipe = _load_directory(path, dtype=dtype, load_t5=load_t5)
    elif path.is_file() and path.suffix in SINGLE_FILE_SUFFIXES:
        pipe = _load_single_file(path, config_dir=settings.model_config_dir, dtype=dtype, load_t5=load_t5)
    elif path.exists():
        raise ModelLoadError(
            f"{path}: not a diffusers directory nor a single-file checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)})"
        )
    else:
        raise ModelLoadError(f"{path}: no such file or directory")
    # Fusing and fp8 storage happen in CPU memory, so the GPU never holds more than the mode's weights; with offload
    # the weights stay there (apply_acceleration installs the hooks that move them).
    prepared = prepare_weights(
        pipe,
        fuse=wanted(settings.fuse_qkv, device),
        fp8_transformer=memory.transformer == "fp8",
        fp8_t5=memory.t5 == "fp8",
        compute_dtype=dtype,
    )
    if memory.offload == "none":
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        if module is not None:
            module.eval().requires_grad_(False)
    sched = pipe.scheduler.config
    flow = FlowSampling(shift=float(sched.get("shift", 3.0)), num_train_timesteps=int(sched["num_train_timesteps"]))
    log.info(
        "loaded %s on %s (%s), shift %.2f, T5 %s%s",
        source,
        device,
        dtype,
        flow.shift,
        "on" if pipe.text_encoder_3 is not None else "off",
        f", {', '.join(prepared)}" if prepared else "",
    )
    demo = settings.model is None
    return LoadedModel(
        pipe=pipe, flow=flow, device=device, dtype=dtype, source=source, memory=memory, normalise_prompts=demo
    )


def _t5_overrides(has_t5: bool, load_t5: bool) -> dict[str, None]:
    return {} if (has_t5 and load_t5) else {"text_encoder_3": None, "tokenizer_3": None}


def _load_directory(path: Path, *, dtype: torch.dtype, load_t5: bool) -> StableDiffusion3Pipeline:
    if not (path / "model_index.json").exists():
        raise ModelLoadError(f"{path}: a diffusers model directory needs model_index.json")
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        if not (path / part).is_dir():
            raise ModelLoadError(f"{path}: missing the {part}/ folder of a diffusers SD3 model")
    has_t5 = (path / "text_encoder_3").is_dir() and (path / "tokenizer_3").is_dir()
    try:
        return StableDiffusion3Pipeline.from_pretrained(
            path, dtype=dtype, local_files_only=True, **_t5_overrides(has_t5, load_t5)
        )
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: could not load the model: {e}") from e


# Where each component's weights sit in an original (SAI / ComfyUI) single-file SD3 checkpoint.
SINGLE_FILE_PREFIXES = {
    "transformer": ("model.diffusion_model.", "joint_blocks."),
    "vae": ("first_stage_model.",),
    "text_encoder": ("text_encoders.clip_l.",),
    "text_encoder_2": ("text_encoders.clip_g.",),
    "text_encoder_3": ("text_encoders.t5xxl.",),
}


def checkpoint_keys(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return list(state.get("state_dict", state).keys())


def _load_single_file(
    path: Path, *, config_dir: Path | None, dtype: torch.dtype, load_t5: bool
) -> StableDiffusion3Pipeline:
    """A single-file checkpoint holds weights only, often not all of them (ComfyUI keeps the text encoders in
    files of their own): the configs and tokenizers, and the weights of every component the file lacks, come
    from ``config_dir``, a diffusers-layout directory of the same model."""
    if config_dir is None:
        raise ModelLoadError(
            f"{path}: a single-file checkpoint needs --model-config-dir (SD3SERVE_MODEL_CONFIG_DIR): a diffusers "
            "directory of the same model with model_index.json, the component config.json files and the "
            "tokenizer folders, plus the weights of any component the checkpoint does not hold"
        )
    if not (config_dir / "model_index.json").exists():
        raise ModelLoadError(f"{config_dir}: the config directory needs model_index.json (diffusers layout)")
    try:
        keys = checkpoint_keys(path)
    except Exception as e:
        raise ModelLoadError(f"{path}: not a readable checkpoint: {e}") from e
    in_file = {name for name, prefixes in SINGLE_FILE_PREFIXES.items() if any(k.startswith(prefixes) for k in keys)}
    if "transformer" not in in_file:
        raise ModelLoadError(f"{path}: no SD3 transformer weights (model.diffusion_model.joint_blocks.*) in it")
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    classes = {
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModelWithProjection,
        "text_encoder_2": CLIPTextModelWithProjection,
        "text_encoder_3": T5EncoderModel,
    }
    preloaded: dict[str, object] = {}
    if not load_t5:
        preloaded |= {"text_encoder_3": None, "tokenizer_3": None}
    for name, cls in classes.items():
        if name in in_file or name in preloaded:
            continue
        if (config_dir / name).is_dir():
            preloaded[name] = cls.from_pretrained(config_dir, subfolder=name, dtype=dtype, local_files_only=True)
        elif name == "text_encoder_3":
            preloaded |= {"text_encoder_3": None, "tokenizer_3": None}  # T5 is optional
        else:
            raise ModelLoadError(f"{path}: the checkpoint has no {name} weights and {config_dir} has no {name}/")
    try:
        return StableDiffusion3Pipeline.from_single_file(
            str(path), config=str(config_dir), dtype=dtype, local_files_only=True, **preloaded
        )
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: could not load the checkpoint: {e}") from e
