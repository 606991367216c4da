"""Draw the map of the method (``dmdd_core.plots.method_map``) into figures/method_map.png, the picture the README
and notebook 00 show.

    python tools/method_map.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from dmdd_core.plots import method_map, save_figure  # noqa: E402

if __name__ == "__main__":
    print(save_figure(method_map(), "method_map", Path(__file__).resolve().parents[1] / "figures"))
