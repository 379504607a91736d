"""Property tests (hypothesis) of the public API: TurboQuantLayer.update over random shapes, dtypes, bits, windows
and chunkings, with zero vectors, huge and tiny norms and NaN/Inf; TurboQuantizer round trips.

Reproducible: derandomized (the examples depend only on the code), no example database. 200 examples per property.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from turboquant_hf import TurboQuantizer, TurboQuantLayer, codebook_distortion  # noqa: E402

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BITS = (1, 2, 3, 4, 8)
# Keys as they are: the per-vector bounds below hold for each vector's own norm (a centered key's error scales with
# |k - offset|, and a zero key no longer decodes to exact zeros).
RAW_KEYS = dict(center_keys=False)
HEAD_DIMS = (8, 16, 24, 32, 40, 64, 80)  # 24, 40, 80: not powers of two (the dense-rotation fallback)
# Largest |x_j| of a chunk's vectors, per dtype: ordinary, huge (past the fp32 sum of squares, or fp16's maximum)
# and tiny (past the fp32 sum of squares' underflow; fp16's subnormals). Each vector gets a factor in [0.1, 1] of it.
SCALES = {
    torch.float32: (1.0, 1e30, 1e-30, 1e-39),
    torch.bfloat16: (1.0, 1e30, 1e-30),
    torch.float16: (1.0, 65504.0, 1e-4),
}
# Per-vector bound on ||x~ - x||^2 / ||x||^2 as a multiple of codebook_distortion(dim, bits), from measured maxima over
# 200000 Gaussian vectors per (dim, bits) in HEAD_DIMS, doubled (max ratios 3.5, 3.8, 5.5, 11.8 and 223 at dim 40:
# the 8-bit codebook's outer cells are wide, so its rare tail errors dwarf its mean). Never above 2, which any
# norm-corrected reconstruction meets (it keeps the length, and the nearest centroids are positively correlated).
ERROR_FACTOR = {1: 8.0, 2: 8.0, 3: 12.0, 4: 25.0, 8: 500.0}
# Test vectors draw from seed + this offset (seeds < 2**31, so the sum stays below 2**32: torch's CPU generator keeps
# only a seed's low 32 bits): the dense rotation draws its Gaussian matrix from torch.Generator(seed), seed 0..3 here,
# and a vector equal to that matrix's first row is aligned with the rotation (errors of 26-850x the distortion).
DATA_SEED_OFFSET = 1_000_003


def error_bound(dim: int, bits: int, dtype: torch.dtype) -> tuple[float, float]:
    """(relative, absolute): ||x~ - x|| <= relative * ||x|| + absolute for a vector decoded into ``dtype``: the
    codebook's high-probability bound, two roundings of the output dtype, and its subnormal spacing per coordinate."""
    info = torch.finfo(dtype)
    codebook_part = math.sqrt(min(2.0, ERROR_FACTOR[bits] * codebook_distortion(dim, bits)))
    return codebook_part + 2 * info.eps, math.sqrt(dim) * info.smallest_normal * info.eps


def random_vectors(shape, dtype, scale, seed, zero_fraction=0.0) -> torch.Tensor:
    """Gaussian (..., D) vectors with max |x_j| = scale * U[0.1, 1] (rescaled in float64, then rounded to dtype);
    a ``zero_fraction`` of them exactly zero."""
    generator = torch.Generator().manual_seed(seed + DATA_SEED_OFFSET)
    x = torch.randn(*shape, generator=generator, dtype=torch.float64)
    factor = 0.1 + 0.9 * torch.rand((*shape[:-1], 1), generator=generator, dtype=torch.float64)
    x = x / x.abs().amax(dim=-1, keepdim=True) * factor * scale
    zero = torch.rand(tuple(shape[:-1]), generator=generator) < zero_fraction
    x[zero] = 0
    return x.to(dtype)


