"""PaDiM, the classic baseline: its Gaussian fit and Mahalanobis distance against a hand computation in numpy,
and the whole baseline on images with a defect."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dmdd_core.model import Teacher
from dmdd_core.padim import PaDiM, gaussian_fit, mahalanobis


def _hand_distances(train: np.ndarray, test: np.ndarray, eps: float) -> np.ndarray:
    """Per position, with numpy only: np.cov of the N training vectors (ddof 1) + eps I, then
    sqrt(d^T inv d) for each test vector. ``train`` (N,D,H,W), ``test`` (M,D,H,W) -> (M,H,W)."""
    _, d, h, w = train.shape
    out = np.zeros((test.shape[0], h, w))
    for i in range(h):
        for j in range(w):
            samples = train[:, :, i, j]
            cov = np.cov(samples, rowvar=False, ddof=1) + eps * np.eye(d)
            inv = np.linalg.inv(cov)
            for m in range(test.shape[0]):
                diff = test[m, :, i, j] - samples.mean(0)
                out[m, i, j] = np.sqrt(diff @ inv @ diff)
    return out


@pytest.mark.parametrize("eps", [0.01, 0.5])
def test_gaussian_fit_and_mahalanobis_match_a_hand_computation(eps: float) -> None:
    rng = np.random.default_rng(0)
    # Correlated channels, so the covariance's off-diagonal terms matter.
    base = rng.normal(size=(7, 3, 2, 3))
    train = np.concatenate([base, base[:, :1] * 0.8 + 0.1 * rng.normal(size=(7, 1, 2, 3))], axis=1)
    test = rng.normal(size=(4, 4, 2, 3)) * 2
    mean, inv_cov = gaussian_fit([torch.from_numpy(train).float()], eps=eps)
    np.testing.assert_allclose(mean.numpy(), train.mean(0).transpose(1, 2, 0).reshape(6, 4), rtol=1e-5, atol=1e-6)
    got = mahalanobis(torch.from_numpy(test).float(), mean, inv_cov).numpy()
    np.testing.assert_allclose(got, _hand_distances(train, test, eps), rtol=1e-3)
    # Fitting batch by batch accumulates the same sums.
    batched = gaussian_fit([torch.from_numpy(train[:3]).float(), torch.from_numpy(train[3:]).float()], eps=eps)
    np.testing.assert_allclose(batched[1].numpy(), inv_cov.numpy(), rtol=1e-4, atol=1e-5)


def test_gaussian_fit_needs_two_images() -> None:
    with pytest.raises(ValueError, match="at least two training images"):
        gaussian_fit([torch.zeros(1, 3, 2, 2)])


def test_padim_finds_a_bright_square_and_keeps_its_channel_choice() -> None:
    torch.manual_seed(0)
    teacher = Teacher("resnet18", pretrained=False)
    normal = 0.5 + 0.05 * torch.randn(12, 3, 64, 64)
    padim = PaDiM(teacher, dims=40, seed=3).fit(normal[:10])
    assert padim.fit_seconds > 0
    assert len(padim.channels) == 40 and padim.channels.unique().numel() == 40
    assert torch.equal(padim.channels, PaDiM(teacher, dims=40, seed=3).channels)
    defective = normal[10:].clone()
    defective[:, :, 20:36, 28:44] = 1.0
    maps, scores = padim.predict(torch.cat([normal[10:], defective]))
    assert maps.shape == (4, 64, 64) and scores.shape == (4,)
    assert scores[2:].min() > scores[:2].max()
    np.testing.assert_allclose(scores, maps.reshape(4, -1).max(1))
    # The map is highest inside the square.
    peak = np.unravel_index(maps[2].argmax(), maps[2].shape)
    assert 16 <= peak[0] < 40 and 24 <= peak[1] < 48


def test_padim_predict_before_fit_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="fit"):
        PaDiM(Teacher("resnet18", pretrained=False)).predict(torch.zeros(1, 3, 32, 32))
