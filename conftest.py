"""For the whole test session, tests and notebooks alike: one runs folder (``DMDD_RUNS``), so a model trained
once (``tests/conftest.py::tutorial_run``, or the first notebook that needs it) is loaded by every later user
instead of being trained again. Notebook kernels inherit the variable."""

from __future__ import annotations

import os
import shutil
import tempfile

_CREATED: list[str] = []


def pytest_configure(config: object) -> None:
    if not os.environ.get("DMDD_RUNS"):
        folder = tempfile.mkdtemp(prefix="dmdd_runs_")
        _CREATED.append(folder)
        os.environ["DMDD_RUNS"] = folder


def pytest_unconfigure(config: object) -> None:
    for folder in _CREATED:
        shutil.rmtree(folder, ignore_errors=True)
        if os.environ.get("DMDD_RUNS") == folder:
            del os.environ["DMDD_RUNS"]