def assert_close_per_vector(decoded: torch.Tensor, dense: torch.Tensor, dim: int, bits: int, what: str) -> None:
    """Each (..., D) vector of decoded within error_bound of dense (in float64); zero vectors exactly zero."""
    relative, absolute = error_bound(dim, bits, dense.dtype)
    dense64, decoded64 = dense.double(), decoded.double()
    assert torch.isfinite(decoded64).all(), f"{what}: non-finite decode of finite input"
    lengths = dense64.norm(dim=-1)
    errors = (decoded64 - dense64).norm(dim=-1)
    worst = (errors - relative * lengths - absolute).max() if errors.numel() else torch.tensor(-1.0)
    assert worst <= 0, f"{what}: error beyond bound by {worst.item():.3g} (relative bound {relative:.3g})"
    zero = lengths == 0
    assert (decoded64[zero] == 0).all(), f"{what}: a zero vector did not decode to zeros"


@st.composite
def layer_runs(draw):
    """A layer configuration and the chunks of successive update calls (each with its own scale and zeros)."""
    dtype = draw(st.sampled_from(DTYPES))
    run = {
        "batch": draw(st.integers(1, 3)),
        "heads": draw(st.integers(1, 3)),
        "dim": draw(st.sampled_from(HEAD_DIMS)),
        "dtype": dtype,
        "key_bits": draw(st.sampled_from(BITS)),
        "value_bits": draw(st.sampled_from(BITS)),
        "residual_length": draw(st.integers(0, 40)),
        "chunks": draw(st.lists(st.integers(1, 40), min_size=1, max_size=6)),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }
    run["scales"] = [draw(st.sampled_from(SCALES[dtype])) for _ in run["chunks"]]
    run["zero_fraction"] = draw(st.sampled_from((0.0, 0.2)))
    return run


def chunk_states(run, index, size) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (run["batch"], run["heads"], size, run["dim"])
    seed = run["seed"] + 7919 * index
    scale = run["scales"][index]
    keys = random_vectors(shape, run["dtype"], scale, seed, run["zero_fraction"])
    values = random_vectors(shape, run["dtype"], scale, seed + 1, run["zero_fraction"])
    return keys, values


@FUZZ
@given(layer_runs())
def test_layer_update_returns_the_sequence(run):
    """After each update: (B, H, seq, D) states in the input dtype; the new tokens and the residual window (at least the
    last residual_length earlier tokens) exactly as given; older tokens within the codebook's bound of the input."""
    layer = TurboQuantLayer(run["key_bits"], run["value_bits"], residual_length=run["residual_length"], **RAW_KEYS)
    all_keys, all_values = [], []
    for index, size in enumerate(run["chunks"]):
        keys, values = chunk_states(run, index, size)
        before = sum(part.shape[2] for part in all_keys)
        all_keys.append(keys)
        all_values.append(values)
        dense_keys, dense_values = torch.cat(all_keys, dim=2), torch.cat(all_values, dim=2)
        returned_keys, returned_values = layer.update(keys, values)
        total = before + size
        assert returned_keys.shape == returned_values.shape == (run["batch"], run["heads"], total, run["dim"])
        assert returned_keys.dtype == returned_values.dtype == run["dtype"]
        assert layer.get_seq_length() == total
        exact_from = before - min(run["residual_length"], before)
        assert torch.equal(returned_keys[:, :, exact_from:], dense_keys[:, :, exact_from:])
        assert torch.equal(returned_values[:, :, exact_from:], dense_values[:, :, exact_from:])
        assert_close_per_vector(returned_keys[:, :, :exact_from], dense_keys[:, :, :exact_from], run["dim"],
                                run["key_bits"], "keys")
        assert_close_per_vector(returned_values[:, :, :exact_from], dense_values[:, :, :exact_from], run["dim"],
                                run["value_bits"], "values")


