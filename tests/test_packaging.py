"""The install files agree with each other: pyproject.toml, environment.yml, binder/, the Makefile and CI."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ]", requirement.strip(), maxsplit=1)[0].lower()


def _pip_section(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    start = lines.index("  - pip:")
    return [line.strip()[2:] for line in lines[start + 1 :] if line.startswith("      - ")]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_files_install_the_pyproject_packages() -> None:
    project = _pyproject()["project"]
    wanted = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    for env in (ROOT / "environment.yml", ROOT / "binder" / "environment.yml"):
        listed = {_name(r) for r in _pip_section(env) if not r.startswith("-e")}
        assert listed == wanted, f"{env.relative_to(ROOT)} differs from pyproject.toml: {listed ^ wanted}"


def test_torch_pins_agree_everywhere() -> None:
    makefile = (ROOT / "Makefile").read_text()
    pins = re.search(r"TORCH_PINS \?= (torch==\S+ torchvision==\S+)\n", makefile)
    assert pins, "the Makefile pins torch and torchvision together"
    torch_pin, vision_pin = pins.group(1).split()
    for env in (ROOT / "environment.yml", ROOT / "binder" / "environment.yml"):
        assert {torch_pin, vision_pin} <= set(_pip_section(env)), env
    assert f"pip install torch=={torch_pin.split('==')[1]} torchvision=={vision_pin.split('==')[1]}" in (
        ROOT / "README.md"
    ).read_text()


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make quickstart" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "pytest" in (ROOT / "Makefile").read_text().split("\ntest:")[1].split("\n\n")[0]
    assert "HF_HUB_OFFLINE=1" in (ROOT / "Makefile").read_text()


def test_console_script_points_at_the_cli() -> None:
    assert _pyproject()["project"]["scripts"]["dmdd"] == "dmdd_core.cli:main"
    from dmdd_core.cli import main

    assert callable(main)
