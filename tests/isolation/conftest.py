"""Two API keys against one server: what one key opens, holds or slows must not reach the other."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from live_server import LiveServer, run_live_server
from sd3serve.settings import Settings
from stub_engine import StubEngine


@pytest.fixture
def stub_server(tmp_path: Path) -> Iterator[LiveServer]:
    gen = run_live_server(Settings(data_dir=tmp_path, device="cpu"), engine=StubEngine())
    yield next(gen)
    gen.close()