@FUZZ
@given(layer_runs(), st.data(), st.booleans())
def test_non_finite_token_stays_in_its_positions(run, data, center_keys):
    """A NaN/Inf in one token's key or value either raises a clear ValueError or spoils only that (B, H, t) vector:
    every other returned vector is finite and (keys not centered) bit-equal to a run where the bad token was clean."""
    chunk = data.draw(st.integers(0, len(run["chunks"]) - 1), label="bad chunk")
    b = data.draw(st.integers(0, run["batch"] - 1), label="batch")
    h = data.draw(st.integers(0, run["heads"] - 1), label="head")
    t = data.draw(st.integers(0, run["chunks"][chunk] - 1), label="token")
    j = data.draw(st.integers(0, run["dim"] - 1), label="coordinate")
    bad = data.draw(st.sampled_from((math.nan, math.inf, -math.inf)), label="bad value")
    in_keys = data.draw(st.booleans(), label="in keys")
    spoiled_layer, clean_layer = (TurboQuantLayer(run["key_bits"], run["value_bits"], residual_length=run["residual_length"],
                                                  center_keys=center_keys) for _ in range(2))
    bad_position = None
    for index, size in enumerate(run["chunks"]):
        keys, values = chunk_states(run, index, size)
        clean = clean_layer.update(keys, values)
        if index == chunk:
            target = keys if in_keys else values
            target = target.clone()
            target[b, h, t, j] = bad
            keys, values = (target, values) if in_keys else (keys, target)
            bad_position = clean[0].shape[2] - size + t
        try:
            spoiled = spoiled_layer.update(keys, values)
        except ValueError as error:  # a clear error is allowed
            assert "nan" in str(error).lower() or "inf" in str(error).lower() or "finite" in str(error).lower()
            return
        for name, got, want in (("keys", spoiled[0], clean[0]), ("values", spoiled[1], clean[1])):
            others = torch.ones(got.shape[:3], dtype=torch.bool)
            if bad_position is not None and (name == "keys") == in_keys:
                others[b, h, bad_position] = False
            assert torch.isfinite(got[others]).all(), f"{name}: a non-finite value leaked into another token"
            # Centered, the key offset is the mean of the finite keys: a non-finite key leaves its token out of it.
            if not (center_keys and name == "keys" and in_keys and bad_position is not None):
                assert torch.equal(got[others], want[others]), f"{name}: another token changed"


@FUZZ
@given(
    lead=st.lists(st.integers(0, 4), min_size=0, max_size=3),
    dim=st.sampled_from(HEAD_DIMS),
    bits_qjl=st.sampled_from([(b, False) for b in BITS] + [(2, True), (3, True), (4, True)]),
    dtype=st.sampled_from(DTYPES + (torch.float64,)),
    scale=st.sampled_from((1.0, 1e30, 1e-30, 1e-39, 65504.0, 1e-4)),
    zero_fraction=st.sampled_from((0.0, 0.3, 1.0)),
    seed=st.integers(0, 2**31 - 1),
)
def test_quantizer_round_trip(lead, dim, bits_qjl, dtype, scale, zero_fraction, seed):
    """quantize/dequantize keep the (..., dim) shape and the dtype, store fp32 finite scales for finite inputs that
    the dtype holds, decode finite, and keep zero vectors exactly zero."""
    bits, qjl = bits_qjl
    if dtype == torch.float16 and (scale > 65504 or scale < 1e-4) or scale < 1e-38 and dtype != torch.float32:
        scale = 1.0  # beyond what fp16 holds; bf16 subnormals are covered by float32's
    quantizer = TurboQuantizer(dim, bits, qjl=qjl, seed=seed % 4)
    x = random_vectors((*lead, dim), dtype, scale, seed, zero_fraction)
    q = quantizer.quantize(x)
    assert q.shape == x.shape and q.dtype == dtype and q.scales.dtype == torch.float32
    assert torch.isfinite(q.scales).all()
    restored = quantizer.dequantize(q)
    assert restored.shape == x.shape and restored.dtype == dtype
    assert torch.isfinite(restored).all()
    zero = (x == 0).all(dim=-1)
    assert (restored[zero] == 0).all()
    if not qjl:  # QJL's reconstruction targets inner products, not the MSE bound
        assert_close_per_vector(restored, x, dim, bits, "round trip")
