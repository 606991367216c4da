"""The rendered site (tools/site.py, ``make docs``).

The link rules run everywhere. Building the site executes every notebook and its solutions, so the browser test
runs under ``make docs-test`` (DMDD_SITE_TEST=1), not in the suite's every run: it builds the site, serves it on
localhost, opens every notebook page in headless Chromium (Debian's ``chromium``) and checks that each page shows
its figures and no error output, and that every picture and link of a page loads; it saves screenshots of three
pages in docs/site_screenshots/."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _tool():
    spec = importlib.util.spec_from_file_location("site_tool", ROOT / "tools" / "site.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_links_to_pages_and_pictures_stay_and_other_files_point_at_the_repository() -> None:
    site = _tool()
    repo = "https://example.org/r"
    pages = {PurePosixPath("README.md"), PurePosixPath("docs/METHOD.md"), PurePosixPath("notebooks/00_quickstart.ipynb"),
             PurePosixPath("notebooks/01_data_and_anomaly_synthesis.ipynb")}
    text = ("[card](docs/METHOD.md#6-presets) ![map](figures/method_map.png) [model](dmdd_core/model.py) "
            "[results](results/real_data/) [web](https://x.org/a) [here](#top) [gone](no/such/file.py)")
    assert site.rewrite_links(text, PurePosixPath("README.md"), pages, repo) == (
        "[card](docs/METHOD.md#6-presets) ![map](figures/method_map.png) "
        f"[model]({repo}/blob/main/dmdd_core/model.py) [results]({repo}/tree/main/results/real_data) "
        "[web](https://x.org/a) [here](#top) [gone](no/such/file.py)")
    # from a notebook: its neighbours are pages, the package's files are on the repository
    assert site.rewrite_links("[next](01_data_and_anomaly_synthesis.ipynb) [code](../dmdd_core/losses.py)",
                              PurePosixPath("notebooks/00_quickstart.ipynb"), pages, repo) == (
        f"[next](01_data_and_anomaly_synthesis.ipynb) [code]({repo}/blob/main/dmdd_core/losses.py)")
    # a notebook's page sits one folder deeper than its file: its links and pictures are moved along
    assert site.localise("![m](../figures/method_map.png) [n](01_data_and_anomaly_synthesis.ipynb) [c](../docs/METHOD.md#6) "
                         "[r](../README.md)", PurePosixPath("notebooks/00_quickstart.ipynb"), pages) == (
        "![m](../../figures/method_map.png) [n](../01_data_and_anomaly_synthesis/) [c](../../docs/METHOD/#6) [r](../../)")
    config = site.mkdocs_config([PurePosixPath("index.md"), PurePosixPath("notebooks/00_quickstart.ipynb"),
                                 PurePosixPath("notebooks/solutions/00_quickstart_solutions.ipynb")], repo)
    assert "      - '00 quickstart': notebooks/00_quickstart.ipynb" in config
    assert "  - Solutions:\n      - '00 quickstart': notebooks/solutions/00_quickstart_solutions.ipynb" in config
    assert "execute: false" in config and "font: false" in config


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


def _chromium(*args: str, user_data: Path) -> str:
    done = subprocess.run(["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={user_data}", *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(os.environ.get("DMDD_SITE_TEST") != "1", reason="make docs-test builds and opens the site")
def test_every_notebook_page_shows_its_figures_and_no_error_in_a_real_browser(tmp_path: Path) -> None:
    if shutil.which("chromium") is None:
        pytest.fail("Chromium is needed: apt-get install chromium (make docs-test installs it)")
    site = _tool()
    index = site.build()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(index.parent)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        books = site.notebooks()
        assert len([b for b in books if b.parent.name == "notebooks"]) == 9
        for book in books:
            page = book.relative_to(ROOT / "notebooks").with_suffix("").as_posix()
            dom = _chromium("--virtual-time-budget=8000", "--dump-dom", f"{base}/notebooks/{page}/",
                            user_data=tmp_path / "chromium")
            assert "jp-Notebook" in dom, page
            assert "Traceback (most recent call last)" not in dom and 'class="ansi-red-fg"' not in dom, page
            figures = len(re.findall(r'<img[^>]+src="data:image/png', dom))
            plots = "plt.show()" in book.read_text() or "display(fig" in book.read_text()
            assert figures >= (1 if plots else 0), f"{page}: no figure shown"
            linked = set(re.findall(r'<img[^>]+src="([^":]+\.png)"', dom))  # pictures the page shows
            linked |= {h.split("#")[0] for h in re.findall(r'<a[^>]+href="([^":#][^":]*)"', dom)}  # its links
            for target in linked - {""}:
                url = urllib.parse.urljoin(f"{base}/notebooks/{page}/", target)
                try:
                    with urllib.request.urlopen(url):
                        pass
                except urllib.error.HTTPError as err:
                    pytest.fail(f"{page}: {target} -> {err.code}")
        shots = ROOT / "docs" / "site_screenshots"  # committed: what the site looks like
        shots.mkdir(parents=True, exist_ok=True)
        for name, path in (("index", ""), ("00_quickstart", "notebooks/00_quickstart/"),
                           ("04_dual_modeling_distillation", "notebooks/04_dual_modeling_distillation/")):
            _chromium("--window-size=1280,1800", "--virtual-time-budget=8000", f"--screenshot={shots / name}.png",
                      f"{base}/{path}", user_data=tmp_path / "chromium")
            assert (shots / f"{name}.png").stat().st_size > 20_000
    finally:
        server.shutdown()
