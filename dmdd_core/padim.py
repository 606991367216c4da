"""PaDiM, the classic training-free baseline reported beside every evaluation, on DMDD's own teacher.

PaDiM (Defard et al., "PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection and Localization",
ICPR workshops 2021) models each position of a feature grid by a Gaussian fitted on the normal training images:

1. the teacher's three levels (strides 4, 8, 16) are upsampled to the stride-4 grid and concatenated;
2. ``dims`` of those channels are kept, drawn at random once (seeded) [PaDiM: 100 of ResNet18's 448];
3. at each position p, over the N training images: mean mu_p and covariance Sigma_p + eps * I [PaDiM: eps 0.01];
4. a test position's anomaly value is its Mahalanobis distance sqrt((x - mu_p)^T Sigma_p^-1 (x - mu_p));
5. the distance grid is upsampled bilinearly to the input size and smoothed by a Gaussian [PaDiM: sigma 4];
   the image score is the map's maximum [PaDiM].

It needs no training, only one pass of the teacher over the normal images, so it shows where DMDD stands: a
learned model that scores below it has not yet learned more than the teacher's features already say. [ours: its
place in every table]
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.functional import gaussian_blur

from .model import Teacher

PADIM_DIMS = 100
"""Channels kept after concatenating the three levels. [PaDiM: 100 for ResNet18]"""
PADIM_EPS = 0.01
"""Added to each covariance's diagonal so it can be inverted with fewer images than channels. [PaDiM]"""
PADIM_SIGMA = 4.0
"""Gaussian smoothing of the upsampled map, in input pixels. [PaDiM]"""


def gaussian_fit(batches: Iterable[Tensor], eps: float = PADIM_EPS) -> tuple[Tensor, Tensor]:
    """Batches (B,D,H,W) of normal images' features -> mean (H*W,D) and inverse covariance (H*W,D,D) per
    position: the covariance unbiased (divided by N - 1), ``eps`` on its diagonal. Sums of x and x x^T are
    accumulated in float64 batch by batch, so the features of all N images are never held at once."""
    n, total, outer = 0, None, None
    for batch in batches:
        b, d, h, w = batch.shape
        x = batch.double().permute(2, 3, 0, 1).reshape(h * w, b, d)  # (P,B,D)
        total = x.sum(1) if total is None else total + x.sum(1)
        outer = x.transpose(1, 2) @ x if outer is None else outer + x.transpose(1, 2) @ x
        n += b
    if n < 2 or total is None or outer is None:
        raise ValueError(f"PaDiM needs at least two training images to fit a covariance; got {n}")
    mean = total / n
    cov = (outer - n * mean[:, :, None] * mean[:, None, :]) / (n - 1)
    cov += eps * torch.eye(cov.shape[-1], dtype=torch.float64)
    return mean.float(), torch.linalg.inv(cov).float()


def mahalanobis(features: Tensor, mean: Tensor, inv_cov: Tensor) -> Tensor:
    """(M,D,H,W) features -> (M,H,W) Mahalanobis distance of each position to its own Gaussian."""
    m, d, h, w = features.shape
    diff = features.float().permute(0, 2, 3, 1).reshape(m, h * w, d) - mean  # (M,P,D)
    squared = torch.einsum("mpd,pde,mpe->mp", diff, inv_cov, diff)
    return squared.clamp_min(0).sqrt().reshape(m, h, w)


class PaDiM:
    """Fit on normal images (N,3,S,S) in [0,1]; predict anomaly maps (N,S,S) and scores (N,) like
    :class:`~dmdd_core.baseline.MeanImageBaseline`. ``fit_seconds`` is the time :meth:`fit` took (the teacher's
    pass over the training images included)."""

    def __init__(self, teacher: Teacher, dims: int = PADIM_DIMS, seed: int = 0, sigma: float = PADIM_SIGMA,
                 batch_size: int = 32) -> None:
        self.teacher, self.dims, self.seed, self.sigma, self.batch_size = teacher, dims, seed, sigma, batch_size
        total = sum(teacher.channels)
        generator = torch.Generator().manual_seed(seed)
        self.channels = torch.randperm(total, generator=generator)[: min(dims, total)].sort().values
        self.mean: Tensor | None = None
        self.inv_cov: Tensor | None = None
        self.fit_seconds = 0.0

    @torch.no_grad()
    def embed(self, images: Tensor) -> Iterator[Tensor]:
        """(N,3,S,S) in [0,1] -> batches (B,D,S/4,S/4): the teacher's levels at stride 4 (nearest upsampling),
        the kept channels, on the CPU."""
        device = self.teacher.mean.device
        for batch in images.split(self.batch_size):
            levels = self.teacher(self.teacher.normalize(batch.to(device)))
            size = levels[0].shape[-2:]
            grid = torch.cat([F.interpolate(f.float(), size=size, mode="nearest") for f in levels], dim=1)
            yield grid[:, self.channels.to(device)].cpu()

    def fit(self, images: Tensor) -> PaDiM:
        start = time.perf_counter()
        self.mean, self.inv_cov = gaussian_fit(self.embed(images))
        self.fit_seconds = time.perf_counter() - start
        return self

    def predict(self, images: Tensor) -> tuple[np.ndarray, np.ndarray]:
        if self.mean is None or self.inv_cov is None:
            raise RuntimeError("call fit() before predict()")
        size = images.shape[-2:]
        kernel = 2 * int(4 * self.sigma + 0.5) + 1
        maps = []
        for features in self.embed(images):
            distance = mahalanobis(features, self.mean, self.inv_cov)[:, None]
            upsampled = F.interpolate(distance, size=size, mode="bilinear", align_corners=False)
            maps.append(gaussian_blur(upsampled, [kernel, kernel], [self.sigma, self.sigma])[:, 0])
        result = torch.cat(maps)
        return result.numpy().astype(np.float32), result.flatten(1).amax(1).numpy().astype(np.float32)
