"""The LoRA adapters a server offers: the ``*.safetensors`` files of its LoRA directory, by file name (torch-free:
the API checks names with it before anything is held or queued)."""

from __future__ import annotations

import re
from pathlib import Path

from sd3serve.errors import InvalidRequest
from sd3serve.settings import Settings

SUFFIX = ".safetensors"
# The demo model's adapters (tools/sd3demo/lora.py), offered when the demo model serves and no --lora-dir is given.
DEMO_LORA_DIR = Path(__file__).resolve().parent.parent / "models" / "demo_loras"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def lora_dir(settings: Settings) -> Path | None:
    """The adapters' directory: --lora-dir, or the demo adapters when the demo model serves."""
    if settings.lora_dir is not None:
        return settings.lora_dir
    return DEMO_LORA_DIR if settings.model is None else None


def adapter_files(lora_dir: Path | None) -> dict[str, Path]:
    """name -> file, sorted by name; empty without a directory."""
    if lora_dir is None or not lora_dir.is_dir():
        return {}
    files = {p.name[: -len(SUFFIX)]: p for p in lora_dir.iterdir() if p.name.endswith(SUFFIX) and p.is_file()}
    return {name: files[name] for name in sorted(files) if NAME.match(name)}


def check_adapters(lora_dir: Path | None, names: list[str]) -> None:
    """InvalidRequest naming the unknown adapters and the ones this server has."""
    if not names:
        return
    known = adapter_files(lora_dir)
    unknown = [n for n in names if n not in known]
    if unknown:
        offered = ", ".join(known) if known else "none (start the server with --lora-dir DIR)"
        raise InvalidRequest(f"loras: unknown adapter {', '.join(map(repr, unknown))}; this server has: {offered}")
