"""Build the tutorial's static site: the README, docs/METHOD.md, the nine notebooks and their solutions, executed,
rendered by MkDocs with mkdocs-jupyter (Material theme) into build/site/ (``make docs``).

    python tools/site.py              # execute what changed, render; open build/site/index.html
    python tools/site.py --force      # execute every notebook again (after a change to dmdd_core)
    python tools/site.py --serve      # and serve it on http://127.0.0.1:8000

The notebooks run in fast mode (DMDD_FAST=1, the test suite's mode: shortened trainings on the built-in dataset),
so the site needs no GPU and no internet; every notebook page says so in a note at its top, with what the full
mode runs. An executed notebook is kept in build/site-src/ and executed again only when its source is newer. A
notebook that fails stops the build with the notebook and cell named. Links from the pages to files that are not
pages (source files, result tables) point at the repository (``[project.urls] Repository`` in pyproject.toml).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from links import repository  # noqa: E402  the address's one source, [project.urls] in pyproject.toml

BUILD = ROOT / "build"
SOURCE = BUILD / "site-src"
SITE = BUILD / "site"
FAST_NOTE = ("> **This page was executed in fast mode** (`DMDD_FAST=1`: every training shortened to seconds on two CPU "
             "cores, on the built-in dataset), so its numbers only show that the code runs. Run the notebook itself "
             "for its full setting (the `fast` preset on a CPU, the `lab` preset on a GPU); "
             "[notebooks/README.md](README.md) gives each one's time per mode.")
LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")


def notebooks(pattern: str = "[0-9][0-9]_*") -> list[Path]:
    """The tutorial's notebooks, then their solutions, in reading order (those whose name matches ``pattern``)."""
    folder = ROOT / "notebooks"
    return sorted(folder.glob(f"{pattern}.ipynb")) + sorted((folder / "solutions").glob(f"{pattern}.ipynb"))


def execute(path: Path, target: Path, timeout: int) -> float:
    """Execute one notebook in fast mode from its own folder (as Jupyter would) and write it, outputs and all, to
    ``target``; return the seconds it took. A failing cell raises with the notebook and cell named."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    started = time.perf_counter()
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
                       ).execute()
    except CellExecutionError as exc:
        raise SystemExit(f"{path.relative_to(ROOT)} failed; the site was not built:\n{exc}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, target)
    return time.perf_counter() - started


def _relative_target(m: re.Match[str], page: PurePosixPath) -> tuple[PurePosixPath, str] | None:
    """A link's target as a repository path and its anchor; None for an absolute URL, an anchor or a root path."""
    target = m.group(2)
    if re.match(r"^[a-z]+:|^#|^/", target):
        return None
    path, _, anchor = target.partition("#")
    return PurePosixPath(os.path.normpath(str(page.parent / path))), anchor


def rewrite_links(text: str, page: PurePosixPath, pages: set[PurePosixPath], repo: str) -> str:
    """Keep links to the site's own pages and pictures; point links to other files of the repository at it. ``page``
    is the file's path in the repository, which is also its path in the site's source."""

    def fix(m: re.Match[str]) -> str:
        found = _relative_target(m, page)
        if found is None:
            return m.group(0)
        resolved, anchor = found
        if resolved in pages or resolved.suffix == ".png" or str(resolved).startswith("..") or \
                not (ROOT / resolved).exists():  # a page, a picture (copied), or nothing of the repository
            return m.group(0)
        kind = "tree" if (ROOT / resolved).is_dir() else "blob"
        return f"{m.group(1)}{repo}/{kind}/main/{resolved}{'#' + anchor if anchor else ''}{m.group(3)}"

    return LINK.sub(fix, text)


def page_url(path: PurePosixPath) -> str:
    """Where MkDocs puts a page of the repository path ``path`` (directory URLs): README.md at the root,
    docs/METHOD.md at docs/METHOD/, a notebook at notebooks/<name>/; any other file stays where it is."""
    if path == PurePosixPath("README.md"):
        return ""
    if path.name == "README.md":
        return f"{path.parent}/"
    if path.suffix in (".md", ".ipynb"):
        return f"{path.with_suffix('')}/"
    return str(path)


def localise(text: str, page: PurePosixPath, pages: set[PurePosixPath]) -> str:
    """A notebook's markdown links, made relative to its page's URL (notebooks/<name>/, one folder deeper than the
    file): links to other pages go to their URLs, pictures to their copies. (MkDocs does this for markdown pages,
    mkdocs-jupyter not for notebooks.)"""
    here = page_url(page)

    def fix(m: re.Match[str]) -> str:
        found = _relative_target(m, page)
        if found is None:
            return m.group(0)
        resolved, anchor = found
        if resolved not in pages and resolved.suffix != ".png":
            return m.group(0)
        url = os.path.relpath(page_url(resolved) or ".", here) + ("/" if resolved in pages else "")
        return f"{m.group(1)}{url.replace('.//', './')}{'#' + anchor if anchor else ''}{m.group(3)}"

    return LINK.sub(fix, text)


