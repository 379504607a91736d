"""Lloyd-Max codebooks for one coordinate of a uniformly random unit vector.

After a random rotation, each coordinate ``x`` of a unit vector in R^dim has the density

    f(x) = (1 - x^2)^((dim - 3) / 2) / B(1/2, (dim - 1) / 2),   x in [-1, 1],

(close to N(0, 1/dim) for large dim). TurboQuant quantizes each coordinate with the optimal
(Lloyd-Max) scalar quantizer for f. Every quantity the iteration needs has a closed form here:

    P(l < x < u)        = I_{(u+1)/2}(a, a) - I_{(l+1)/2}(a, a),           a = (dim - 1) / 2
    E[x; l < x < u]     = ((1 - l^2)^a - (1 - u^2)^a) / ((dim - 1) B(1/2, a))

so the solve is exact up to float64 rounding (no quadrature error), and the distortion follows from
E[x^2] = 1/dim and the centroid condition: dim * E[(x - Q(x))^2] = 1 - dim * sum_i p_i c_i^2.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from scipy import optimize, special

SUPPORTED_BITS = (1, 2, 3, 4, 8)
_TOLERANCE = 1e-11  # max |Lloyd step(c) - c| accepted, float64
_LLOYD_WARMUP = 100


def _check_dim_bits(dim: int, bits: int) -> None:
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 2:
        raise ValueError(f"dim must be an int >= 2, got {dim!r}")
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def _mass_and_moment(edges: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Probability mass and first moment of f on each interval [edges[i], edges[i+1]]."""
    a = (dim - 1) / 2
    cdf = special.betainc(a, a, (edges + 1.0) / 2.0)
    mass = np.diff(cdf)
    # (1 - x^2)^a, the antiderivative of x f(x) up to the constant below.
    tail = np.power(np.clip(1.0 - edges * edges, 0.0, None), a)
    moment = -np.diff(tail) / ((dim - 1) * special.beta(0.5, a))
    return mass, moment


def _lloyd_step(centroids: np.ndarray, dim: int) -> np.ndarray:
    """One Lloyd-Max update: each centroid moves to the conditional mean of its interval."""
    boundaries = (centroids[1:] + centroids[:-1]) / 2
    mass, moment = _mass_and_moment(np.concatenate(([-1.0], boundaries, [1.0])), dim)
    return moment / np.maximum(mass, 1e-300)


@functools.lru_cache(maxsize=None)
def _solve(dim: int, bits: int) -> tuple[np.ndarray, np.ndarray, float]:
    levels = 1 << bits
    # Start from the high-resolution optimum (Panter-Dite: quantiles of f^(1/3)); f^(1/3) is again
    # of the form (1 - x^2)^(a' - 1) with a' = (dim + 3) / 6, whose quantiles are beta quantiles.
    probs = (np.arange(levels) + 0.5) / levels
    shape = (dim + 3) / 6
    centroids = 2 * special.betaincinv(shape, shape, probs) - 1
    for _ in range(_LLOYD_WARMUP):
        centroids = _lloyd_step(centroids, dim)
    # Plain Lloyd converges slowly with many levels (thousands of steps at 8 bits); a root solve of
    # the fixed-point equation from the warm start reaches float64 precision in a fraction of a second.
    solution = optimize.root(lambda c: _lloyd_step(c, dim) - c, centroids, method="hybr", options={"xtol": 1e-14})
    centroids = solution.x
    centroids = (centroids - centroids[::-1]) / 2  # the density is symmetric, so is the optimum
    residual = np.max(np.abs(_lloyd_step(centroids, dim) - centroids))
    if not residual < _TOLERANCE or np.any(np.diff(centroids) <= 0):  # pragma: no cover
        raise RuntimeError(f"Lloyd-Max did not converge for dim={dim}, bits={bits} (residual {residual:.2e})")
    boundaries = (centroids[1:] + centroids[:-1]) / 2
    mass, _ = _mass_and_moment(np.concatenate(([-1.0], boundaries, [1.0])), dim)
    distortion = float(1.0 - dim * np.sum(mass * centroids * centroids))
    return centroids, boundaries, distortion


def codebook(dim: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd-Max quantizer for one coordinate of a random unit vector in R^dim.

    Args:
        dim: vector dimension (>= 2); the density is (1 - x^2)^((dim-3)/2) on [-1, 1].
        bits: 1, 2, 3, 4 or 8.
    Returns:
        centroids: (2**bits,) float32, ascending; boundaries: (2**bits - 1,) float32, the midpoints
        between neighbouring centroids (a coordinate maps to the centroid of its interval).
    Solved once per (dim, bits) and cached in memory; the centroids are a fixed point of the
    Lloyd-Max update to 1e-11 (float64).
    """
    _check_dim_bits(dim, bits)
    centroids, boundaries, _ = _solve(dim, bits)
    return (
        torch.tensor(centroids, dtype=torch.float32),
        torch.tensor(boundaries, dtype=torch.float32),
    )


def codebook_distortion(dim: int, bits: int) -> float:
    """Per-vector MSE of the codebook, dim * E[(x - Q(x))^2] for a random unit vector (float64)."""
    _check_dim_bits(dim, bits)
    return _solve(dim, bits)[2]
