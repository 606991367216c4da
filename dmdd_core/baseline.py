"""A naive baseline reported beside every evaluation: how far each pixel is from the average training image.

Per pixel and channel, the training images give a mean and a standard deviation; a test pixel's anomaly value
is its z-score summed over channels, smoothed by a Gaussian; the image score is the top-k mean, as for DMDD.
If this baseline scores nearly as well as the model, the test set is too easy to show anything. [ours]
"""

from __future__ import annotations

import numpy as np
from torch import Tensor
from torchvision.transforms.functional import gaussian_blur

from .model import top_k_score


class MeanImageBaseline:
    """Fit on normal images (N,3,H,W) in [0,1]; predict anomaly maps (N,H,W) and scores (N,)."""

    def __init__(self, sigma: float = 2.0, top_k: int = 100) -> None:
        self.sigma, self.top_k = sigma, top_k
        self.mean: Tensor | None = None
        self.std: Tensor | None = None

    def fit(self, images: Tensor) -> MeanImageBaseline:
        if images.ndim != 4 or images.shape[0] < 2:
            raise ValueError(f"need at least two training images (N,3,H,W); got shape {tuple(images.shape)}")
        self.mean = images.mean(0, keepdim=True)
        self.std = images.std(0, keepdim=True).clamp_min(1e-3)
        return self

    def predict(self, images: Tensor) -> tuple[np.ndarray, np.ndarray]:
        if self.mean is None or self.std is None:
            raise RuntimeError("call fit() before predict()")
        z = ((images - self.mean) / self.std).abs().sum(1, keepdim=True)  # (N,1,H,W)
        kernel = 2 * int(3 * self.sigma) + 1
        smooth = gaussian_blur(z, [kernel, kernel], [self.sigma, self.sigma])
        h, w = images.shape[-2:]
        k = max(1, round(self.top_k * h * w / 256**2))
        return smooth[:, 0].numpy().astype(np.float32), top_k_score(smooth, k).numpy()