def assemble(executed: dict[Path, Path], repo: str) -> list[PurePosixPath]:
    """Lay out the site's source: the pages under their repository paths (the README as index.md), the pictures
    they show, the executed notebooks with the fast-mode note. Return the pages in reading order."""
    import nbformat

    for folder in ("docs", "figures", "results", "notebooks"):  # no page of an earlier, narrower build stays
        shutil.rmtree(SOURCE / folder, ignore_errors=True)
    markdown = {PurePosixPath("README.md"): PurePosixPath("index.md"),
                PurePosixPath("docs/METHOD.md"): PurePosixPath("docs/METHOD.md"),
                PurePosixPath("notebooks/README.md"): PurePosixPath("notebooks/README.md")}
    books = {PurePosixPath(p.relative_to(ROOT).as_posix()): target for p, target in executed.items()}
    pages = set(markdown) | set(books)
    shown: set[PurePosixPath] = set()
    for source, target in markdown.items():
        text = rewrite_links((ROOT / source).read_text(), source, pages, repo)
        if source.name == "README.md" and source.parent == PurePosixPath("."):
            text = text.replace("](README.md", "](index.md")
        shown |= {PurePosixPath(os.path.normpath(str(source.parent / m.group(2).split("#")[0])))
                  for m in LINK.finditer(text) if m.group(2).endswith(".png") and "://" not in m.group(2)}
        (SOURCE / target).parent.mkdir(parents=True, exist_ok=True)
        (SOURCE / target).write_text(text)
    for source, target in books.items():
        nb = nbformat.read(target, as_version=4)
        up = "../" if source.parent.name == "solutions" else ""
        nb.cells.insert(1, nbformat.v4.new_markdown_cell(FAST_NOTE.replace("](README.md)", f"]({up}README.md)")))
        for cell in nb.cells:
            if cell.cell_type == "markdown":
                cell.source = rewrite_links(cell.source, source, pages, repo)
                shown |= {PurePosixPath(os.path.normpath(str(source.parent / m.group(2).split("#")[0])))
                          for m in LINK.finditer(cell.source) if m.group(2).endswith(".png")}
                cell.source = localise(cell.source, source, pages)
        (SOURCE / source).parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, SOURCE / source)
    for picture in shown:
        if (ROOT / picture).is_file():
            (SOURCE / picture).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / picture, SOURCE / picture)
    order = [PurePosixPath("index.md"), PurePosixPath("docs/METHOD.md"), PurePosixPath("notebooks/README.md")]
    return order + sorted(books)


def mkdocs_config(pages: Sequence[PurePosixPath], repo: str) -> str:
    """The MkDocs configuration: Material theme without web fonts (the site works offline), the notebooks rendered
    as they were executed (mkdocs-jupyter, no second execution)."""

    def title(page: PurePosixPath) -> str:
        return page.stem.replace("_solutions", "").replace("_", " ")

    tutorial = [p for p in pages if p.parent == PurePosixPath("notebooks") and p.suffix == ".ipynb"]
    solutions = [p for p in pages if p.parent.name == "solutions"]
    lines = ["site_name: dmdd, DMDD step by step", f"repo_url: {repo}", "docs_dir: site-src", "site_dir: site",
             "theme:", "  name: material", "  font: false", "plugins:", "  - search", "  - mkdocs-jupyter:",
             "      execute: false", "      include_source: true", "      ignore_h1_titles: true",
             "markdown_extensions:", "  - tables", "  - toc:", "      permalink: true",
             "nav:", "  - Home: index.md", "  - Method card: docs/METHOD.md",
             "  - Tutorial:", "      - Overview: notebooks/README.md"]
    lines += [f"      - '{title(p)}': {p}" for p in tutorial]
    lines += ["  - Solutions:"] + [f"      - '{title(p)}': {p}" for p in solutions]
    return "\n".join(lines) + "\n"


def build(force: bool = False, timeout: int = 1800, pattern: str = "[0-9][0-9]_*") -> Path:
    """Execute the notebooks that changed, assemble the source and render build/site/; return its index.html."""
    repo = repository()
    os.environ.update({"DMDD_FAST": "1", "HF_HUB_OFFLINE": "1"})
    os.environ.setdefault("DMDD_RUNS", str(BUILD / "site-runs"))  # the tutorial model, trained once for all pages
    executed: dict[Path, Path] = {}
    started = time.perf_counter()
    for path in notebooks(pattern):
        target = BUILD / "executed" / path.relative_to(ROOT)
        if force or not target.is_file() or target.stat().st_mtime < path.stat().st_mtime:
            print(f"executing {path.relative_to(ROOT)} ...", end=" ", flush=True)
            print(f"{execute(path, target, timeout):.0f} s", flush=True)
        executed[path] = target
    pages = assemble(executed, repo)
    (BUILD / "mkdocs.yml").write_text(mkdocs_config(pages, repo))
    subprocess.run([sys.executable, "-m", "mkdocs", "build", "--quiet", "-f", str(BUILD / "mkdocs.yml")], check=True,
                   cwd=BUILD, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})  # its cache: build/.cache
    size = sum(f.stat().st_size for f in SITE.rglob("*") if f.is_file())
    print(f"site built in {time.perf_counter() - started:.0f} s: {SITE}/index.html ({size / 2**20:.1f} MiB, "
          f"{len(pages)} pages)")
    return SITE / "index.html"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="execute every notebook again")
    parser.add_argument("--serve", action="store_true", help="then serve the site on http://127.0.0.1:8000")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds one cell may take (default 1800)")
    parser.add_argument("--notebooks", default="[0-9][0-9]_*", metavar="PATTERN",
                        help="only the notebooks whose name matches (a glob, e.g. '0[0-2]_*'; default: all)")
    args = parser.parse_args(argv)
    build(args.force, args.timeout, args.notebooks)
    if args.serve:
        subprocess.run([sys.executable, "-m", "http.server", "8000", "--bind", "127.0.0.1", "--directory", str(SITE)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
