"""Shared fixtures: a tiny SD3 model built once per session, a live uvicorn server, a ledger."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"  # any accidental hub call fails at once

import pytest

from live_server import LiveServer, run_live_server
from sd3demo.tiny import build_tiny_sd3
from sd3serve.engine.loading import LoadedModel, load_model
from sd3serve.settings import Settings


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """One local Ray cluster and Serve for every Ray test module (tests/ray_support.py): started by the first test
    that needs it, stopped after the last one (``pytest_runtest_teardown`` below) or at the end of the session."""
    pytest.importorskip("ray")
    import ray_support

    try:
        yield ray_support.shared_cluster()
    finally:
        ray_support.stop_shared()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Once a module's fixtures are torn down, stop the shared Ray cluster if no test left needs it: its
    processes would otherwise share the cores with every test that runs after the last Ray one."""
    yield
    if "ray_support" not in sys.modules or (
        nextitem is not None and getattr(nextitem, "module", None) is getattr(item, "module", None)
    ):
        return
    import ray_support

    if ray_support.is_running():
        rest = item.session.items[item.session.items.index(nextitem) :] if nextitem is not None else []
        if not any("ray_cluster" in later.fixturenames for later in rest):  # type: ignore[attr-defined]
            ray_support.stop_shared()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd3(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path) -> LoadedModel:
    return load_model(Settings(model=tiny_model_dir, device="cpu"))


@pytest.fixture(scope="session")
def live_server(tiny_model: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    from sd3serve.engine.batching import BatchingEngine

    settings = Settings(model=None, device="cpu", data_dir=tmp_path_factory.mktemp("live"))
    yield from run_live_server(settings, engine=BatchingEngine(settings, model=tiny_model))


JS_DIR = Path(__file__).resolve().parent / "js"  # package.json, package-lock.json; `make test` runs npm ci


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """tests/js/node_modules (axios, openai), installed by `make test` (npm ci): no test installs anything."""
    import shutil

    if shutil.which("node") is None:
        pytest.skip("node is not installed: the JavaScript client tests cannot run here")
    modules = JS_DIR / "node_modules"
    missing = [name for name in ("axios", "openai") if not (modules / name).is_dir()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed in {modules}: run `make test`, or `cd tests/js && npm ci`")
    return modules


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under mutmut, run a mutant only against the tests of its area (helpers.mutation_scope)."""
    from helpers.mutation_scope import in_scope, mutant_module

    module = mutant_module(os.environ.get("MUTANT_UNDER_TEST", ""))
    if module is None:
        return
    root = Path(str(config.rootpath))
    keep = [i for i in items if in_scope(module, Path(str(i.path)).relative_to(root).as_posix())]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep
