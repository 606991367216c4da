"""The repository's address in one place, ``[project.urls] Repository`` in pyproject.toml, written from there into
every notebook's Colab badge and install cell and into the badges of README.md and notebooks/README.md; and the
"you are here" strip at the top of each notebook, made from the notebooks' order.

    python tools/links.py            # rewrite whatever differs
    python tools/links.py --check    # change nothing; exit 1 naming what differs (the test suite runs this)

Change the address in pyproject.toml, run the script, commit: badges and install cells follow.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BADGE = re.compile(r"https://colab\.research\.google\.com/github/[^)\s]+?/blob/main/(notebooks/(?:solutions/)?\d\d_\w+\.ipynb)")
INSTALL_MARK = "# Install dmdd on Colab"
OLD_INSTALL_MARK = "# On Colab: install dmdd"
INSTALL_CELL = '''# Install dmdd on Colab (Colab's own torch is kept). Anywhere else the package is already installed (`make setup`,
# or `pip install -e .` in the repository) and this cell does nothing. To install from elsewhere, set DMDD_INSTALL
# first (os.environ["DMDD_INSTALL"] = ...): a git URL ("git+https://..."), a wheel (.whl) or a folder holding the
# repository, e.g. one an instructor shared on Drive. DMDD_DRIVE = "dmdd" keeps data and runs in MyDrive/dmdd, so
# they survive a disconnect.
import os
import subprocess
import sys

IN_COLAB = "google.colab" in sys.modules
REPOSITORY = "{repository}"
if IN_COLAB:
    source = os.environ.get("DMDD_INSTALL", "").strip() or f"git+{{REPOSITORY}}"
    if os.environ.get("DMDD_DRIVE") or source.startswith("/content/drive"):  # Drive first: the source may be on it
        from google.colab import drive

        drive.mount("/content/drive")
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "-q", source], capture_output=True, text=True)
    if installed.returncode != 0:
        print(f"Installing dmdd from {{source}} failed:\\n{{installed.stderr.strip()[-1500:]}}\\n\\n"
              "Three ways to install it, each set before running this cell again:\\n"
              f"  1. a git repository: os.environ['DMDD_INSTALL'] = 'git+{{REPOSITORY}}' (or a fork's URL)\\n"
              "  2. a wheel: os.environ['DMDD_INSTALL'] = '/content/drive/MyDrive/dmdd_core-0.1.0-py3-none-any.whl'\\n"
              "     (`make wheel` in the repository builds it into dist/)\\n"
              "  3. a folder: os.environ['DMDD_INSTALL'] = '/content/drive/MyDrive/dmdd' (a copy of the repository)",
              file=sys.stderr)
        raise SystemExit(1)
    if os.environ.get("DMDD_DRIVE"):
        os.environ["DMDD_HOME"] = f"/content/drive/MyDrive/{{os.environ['DMDD_DRIVE']}}"
'''


def repository(pyproject: Path = ROOT / "pyproject.toml") -> str:
    """The address in ``[project.urls] Repository``: ``https://github.com/OWNER/NAME``."""
    found = re.search(r'^Repository\s*=\s*"(https://github\.com/[\w.-]+/[\w.-]+?)/?"\s*$', pyproject.read_text(),
                      re.MULTILINE)
    if not found:
        raise ValueError(f'{pyproject}: no [project.urls] line Repository = "https://github.com/OWNER/NAME"')
    return found.group(1)


def colab_base(repo: str) -> str:
    return repo.replace("https://github.com/", "https://colab.research.google.com/github/") + "/blob/main/"


def install_cell(repo: str) -> str:
    return INSTALL_CELL.format(repository=repo).rstrip("\n")


def _badges(text: str, repo: str) -> str:
    return BADGE.sub(lambda m: colab_base(repo) + m.group(1), text)


STRIP_PREFIX = "**The tutorial:** "
SOLUTIONS_PREFIX = "Hints, worked solutions and what to expect: "
BADGE_IMAGE = "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"


