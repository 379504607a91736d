"""Lloyd-Max codebook for one coordinate of a random unit vector, checked against independent math.

The references here never call the library's closed forms: conditional means and the distortion are
recomputed by adaptive quadrature (scipy.integrate.quad) of the unnormalized density
(1 - x^2)^((d-3)/2), the Gaussian limit is solved separately with scipy.stats.norm, and the special
cases (d = 3, 1 bit) use textbook formulas.
"""

import math
import time

import numpy as np
import pytest
import torch
from scipy import integrate, optimize, stats

from turboquant_hf import codebook, codebook_distortion
from turboquant_hf.lloyd_max import _solve

DIMS = (64, 80, 96, 112, 128, 256)
BITS = (1, 2, 3, 4, 8)
ALL = [(dim, bits) for dim in DIMS for bits in BITS]


def _density(dim):
    """Unnormalized density of one coordinate of a uniform unit vector in R^dim."""
    exponent = (dim - 3) / 2
    return lambda x: (1.0 - x * x) ** exponent


def _quad(fn, lo, hi):
    value, _ = integrate.quad(fn, lo, hi, epsabs=0.0, epsrel=1e-13, limit=200)
    return value


def _edges(centroids):
    return np.concatenate(([-1.0], (centroids[1:] + centroids[:-1]) / 2, [1.0]))


def _lloyd_step_by_quadrature(centroids, dim):
    """Conditional mean of each nearest-centroid interval, by quadrature (normalization cancels)."""
    f = _density(dim)
    edges = _edges(centroids)
    return np.array([_quad(lambda x: x * f(x), lo, hi) / _quad(f, lo, hi) for lo, hi in zip(edges[:-1], edges[1:])])


def _distortion_by_quadrature(centroids, dim):
    """dim * E[(x - Q(x))^2] for x with the coordinate density, by quadrature."""
    f = _density(dim)
    edges = _edges(centroids)
    intervals = zip(edges[:-1], edges[1:], centroids)
    total = sum(_quad(lambda x, c=c: (x - c) ** 2 * f(x), lo, hi) for lo, hi, c in intervals)
    return dim * total / _quad(f, -1.0, 1.0)


def _gaussian_lloyd_max(bits):
    """Lloyd-Max distortion for N(0, 1) with 2**bits levels (the dim -> infinity limit)."""

    def step(c):
        edges = np.concatenate(([-np.inf], (c[1:] + c[:-1]) / 2, [np.inf]))
        return -np.diff(stats.norm.pdf(edges)) / np.diff(stats.norm.cdf(edges))

    levels = 1 << bits
    c = stats.norm.ppf((np.arange(levels) + 0.5) / levels)
    for _ in range(200):
        c = step(c)
    c = optimize.root(lambda c: step(c) - c, c, method="hybr", options={"xtol": 1e-15}).x
    assert np.max(np.abs(step(c) - c)) < 1e-12
    edges = np.concatenate(([-np.inf], (c[1:] + c[:-1]) / 2, [np.inf]))
    return 1.0 - float(np.sum(np.diff(stats.norm.cdf(edges)) * c * c))


@pytest.mark.parametrize("dim, bits", ALL)
def test_shapes_order_symmetry_and_midpoints(dim, bits):
    """2**bits ascending float32 centroids, symmetric about 0, boundaries are the midpoints (to float32)."""
    centroids, boundaries = codebook(dim, bits)
    assert centroids.dtype == boundaries.dtype == torch.float32
    assert centroids.shape == (2**bits,) and boundaries.shape == (2**bits - 1,)
    assert torch.all(centroids[1:] > centroids[:-1])
    assert torch.equal(centroids, -centroids.flip(0))
    midpoints = (centroids[1:].double() + centroids[:-1].double()) / 2
    torch.testing.assert_close(boundaries.double(), midpoints, rtol=2**-23, atol=0)  # one float32 ulp
    assert torch.equal(boundaries, -boundaries.flip(0))
    assert -1 < centroids[0] and centroids[-1] < 1


@pytest.mark.parametrize("dim, bits", ALL)
def test_centroids_are_lloyd_fixed_point_by_quadrature(dim, bits):
    """Every centroid is the conditional mean of its interval, recomputed by quadrature, to 1e-10.

    The float64 solution is checked (the returned float32 values are its rounding, checked below):
    float32 rounding alone moves centroids by up to ~1.5e-8, so a 1e-8 check on them would test rounding.
    """
    solved = _solve(dim, bits)[0]
    assert np.max(np.abs(_lloyd_step_by_quadrature(solved, dim) - solved)) < 1e-10
    assert torch.equal(codebook(dim, bits)[0], torch.tensor(solved, dtype=torch.float32))


@pytest.mark.parametrize("dim, bits", ALL)
def test_distortion_matches_quadrature(dim, bits):
    """codebook_distortion equals dim * E[(x - Q(x))^2] integrated numerically, to 1e-9 relative."""
    centroids = codebook(dim, bits)[0].double().numpy()
    expected = _distortion_by_quadrature(centroids, dim)
    assert codebook_distortion(dim, bits) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("bits", BITS)
