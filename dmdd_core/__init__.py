"""dmdd_core: DMDD (Dual-Modeling Decouple Distillation, ACM MM 2024) for unsupervised anomaly detection.

Read in the order the data flows: ``config`` -> ``data`` and ``synthesis`` -> ``model`` and ``losses`` ->
``train`` (steps, run state, loop) -> ``fit`` (one category, end to end) -> ``infer`` -> ``metrics`` and
``protocol`` -> ``plots``. Above them: ``runner`` (the task runner) under ``report`` (quickstart), ``benchmark``
and ``ablation``; ``cli`` wires them together.
"""

from .config import DMDDConfig, is_fast_mode
from .model import DMDD, DMDDOutput

__all__ = ["DMDD", "DMDDConfig", "DMDDOutput", "is_fast_mode", "__version__"]
__version__ = "0.1.0"