def _with_solutions_link(text: str, name: str) -> str:
    """The Exercises section of a tutorial notebook, with the line that links its solutions notebook."""
    lines = [line for line in text.split("\n") if not line.startswith(SOLUTIONS_PREFIX)]
    at = lines.index("## Exercises")
    link = f"{SOLUTIONS_PREFIX}[solutions/{name}_solutions.ipynb](solutions/{name}_solutions.ipynb)."
    return "\n".join([*lines[: at + 1], "", link, *lines[at + 1 :]]).replace("\n\n\n", "\n\n")


def _with_badge(text: str, path: str, repo: str) -> str:
    """A solutions notebook's title cell, with its Colab badge after the title."""
    if "colab-badge.svg" in text:
        return text
    title, _, rest = text.partition("\n")
    return f"{title}\n\n{BADGE_IMAGE}({colab_base(repo)}{path})\n{rest}".replace("\n\n\n", "\n\n")


def you_are_here(name: str, names: list[str]) -> str:
    """The strip at the top of each notebook: every notebook in order, this one in bold, the others linked."""
    def title(n: str) -> str:
        return n.replace("_", " ", 1).replace("_", " ")
    return STRIP_PREFIX + " → ".join(f"**{title(n)}** (you are here)" if n == name else f"[{title(n)}]({n}.ipynb)"
                                     for n in names)


def _with_strip(text: str, strip: str) -> str:
    lines = [line for line in text.split("\n") if not line.startswith(STRIP_PREFIX)]
    at = next((i for i, line in enumerate(lines) if "colab-badge.svg" in line), None)
    if at is None:
        return text
    return "\n".join([*lines[: at + 1], "", strip, *lines[at + 1 :]]).replace("\n\n\n", "\n\n")


def expected_notebook(nb: dict, name: str, repo: str, names: list[str] | None = None,
                      solutions: bool = False) -> dict:
    """The notebook with its badge, its "you are here" strip, the link to its solutions (``solutions``: the
    solutions notebook exists) and its install cell as the address and the notebooks' order make them. A notebook
    of notebooks/solutions/ (``name`` ending in _solutions) gets its badge and install cell only."""
    out = json.loads(json.dumps(nb))
    first = True
    for cell in out["cells"]:
        text = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            text = _badges(text, repo)
            if first and name.endswith("_solutions"):
                text = _with_badge(text, f"notebooks/solutions/{name}.ipynb", repo)
            if first and names:
                text = _with_strip(text, you_are_here(name, names))
            if solutions and "\n## Exercises\n" in f"\n{text}\n":
                text = _with_solutions_link(text, name)
            first = False
        elif text.startswith((INSTALL_MARK, OLD_INSTALL_MARK)):
            text = install_cell(repo)
        cell["source"] = text.splitlines(keepends=True)
    return out


def sync(check: bool, root: Path = ROOT) -> list[str]:
    """Rewrite (or with ``check``, only list) every file whose badges or install cell differ from the address."""
    repo = repository(root / "pyproject.toml")
    differing = []
    paths = sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    solutions = sorted((root / "notebooks" / "solutions").glob("[0-9][0-9]_*_solutions.ipynb"))
    for path in paths + solutions:
        nb = json.loads(path.read_text())
        if path in solutions:
            want = expected_notebook(nb, path.stem, repo)
        else:
            want = expected_notebook(nb, path.stem, repo, [p.stem for p in paths],
                                     (path.parent / "solutions" / f"{path.stem}_solutions.ipynb").is_file())
        if not any("".join(c["source"]).startswith(INSTALL_MARK) for c in want["cells"]):
            differing.append(f"{path.relative_to(root)}: no install cell")
            continue
        if want != nb:
            differing.append(str(path.relative_to(root)))
            if not check:
                path.write_text(json.dumps(want, indent=1, ensure_ascii=False) + "\n")
    for path in (root / "README.md", root / "notebooks" / "README.md"):
        text = path.read_text()
        want_text = _badges(text, repo)
        if want_text != text:
            differing.append(str(path.relative_to(root)))
            if not check:
                path.write_text(want_text)
    return differing


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file differs")
    args = p.parse_args(argv)
    differing = sync(args.check)
    for name in differing:
        print(f"{'differs' if args.check else 'rewritten'}: {name}")
    if args.check and differing:
        print(f"run `python tools/links.py` to write the address of pyproject.toml ({repository()}) into them",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