def test_dim3_is_uniform_quantizer(bits):
    """At dim=3 the coordinate is uniform on [-1, 1]: uniform quantizer, distortion 3 * step^2 / 12."""
    step = 2 / 2**bits
    expected = -1 + step / 2 + step * torch.arange(2**bits, dtype=torch.float64)
    centroids, _ = codebook(3, bits)
    torch.testing.assert_close(centroids.double(), expected, rtol=0, atol=1e-7)
    assert codebook_distortion(3, bits) == pytest.approx(3 * step**2 / 12, rel=1e-9)


def test_dim3_one_bit_closed_form():
    """dim=3, 1 bit: centroids +-1/2 and distortion 1/4."""
    assert codebook(3, 1)[0].tolist() == [-0.5, 0.5]
    assert codebook_distortion(3, 1) == pytest.approx(0.25, rel=1e-12)


@pytest.mark.parametrize("dim", (*DIMS, 1024, 65536))
def test_one_bit_centroid_is_mean_absolute_value(dim):
    """1 bit: centroid = E|x| = 2 / ((d-1) B(1/2, (d-1)/2)) exactly (to float32 rounding)."""
    a = (dim - 1) / 2
    log_beta = math.lgamma(0.5) + math.lgamma(a) - math.lgamma(0.5 + a)
    mean_abs = 2 / ((dim - 1) * math.exp(log_beta))
    assert codebook(dim, 1)[0][1].item() == pytest.approx(mean_abs, rel=1e-7)


def test_one_bit_centroid_gaussian_limit():
    """At dim=65536, centroid * sqrt(dim) equals sqrt(2/pi) (Gaussian E|z|) to 4 digits."""
    dim = 65536
    assert abs(codebook(dim, 1)[0][1].item() * math.sqrt(dim) - math.sqrt(2 / math.pi)) < 5e-5


# Paper (Thm. 1): D_mse ~ 0.36, 0.117, 0.03, 0.009 for b = 1..4. These are the Gaussian-limit values
# rounded to 1-3 significant digits; at d=128 the exact values are 0.3609, 0.1160, 0.03397, 0.009315
# (+0.3%, -0.9%, +13%, +3.5%). 15% is what the paper's one-digit "0.03" (for 0.0345) allows.
@pytest.mark.parametrize("bits, paper", [(1, 0.36), (2, 0.117), (3, 0.03), (4, 0.009)])
def test_paper_values_at_dim_128(bits, paper):
    """d * MSE at d=128 is within 15% of the values quoted in the paper."""
    assert codebook_distortion(128, bits) == pytest.approx(paper, rel=0.15)


@pytest.mark.parametrize("bits", (1, 2, 3, 4))
def test_distortion_increases_with_dim_towards_gaussian(bits):
    """d * MSE grows with dim and stays below the Gaussian Lloyd-Max limit."""
    values = [codebook_distortion(dim, bits) for dim in (64, 128, 256, 1024, 65536)]
    assert all(lo < hi for lo, hi in zip(values, values[1:]))
    assert values[-1] < _gaussian_lloyd_max(bits)


# Classic Lloyd-Max table (Max 1960) for N(0, 1). Its last digits are slightly off (an independent solve
# gives 0.363380, 0.117482, 0.034548, 0.009501), hence 5e-4 here and the tight test below.
@pytest.mark.parametrize("bits, table", [(1, 0.3634), (2, 0.1175), (3, 0.03454), (4, 0.009497)])
def test_large_dim_matches_gaussian_lloyd_max(bits, table):
    """At dim=65536 the distortion is the Gaussian Lloyd-Max one (O(1/dim) gap, ~4e-5)."""
    value = codebook_distortion(65536, bits)
    assert value == pytest.approx(_gaussian_lloyd_max(bits), rel=1e-4)
    assert value == pytest.approx(table, rel=5e-4)


def test_one_bit_gaussian_limit_closed_form():
    """1-bit Gaussian Lloyd-Max distortion is 1 - 2/pi; dim=65536 is within 1e-4 of it."""
    assert _gaussian_lloyd_max(1) == pytest.approx(1 - 2 / math.pi, rel=1e-12)
    assert codebook_distortion(65536, 1) == pytest.approx(1 - 2 / math.pi, rel=1e-4)


@pytest.mark.parametrize("dim", [1, 0, -8, 2.0, True, "128", None])
def test_bad_dim_raises(dim):
    """Invalid dim raises ValueError naming dim, from both entry points."""
    with pytest.raises(ValueError, match="dim"):
        codebook(dim, 2)
    with pytest.raises(ValueError, match="dim"):
        codebook_distortion(dim, 2)


@pytest.mark.parametrize("bits", [0, 5, 6, 7, 16, -1, 2.0, True, "2", None])
def test_bad_bits_raises(bits):
    """Invalid bits raises ValueError naming bits, from both entry points (also when (64, 2) is cached)."""
    codebook(64, 2)  # a cached (64, 2) solve must not make (64, 2.0) look valid
    with pytest.raises(ValueError, match="bits"):
        codebook(64, bits)
    with pytest.raises(ValueError, match="bits"):
        codebook_distortion(64, bits)


def test_solve_is_cached():
    """A second call hits the in-memory cache and is fast."""
    dim, bits = 200, 8  # not used elsewhere in the suite, so the first call really solves
    codebook(dim, bits)
    hits = _solve.cache_info().hits
    start = time.perf_counter()
    again = codebook(dim, bits)
    elapsed = time.perf_counter() - start
    assert _solve.cache_info().hits == hits + 1
    assert elapsed < 0.01
    assert torch.equal(again[0], codebook(dim, bits)[0])
