"""The wheel an instructor hands out: built with pip (what `make wheel` runs), installed into a fresh virtualenv
that already has torch, it keeps that torch, installs nothing but itself, gives a working `dmdd` command and runs
notebook 01 from the installed package.

The fresh environment sees the test environment's packages (torch among them) through a .pth line, as a Colab
runtime has its own torch preinstalled. Only one torch/torchvision pair installs offline here (the Makefile's
pins), so the torch kept is that build; that torch is never pinned is checked on the wheel's metadata."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(root / "dist"), str(ROOT)], check=True, capture_output=True)
    wheel = next((root / "dist").glob("dmdd_core-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    python = root / "venv" / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # the preinstalled packages (torch, numpy, jupyter...), as a Colab runtime has them; the venv's own older
    # setuptools would stand in front of theirs
    subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", "setuptools"], check=True, capture_output=True)
    Path(site, "preinstalled.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    log = subprocess.run([str(python), "-m", "pip", "install", "--no-index", "--report", str(root / "report.json"),
                          str(wheel)], capture_output=True, text=True)
    assert log.returncode == 0, log.stderr
    return {"root": root, "python": python, "wheel": wheel, "report": root / "report.json"}


def _run(python: Path, code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env, cwd=python.parent)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_wheel_installs_only_itself_and_keeps_the_environments_torch(installed: dict[str, Path]) -> None:
    report = json.loads(installed["report"].read_text())
    assert [item["metadata"]["name"] for item in report["install"]] == ["dmdd-core"]
    where = _run(installed["python"], "import torch, dmdd_core; print(torch.__version__, torch.__file__, dmdd_core.__file__)")
    version, torch_file, package_file = where.split()
    assert version == torch.__version__ and torch_file == torch.__file__  # the same torch, not replaced
    assert package_file.startswith(str(installed["root"] / "venv"))  # the wheel's copy, not the repository's


def test_the_wheel_never_pins_torch() -> None:
    wheel_metadata = next(ROOT.glob("pyproject.toml")).read_text()
    assert 'name = "dmdd-core"' in wheel_metadata
    import tomllib

    deps = tomllib.loads(wheel_metadata)["project"]["dependencies"]
    torch_req = next(Requirement(d) for d in deps if Requirement(d).name == "torch")
    assert all(v in torch_req.specifier for v in ("2.3.0", "2.11.0", "2.14.1", "3.0.0"))  # Colab's 2.11 included


def test_the_installed_command_and_notebook_01_run(installed: dict[str, Path], tmp_path: Path) -> None:
    dmdd = installed["python"].parent / "dmdd"
    help_text = subprocess.run([str(dmdd), "--help"], capture_output=True, text=True, check=True).stdout
    assert "quickstart" in help_text and "ablate" in help_text
    with zipfile.ZipFile(installed["wheel"]) as wheel:
        assert "dmdd_core/data/builtin.py" in wheel.namelist()
    notebook = tmp_path / "01.ipynb"
    notebook.write_text((ROOT / "notebooks" / "01_data_and_anomaly_synthesis.ipynb").read_text())
    code = ("import nbformat, nbclient\n"
            f"nb = nbformat.read({str(notebook)!r}, as_version=4)\n"
            f"nbclient.NotebookClient(nb, timeout=600, resources={{'metadata': {{'path': {str(tmp_path)!r}}}}}).execute()\n"
            "print(sum(c.cell_type == 'code' for c in nb.cells))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(installed["python"]), "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={**env, "DMDD_FAST": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.strip().splitlines()[-1]) > 5
