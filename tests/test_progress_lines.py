"""Progress where no bar can show: a training whose stderr goes to a file prints one plain line every N steps
(step, stage, losses, steps/s, time left), and an evaluation one line per phase. Checked on the real output of a
short command-line run with stderr sent to a file."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

from dmdd_core.config import log_every, plain_progress

STEP_LINE = re.compile(r"^DMDD brick step (\d+)/4 \(\d+%\) stage ([12]): (\w+ \d+\.\d{4} ?)+ \| [\d.]+ steps/s \| "
                       r"about \d+ (s|min \d+ s) left$")


def test_a_run_logged_to_a_file_prints_step_and_phase_lines(builtin_root: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DMDD_FAST", "CI")}  # a user's plain run
    env["DMDD_LOG_EVERY"] = "1"
    with open(tmp_path / "stderr.log", "w") as log:  # not a terminal
        subprocess.run([sys.executable, "-m", "dmdd_core", "train", "--preset", "smoke", "--teacher",
                        "tf_efficientnet_lite0", "--device", "cpu", "--data", str(builtin_root), "--category", "brick",
                        "--out", str(tmp_path / "run"), "--evaluate"], stderr=log, stdout=subprocess.DEVNULL,
                       env=env, check=True, timeout=600)
    lines = (tmp_path / "stderr.log").read_text().splitlines()
    steps = [m for m in map(STEP_LINE.match, lines) if m]
    assert [(int(m.group(1)), m.group(2)) for m in steps] == [(1, "1"), (2, "1"), (3, "2"), (4, "2")]
    assert all(f" {k} " in steps[0].group(0) for k in ("ngm", "aim", "loss"))  # stage 1's losses
    assert all(f" {k} " in steps[3].group(0) for k in ("focal", "l1", "loss"))  # stage 2's
    assert any(re.match(r"^DMDD brick step 4: validation image AUROC \d\.\d{4}, pixel AUROC \d\.\d{4}$", x) for x in lines)
    phases = [x.split(": ", 1)[1] for x in lines if x.startswith("evaluate brick (test): ")]
    assert [p.split(" ")[0] for p in phases] == ["reading", "predicting", "fitting", "metrics", "done"]
    assert not any("\r" in x or "it/s]" in x for x in lines)  # no progress bar drawn into the file


def test_lines_only_where_no_terminal_or_notebook_shows_a_bar(monkeypatch) -> None:  # noqa: ANN001
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("DMDD_FAST", raising=False)
    monkeypatch.delenv("CI", raising=False)
    assert plain_progress(None, io.StringIO()) and not plain_progress(None, Terminal())
    assert not plain_progress(False, io.StringIO())
    monkeypatch.setenv("CI", "true")  # CI logs stay quiet unless asked
    assert not plain_progress(None, io.StringIO()) and plain_progress(True, io.StringIO())
    assert log_every(1400) == 70 and log_every(4) == 1
    monkeypatch.setenv("DMDD_LOG_EVERY", "25")
    assert log_every(1400) == 25
