"""The repository's address in one place (pyproject.toml), the Colab badges and install cells made from it, and
the install cell's three sources and its failure message, run with a fake ``google.colab`` in a fresh virtualenv."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _links():
    spec = importlib.util.spec_from_file_location("links", ROOT / "tools" / "links.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_badges_and_install_cells_agree_with_the_address_in_pyproject(tmp_path: Path) -> None:
    links = _links()
    assert links.sync(check=True) == [], "run python tools/links.py"
    # a copy of the tree with another address: every notebook and both READMEs differ until the script runs
    for name in ("pyproject.toml", "README.md", "notebooks"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, tmp_path / name)
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace(links.repository(), "https://github.com/someone/else"))
    notebooks = sorted(p.name for p in (tmp_path / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    solutions = sorted(p.name for p in (tmp_path / "notebooks" / "solutions").glob("[0-9][0-9]_*.ipynb"))
    assert len(notebooks) == 9 and len(solutions) == 9
    assert links.sync(check=True, root=tmp_path) == [*(f"notebooks/{n}" for n in notebooks),
                                                       *(f"notebooks/solutions/{n}" for n in solutions), "README.md",
                                                       "notebooks/README.md"]
    links.sync(check=False, root=tmp_path)
    assert links.sync(check=True, root=tmp_path) == []
    for name in notebooks:
        nb = json.loads((tmp_path / "notebooks" / name).read_text())
        text = "".join("".join(c["source"]) for c in nb["cells"])
        assert f"colab.research.google.com/github/someone/else/blob/main/notebooks/{name}" in text
        assert 'REPOSITORY = "https://github.com/someone/else"' in text and "dmdd-core" not in text
    for name in solutions:  # the solutions notebooks: their own badge and the same install cell
        text = (tmp_path / "notebooks" / "solutions" / name).read_text()
        assert f"colab.research.google.com/github/someone/else/blob/main/notebooks/solutions/{name}" in text
        assert 'REPOSITORY = \\"https://github.com/someone/else\\"' in text and "dmdd-core" not in text


def _install_cell() -> str:
    nb = json.loads((ROOT / "notebooks" / "01_data_and_anomaly_synthesis.ipynb").read_text())
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    (cell,) = [c for c in cells if c.startswith(_links().INSTALL_MARK)]
    return cell


PROBE_BACKEND = """
import base64, hashlib, zipfile

FILES = {"dmdd_probe/__init__.py": "WHERE = 'installed'\\n",
         "dmdd_probe-1.0.dist-info/METADATA": "Metadata-Version: 2.1\\nName: dmdd-probe\\nVersion: 1.0\\n",
         "dmdd_probe-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\\nGenerator: probe\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n"}


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    name, record = "dmdd_probe-1.0-py3-none-any.whl", []
    with zipfile.ZipFile(f"{wheel_directory}/{name}", "w") as z:
        for path, text in FILES.items():
            z.writestr(path, text)
            digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
            record.append(f"{path},sha256={digest},{len(text.encode())}")
        z.writestr("dmdd_probe-1.0.dist-info/RECORD", "\\n".join([*record, "dmdd_probe-1.0.dist-info/RECORD,,"]) + "\\n")
    return name
"""
"""A PEP 517 build backend inside the probe package itself, needing nothing from an index: the probe installs
offline from its folder, its git repository or the wheel it builds."""


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A fresh virtualenv and a tiny package as a folder, a wheel and a git repository."""
    root = tmp_path_factory.mktemp("install")
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    package = root / "probe"
    package.mkdir()
    (package / "probe_backend.py").write_text(PROBE_BACKEND)
    (package / "pyproject.toml").write_text('[build-system]\nrequires = []\nbuild-backend = "probe_backend"\n'
                                            'backend-path = ["."]\n')
    (root / "dist").mkdir()
    subprocess.run([sys.executable, "-c", f"import probe_backend; probe_backend.build_wheel({str(root / 'dist')!r})"],
                   cwd=package, check=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(package)]
    subprocess.run(["git", "init", "-q", str(package)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "probe"], check=True)
    return {"python": root / "venv" / "bin" / "python", "folder": str(package),
            "wheel": str(next((root / "dist").glob("*.whl"))), "git": f"git+file://{package}"}


def _run_cell(python: Path, install: str) -> subprocess.CompletedProcess[str]:
    prelude = "import sys, types\nsys.modules['google.colab'] = types.ModuleType('google.colab')\n"
    env = {**os.environ, "DMDD_INSTALL": install, "PIP_NO_INDEX": "1"}
    env.pop("DMDD_DRIVE", None)
    return subprocess.run([str(python), "-c", prelude + _install_cell()], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("kind", ["folder", "wheel", "git"])
def test_the_install_cell_installs_from_a_folder_a_wheel_or_a_git_url(sources: dict[str, Any], kind: str) -> None:
    python = sources["python"]
    subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", "dmdd-probe"], capture_output=True)
    done = _run_cell(python, str(sources[kind]))
    assert done.returncode == 0, done.stderr
    check = subprocess.run([str(python), "-c", "import dmdd_probe; print(dmdd_probe.WHERE)"], capture_output=True,
                           text=True)
    assert check.stdout.strip() == "installed", check.stderr


def test_a_failed_install_prints_the_three_ways_not_a_traceback(sources: dict[str, Any], tmp_path: Path) -> None:
    done = _run_cell(sources["python"], str(tmp_path / "no_such_folder"))
    assert done.returncode == 1
    assert "Installing dmdd from" in done.stderr and "no_such_folder" in done.stderr
    assert all(way in done.stderr for way in ("1. a git repository", "2. a wheel", "3. a folder"))
    assert "Traceback" not in done.stderr


def test_outside_colab_the_install_cell_does_nothing() -> None:
    done = subprocess.run([sys.executable, "-c", _install_cell()], env={**os.environ, "DMDD_INSTALL": "/nowhere"},
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == done.stderr == ""


def test_dmdd_home_is_one_root_for_data_and_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from dmdd_core.cli import build_parser
    from dmdd_core.config import runs_dir
    from dmdd_core.data import default_data_root

    for name in ("DMDD_HOME", "DMDD_DATA", "DMDD_RUNS"):
        monkeypatch.delenv(name, raising=False)
    assert runs_dir("x") == Path("runs/x") and default_data_root() == Path.home() / ".cache" / "dmdd"
    monkeypatch.setenv("DMDD_HOME", str(tmp_path))
    assert runs_dir("x") == tmp_path / "runs" / "x" and default_data_root() == tmp_path / "data"
    assert build_parser().parse_args(["quickstart"]).out is None  # resolved through runs_dir when the command runs
    monkeypatch.setenv("DMDD_RUNS", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("DMDD_DATA", str(tmp_path / "data2"))
    assert runs_dir("x") == tmp_path / "elsewhere" / "x" and default_data_root() == tmp_path / "data2"
