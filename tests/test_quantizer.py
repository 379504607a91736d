"""TurboQuantizer and QuantizedTensor: distortion, QJL unbiasedness, determinism, edge cases, errors."""

import math

import pytest
import torch

from turboquant_hf import QuantizedTensor, TurboQuantizer, codebook, codebook_distortion, unpack

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# (bits, qjl) pairs the quantizer accepts.
CONFIGS = [(1, False), (2, False), (3, False), (4, False), (8, False), (2, True), (3, True), (4, True)]


def unit_vectors(n, dim, generator):
    """n vectors uniform on the unit sphere of R^dim, float32."""
    x = torch.randn(n, dim, generator=generator)
    return x / x.norm(dim=-1, keepdim=True)


def assert_mean_close(samples, target, rel):
    """The sample mean is within ``rel`` of target, and ``rel`` is more than 5 standard errors wide."""
    samples = samples.double()
    mean = samples.mean().item()
    stderr = samples.std().item() / math.sqrt(samples.numel())
    assert rel * target > 5 * stderr, f"test too noisy: standard error {stderr:.3g} vs tolerance {rel * target:.3g}"
    assert abs(mean - target) < rel * target, f"mean {mean:.6g} vs expected {target:.6g} (+-{stderr:.2g})"


def expected_mse(dim: int, bits: int, norm_correction: bool = True) -> float:
    """E ||x - x~||^2 / ||x||^2 from the math alone, in float64: the codebook's distortion D for the MSE
    reconstruction; with norm correction, a Monte Carlo mean over 40000 points y uniform on the sphere (any rotation
    of such a point is another) of ||y - c / ||c|| ||^2, c = the centroid nearest to each coordinate of y."""
    if not norm_correction:
        return codebook_distortion(dim, bits)
    generator = torch.Generator().manual_seed(1000 + dim + bits)
    y = torch.randn(40000, dim, generator=generator, dtype=torch.float64)
    y = y / y.norm(dim=-1, keepdim=True)
    centroids = codebook(dim, bits)[0].half().double()  # TurboQuantizer's fp16-rounded codebook
    c = centroids[torch.bucketize(y, (centroids[1:] + centroids[:-1]) / 2)]
    return ((y - c / c.norm(dim=-1, keepdim=True)) ** 2).sum(-1).mean().item()


def all_tensors_equal(a: QuantizedTensor, b: QuantizedTensor) -> bool:
    return len(a.tensors()) == len(b.tensors()) and all(torch.equal(s, t) for s, t in zip(a.tensors(), b.tensors()))


# ---------------------------------------------------------------------------------------------- distortion


@pytest.mark.parametrize("bits", (1, 2, 3, 4))
@pytest.mark.parametrize("dim", (64, 96, 128, 256))
@pytest.mark.parametrize("random_norms", (False, True), ids=("unit", "random-norm"))
@pytest.mark.parametrize("norm_correction", (False, True), ids=("raw", "corrected"))
def test_mse_matches_codebook_distortion(dim, bits, random_norms, norm_correction, generator):
    """Mean ||x - x~||^2 / ||x||^2 over 20000 random vectors is within 3% of codebook_distortion (raw norms,
    the paper's quantizer) or of the float64 norm-corrected reference (expected_mse); corrected reconstructions
    keep each vector's length. (Correction lowers the MSE at 3-4 bits, the norm being known, and raises it at 1.)

    The standard error is at most ~0.25% of the target at these sizes, so 3% is > 10 standard errors.
    dim=96 exercises the dense fallback rotation.
    """
    x = unit_vectors(20000, dim, generator)
    if random_norms:
        x = x * torch.exp(torch.empty(20000, 1).uniform_(-5, 5, generator=generator))
    quantizer = TurboQuantizer(dim, bits, seed=1, norm_correction=norm_correction)
    restored = quantizer.dequantize(quantizer.quantize(x)).double()
    error = ((x.double() - restored) ** 2).sum(-1)
    assert_mean_close(error / (x.double() ** 2).sum(-1), expected_mse(dim, bits, norm_correction), rel=0.03)
    lengths = restored.norm(dim=-1) / x.double().norm(dim=-1)
    if norm_correction:
        assert torch.allclose(lengths, torch.ones_like(lengths), rtol=1e-5, atol=0)
    else:  # the MSE reconstruction is shorter on average: E ||c[i]||^2 = 1 - D (Lloyd-Max's centroid condition)
        assert abs((lengths**2).mean().item() - (1 - codebook_distortion(dim, bits))) < 0.01


@pytest.mark.parametrize("bits", (1, 2, 3, 4, 8))
def test_reconstruction_reads_the_packed_indices(bits, generator):
    """The per-byte lookup of rotated_reconstruction gives centroids[unpack(...)], also for a strided view."""
    quantizer = TurboQuantizer(64, bits, seed=4)
    q = quantizer.quantize(torch.randn(2, 3, 9, 64, generator=generator))[:, 1:, 2:7]
    centroids = quantizer.state(torch.device("cpu")).centroids
    expected = centroids[unpack(q.packed_indices, bits, 64)]
    assert torch.equal(quantizer.rotated_reconstruction(q), expected)


@pytest.mark.parametrize("bits", (1, 2, 3, 4, 8))
@pytest.mark.parametrize("dim", (64, 96))
def test_indices_are_nearest_centroids(dim, bits, generator):
    """Each rotated coordinate maps to its nearest centroid (checked against a brute-force argmin)."""
    quantizer = TurboQuantizer(dim, bits, seed=2)
    x = torch.randn(300, dim, generator=generator) * 7
    rotated = quantizer.rotation.rotate(x / x.norm(dim=-1, keepdim=True))
    chosen = quantizer.rotated_reconstruction(quantizer.quantize(x))
    centroids = quantizer.state(torch.device("cpu")).centroids
    nearest = (rotated.unsqueeze(-1) - centroids).abs().min(dim=-1).values
    assert torch.all((rotated - chosen).abs() <= nearest + 1e-6)


@pytest.mark.parametrize("bits", (1, 2, 3, 4, 8))
def test_centroids_are_the_codebook_rounded_to_float16(bits):
    """The kernels read the centroids as fp16: they must be fp16 values within 2^-11 of the Lloyd-Max ones."""
    state = TurboQuantizer(128, bits).state(torch.device("cpu"))
    centroids, boundaries = state.centroids, state.boundaries
    exact, _ = codebook(128, bits)
    assert torch.equal(centroids, centroids.half().float())
    assert torch.all((centroids - exact).abs() <= 2.0**-11 * exact.abs())
    assert torch.equal(boundaries, (centroids[1:] + centroids[:-1]) / 2)
    # Exactly symmetric, middle boundary 0: the encode kernel compares |y| with the positive half only.
    assert torch.equal(centroids, -centroids.flip(0)) and torch.equal(boundaries, -boundaries.flip(0))
    assert boundaries[2 ** (bits - 1) - 1] == 0


# ---------------------------------------------------------------------------------------------- QJL


@pytest.fixture
def single_thread():
    """Run thousands of tiny (1 x dim) ops on one thread: intra-op threads only add sync overhead there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _inner_product_estimates(dim, bits, qjl, key, query, seeds=400, norm_correction=None):
    estimates = []
    for seed in range(seeds):
        quantizer = TurboQuantizer(dim, bits, qjl=qjl, seed=seed, norm_correction=norm_correction)
        estimates.append(quantizer.inner_product(query[None], quantizer.quantize(key[None]))[0, 0].item())
    return torch.tensor(estimates, dtype=torch.float64)


def _z_score(estimates, exact):
    return (estimates.mean().item() - exact) / (estimates.std().item() / math.sqrt(estimates.numel()))


@pytest.fixture
def key_and_query():
    """A fixed key of norm ~3*sqrt(dim) and a query at ~45 degrees to it; exact score in float64.

    The correlation gives the test power: a 5% error in the QJL scale moves the 2-bit mean by ~5 sigma.
    """

    def make(dim):
        generator = torch.Generator().manual_seed(dim)
        key = torch.randn(dim, generator=generator) * 3
        query = key / key.norm() * math.sqrt(dim) + torch.randn(dim, generator=generator)
        return key, query, float(query.double() @ key.double())

    return make


@pytest.mark.parametrize("dim, bits", [(128, 2), (128, 3), (128, 4), (96, 3)])
def test_qjl_inner_product_is_unbiased(dim, bits, key_and_query, single_thread):
    """Over 400 seeds (rotation and projection), the QJL estimate averages to the exact <q, k>.

    Two-sided z test at 4 standard errors (estimated from the sample): false-positive rate ~6e-5.
    """
    key, query, exact = key_and_query(dim)
    estimates = _inner_product_estimates(dim, bits, True, key, query)
    assert abs(_z_score(estimates, exact)) < 4


def test_mse_only_inner_product_is_biased(key_and_query, single_thread):
    """The same test rejects the MSE-only estimator (3 bits, as QJL's MSE stage at 4 bits): it shrinks."""
    dim, bits = 128, 4
    key, query, exact = key_and_query(dim)
    estimates = _inner_product_estimates(dim, bits - 1, False, key, query, norm_correction=False)
    assert _z_score(estimates, exact) < -4


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_qjl_fields(bits, generator):
    """QJL stores dim/8 sign bytes and the float32 norm of the rotated residual y - c[i]."""
    dim = 64
    quantizer = TurboQuantizer(dim, bits, qjl=True, seed=3)
    mse_only = TurboQuantizer(dim, bits - 1, seed=3)
    x = torch.randn(50, dim, generator=generator)
    q = quantizer.quantize(x)
    assert quantizer.mse_bits == bits - 1 and q.mse_bits == bits - 1
    assert q.qjl_signs.shape == (50, dim // 8) and q.qjl_signs.dtype == torch.uint8
    assert q.residual_norms.shape == (50,) and q.residual_norms.dtype == torch.float32
    assert torch.equal(q.packed_indices, mse_only.quantize(x).packed_indices)
    rotated = quantizer.rotation.rotate(x / x.norm(dim=-1, keepdim=True))
    residual = rotated - mse_only.rotated_reconstruction(mse_only.quantize(x))
    torch.testing.assert_close(q.residual_norms, residual.norm(dim=-1), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("bits, qjl", CONFIGS)
def test_same_seed_same_bytes(bits, qjl, generator):
    """Two quantizers with the same seed produce identical bytes; another seed produces different ones."""
    x = torch.randn(64, 96, generator=generator)
    a = TurboQuantizer(96, bits, qjl=qjl, seed=5).quantize(x)
    b = TurboQuantizer(96, bits, qjl=qjl, seed=5).quantize(x)
    c = TurboQuantizer(96, bits, qjl=qjl, seed=6).quantize(x)
    assert all_tensors_equal(a, b)
    assert not torch.equal(a.packed_indices, c.packed_indices)


# ---------------------------------------------------------------------------------------------- dtypes and edge cases


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_input_dtypes(dtype, generator):
    """All float dtypes quantize like their float32 value, dequantize to their dtype, and meet the distortion."""
    quantizer = TurboQuantizer(128, 4, seed=0)
    x = unit_vectors(4000, 128, generator).to(dtype)
    q = quantizer.quantize(x)
    assert q.dtype == dtype and q.scales.dtype == torch.float32
    assert all_tensors_equal(q, quantizer.quantize(x.float()))
    restored = quantizer.dequantize(q)
    assert restored.dtype == dtype and restored.shape == x.shape
    assert quantizer.dequantize(q, torch.float64).dtype == torch.float64
    x64 = x.double()
    error = ((x64 - restored.double()) ** 2).sum(-1) / (x64**2).sum(-1)
    assert_mean_close(error, expected_mse(128, 4), rel=0.03)


@pytest.mark.parametrize("bits, qjl", CONFIGS)
@pytest.mark.parametrize("dtype", (torch.float16, torch.float32))
def test_zero_vectors(bits, qjl, dtype, generator):
    """Zero vectors decode to exact zeros, score exactly 0, and nothing stored is NaN/Inf."""
    quantizer = TurboQuantizer(64, bits, qjl=qjl, seed=0)
    x = torch.randn(6, 64, generator=generator).to(dtype)
    x[[1, 4]] = 0
    q = quantizer.quantize(x)
    assert all(torch.isfinite(t.float()).all() for t in q.tensors())
    restored = quantizer.dequantize(q)
    assert torch.isfinite(restored).all()
    assert torch.equal(restored[[1, 4]], torch.zeros(2, 64, dtype=dtype))
    scores = quantizer.inner_product(torch.randn(3, 64, generator=generator), q)
    assert torch.isfinite(scores).all() and torch.equal(scores[:, [1, 4]], torch.zeros(3, 2))


@pytest.mark.parametrize("bits", (2, 4))
@pytest.mark.parametrize("dtype", (torch.float16, torch.float32))
def test_huge_norm_vectors(bits, dtype, generator):
    """Coordinates ~1e4 (norm ~1.1e5, beyond the fp16 range) stay finite with the usual relative error."""
    quantizer = TurboQuantizer(128, bits, seed=0)
    x = (torch.randn(4000, 128, generator=generator).clamp(-6, 6) * 1e4).to(dtype)
    q = quantizer.quantize(x)
    assert torch.isfinite(q.scales).all()
    restored = quantizer.dequantize(q)
    assert restored.dtype == dtype and torch.isfinite(restored).all()
    x64 = x.double()
    error = ((x64 - restored.double()) ** 2).sum(-1) / (x64**2).sum(-1)
    assert_mean_close(error, expected_mse(128, bits), rel=0.03)


# (dtype, largest |x_j| of the test vectors): beyond the fp32 sum of squares (1e30, a norm of ~1.5e19 is its limit),
# a norm near the fp32 maximum, below its underflow (1e-30) and down in the subnormals; fp16/bf16 at their extremes.
EXTREME_SCALES = [
    (torch.float32, 1e30), (torch.float32, 3e37), (torch.float32, 1e-30), (torch.float32, 1e-39),
    (torch.float32, 1e-42), (torch.float16, 65504.0), (torch.float16, 1e-3), (torch.float16, 1e-5),
    (torch.bfloat16, 3e37), (torch.bfloat16, 1e-30), (torch.bfloat16, 1e-39),
]


@pytest.mark.parametrize("bits", (1, 4, 8))
@pytest.mark.parametrize("dtype, max_abs", EXTREME_SCALES, ids=lambda v: str(v).replace("torch.", ""))
def test_extreme_norms_round_trip(dtype, max_abs, bits, generator):
    """Finite vectors of any scale of their dtype (max |x_j| from the subnormals to the largest value, norms up to
    ~1e38 at max 3e37, dim 64) meet the distortion of unit vectors against float64, keep their length (norm
    correction) and decode finite in their own dtype (saturating at its largest value); zero vectors stay zero.
    Before the max-abs scaling, the fp32 sum of squares made norms above ~1.8e19 decode to NaN and tiny ones to 0."""
    quantizer = TurboQuantizer(64, bits, seed=0)
    x64 = torch.randn(4000, 64, generator=generator, dtype=torch.float64)
    x = (x64 / x64.abs().amax(dim=-1, keepdim=True) * max_abs).to(dtype)
    x[[3, 77]] = 0
    x64 = x.double()  # the reference is the input as its dtype holds it
    q = quantizer.quantize(x)
    assert torch.isfinite(q.scales).all() and q.scales.dtype == torch.float32
    restored64 = quantizer.dequantize(q, torch.float64)  # the fp32 reconstruction, before rounding to dtype
    assert torch.equal(restored64[[3, 77]], torch.zeros(2, 64, dtype=torch.float64))
    nonzero = x64.abs().amax(dim=-1) > 0
    x64, restored64 = x64[nonzero], restored64[nonzero]
    # Lengths: fp32 relative rounding, plus one fp32 subnormal step per coordinate where the output is subnormal.
    lengths = x64.norm(dim=-1)
    subnormal_step = math.sqrt(64) * 2.0**-149
    assert ((restored64.norm(dim=-1) - lengths).abs() <= 1e-5 * lengths + subnormal_step).all()
    error = ((x64 - restored64) ** 2).sum(-1) / lengths**2
    assert_mean_close(error, expected_mse(64, bits), rel=0.03 if max_abs > 1e-40 else 0.2)
    restored = quantizer.dequantize(q)
    limit = torch.finfo(dtype).max
    assert restored.dtype == dtype and torch.isfinite(restored).all()
    assert torch.equal(restored, quantizer.dequantize(q, torch.float32).clamp(-limit, limit).to(dtype))


def test_norm_beyond_the_fp32_scale_saturates():
    """A finite fp32 vector whose norm exceeds the fp32 maximum (the documented limit: the stored scale is fp32)
    gets an inf scale; it decodes saturated at +-fp32 max or NaN, and leaves the other vectors alone."""
    quantizer = TurboQuantizer(64, 4, seed=0)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    x[1] = 3e38
    restored = quantizer.dequantize(quantizer.quantize(x))
    assert torch.isinf(quantizer.quantize(x).scales[1])
    assert torch.equal(restored[[0, 2]], quantizer.dequantize(quantizer.quantize(x[[0, 2]])))


@pytest.mark.parametrize("bits, qjl", CONFIGS)
@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)])
def test_empty_inputs(lead, bits, qjl):
    """(..., 0, ..., dim) inputs quantize, dequantize and score with empty results of the right shapes."""
    quantizer = TurboQuantizer(64, bits, qjl=qjl)
    q = quantizer.quantize(torch.zeros(*lead, 64))
    assert q.shape == (*lead, 64) and q.nbytes == 0
    assert quantizer.dequantize(q).shape == (*lead, 64)
    assert quantizer.inner_product(torch.ones(5, 64), q).shape == (*lead[:-1], 5, lead[-1])


@pytest.mark.parametrize("bits, qjl", CONFIGS)
@pytest.mark.parametrize("dim", (64, 96, 128))
def test_bytes_per_vector(dim, bits, qjl):
    """bytes_per_vector is exactly the bytes a QuantizedTensor holds per vector."""
    quantizer = TurboQuantizer(dim, bits, qjl=qjl)
    q = quantizer.quantize(torch.randn(3, 7, dim))
    assert quantizer.bytes_per_vector == q.nbytes / 21
    mse_bits = bits - 1 if qjl else bits
    assert quantizer.bytes_per_vector == dim * mse_bits // 8 + 4 + (dim // 8 + 4 if qjl else 0)


@pytest.mark.parametrize(
    "bits, qjl, expected",
    # indices + 4-byte norm (+ 16 sign bytes + 4-byte residual norm with QJL), by hand for dim=128
    [(4, False, 68), (3, False, 52), (2, False, 36), (1, False, 20), (8, False, 132),
     (4, True, 72), (3, True, 56), (2, True, 40)],
)
def test_bytes_per_vector_at_dim_128(bits, qjl, expected):
    """At head dim 128: 68/52/36/20 bytes for 4/3/2/1 bits (MSE), and the QJL variants."""
    assert TurboQuantizer(128, bits, qjl=qjl).bytes_per_vector == expected


def test_non_contiguous_input(generator):
    """A transposed (non-contiguous) input quantizes like its contiguous copy."""
    quantizer = TurboQuantizer(64, 3, qjl=True)
    x = torch.randn(64, 5, generator=generator).T
    # Reductions over strided memory may round the norm differently (an ulp), so compare decoded values.
    decoded = quantizer.dequantize(quantizer.quantize(x))
    torch.testing.assert_close(decoded, quantizer.dequantize(quantizer.quantize(x.contiguous())), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- QuantizedTensor


@pytest.fixture(params=[False, True], ids=("mse", "qjl"))
def quantized(request, generator):
    """(quantizer, x of shape (4, 5, 64), quantize(x))."""
    quantizer = TurboQuantizer(64, 3, qjl=request.param, seed=4)
    x = torch.randn(4, 5, 64, generator=generator, dtype=torch.float16)
    return quantizer, x, quantizer.quantize(x)


def test_quantized_tensor_shape_and_to(quantized):
    """shape is (..., dim); to() keeps values; to('meta') moves every tensor."""
    _, _, q = quantized
    assert q.shape == torch.Size((4, 5, 64)) and q.device.type == "cpu"
    assert all_tensors_equal(q.to("cpu"), q)
    meta = q.to("meta")
    assert meta.shape == q.shape and all(t.device.type == "meta" for t in meta.tensors())
    assert meta.dim == q.dim and meta.mse_bits == q.mse_bits and meta.dtype == q.dtype


@pytest.mark.parametrize(
    "key",
    [1, -1, slice(1, 3), (2, 4), (slice(None), 0), (slice(None, None, 2), slice(1, 4)),
     torch.tensor([3, 0, 0]), (torch.tensor([0, 2]), torch.tensor([1, 4])), torch.tensor([True, False, True, False])],
    ids=repr,
)
def test_quantized_tensor_getitem(quantized, key):
    """Indexing a QuantizedTensor indexes every stored tensor, and decodes like the indexed decoding."""
    quantizer, x, q = quantized
    part = q[key]
    assert part.shape == x[key].shape
    assert all(torch.equal(p, t[key]) for p, t in zip(part.tensors(), q.tensors()))
    # Equal up to float32 rounding: the QJL term is a matmul whose rounding depends on the batch shape.
    expected = quantizer.dequantize(q, torch.float32)[key]
    torch.testing.assert_close(quantizer.dequantize(part, torch.float32), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key", [Ellipsis, (0, Ellipsis), None, (0, 1, 2)], ids=repr)
def test_quantized_tensor_getitem_rejects_vector_dim_indexing(quantized, key):
    """Ellipsis, None and indexing into the vector dim raise IndexError."""
    _, _, q = quantized
    with pytest.raises(IndexError):
        q[key]


@pytest.mark.parametrize("dim", (0, 1, -1, -2))
def test_quantized_tensor_cat(quantized, dim):
    """cat of quantized parts equals quantizing the concatenation, along any leading dim."""
    quantizer, x, _ = quantized
    axis = dim % 2
    pieces = torch.split(x, [1, 2, x.shape[axis] - 3], dim=axis)
    joined, whole = QuantizedTensor.cat([quantizer.quantize(p) for p in pieces], dim=dim), quantizer.quantize(x)
    # Indices, signs and scales bit for bit; the QJL residual norm is a float reduction whose vectorization (and so
    # its last bits) depend on the batch shape on some CPUs: within a few float32 ulps.
    assert all(torch.equal(getattr(joined, name), getattr(whole, name)) for name in ("packed_indices", "scales"))
    assert (joined.qjl_signs is None) == (whole.qjl_signs is None)
    if whole.qjl_signs is not None:
        assert torch.equal(joined.qjl_signs, whole.qjl_signs)
        torch.testing.assert_close(joined.residual_norms, whole.residual_norms, rtol=1e-6, atol=0)
    assert joined.shape == x.shape


def test_quantized_tensor_cat_errors(quantized):
    """cat rejects an empty list, the vector dim, and mixed configurations."""
    quantizer, x, q = quantized
    with pytest.raises(ValueError):
        QuantizedTensor.cat([])
    with pytest.raises(ValueError, match="dim"):
        QuantizedTensor.cat([q, q], dim=2)
    other = TurboQuantizer(64, 2, qjl=q.qjl_signs is not None).quantize(x)
    with pytest.raises(ValueError):
        QuantizedTensor.cat([q, other])


# ---------------------------------------------------------------------------------------------- inner products


@pytest.mark.parametrize("bits, qjl", CONFIGS)
@pytest.mark.parametrize(
    "query_shape, key_shape",
    [((5,), (7,)), ((2, 3, 5), (2, 3, 7)), ((3, 5), (2, 3, 7)), ((2, 1, 5), (2, 3, 7)), ((5,), (2, 3, 7))],
)
def test_inner_product_equals_dequantized_matmul(bits, qjl, query_shape, key_shape, generator):
    """inner_product(query, q) == query @ dequantize(q)^T in float32, broadcasting like matmul."""
    dim = 64
    quantizer = TurboQuantizer(dim, bits, qjl=qjl, seed=8)
    query = torch.randn(*query_shape, dim, generator=generator, dtype=torch.bfloat16)
    q = quantizer.quantize(torch.randn(*key_shape, dim, generator=generator))
    scores = quantizer.inner_product(query, q)
    expected = query.double() @ quantizer.dequantize(q, torch.float64).transpose(-1, -2)
    assert scores.dtype == torch.float32
    assert scores.shape == expected.shape
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("dim", (0, 4, 12, 100, -8, 64.0, True, "64"))
def test_bad_dim_raises(dim):
    """dim must be an int >= 8 and a multiple of 8."""
    with pytest.raises(ValueError, match="dim"):
        TurboQuantizer(dim, 4)


@pytest.mark.parametrize("bits", (0, 5, 6, 7, 16, 2.0, True, None))
def test_bad_bits_raises(bits):
    """bits must be one of 1, 2, 3, 4, 8."""
    with pytest.raises(ValueError, match="bits"):
        TurboQuantizer(64, bits)


@pytest.mark.parametrize("bits", (1, 8))
def test_qjl_needs_bits_2_to_4(bits):
    """qjl=True with 1 bit (no MSE bits left) or 8 bits raises ValueError."""
    with pytest.raises(ValueError, match="qjl"):
        TurboQuantizer(64, bits, qjl=True)


def test_other_bad_constructor_args():
    """qjl must be a bool, seed a non-negative int, rotation a known kind."""
    with pytest.raises(TypeError, match="qjl"):
        TurboQuantizer(64, 4, qjl=1)
    for seed in (-1, 1.5, True):
        with pytest.raises(ValueError, match="seed"):
            TurboQuantizer(64, 4, seed=seed)
    with pytest.raises(ValueError, match="rotation"):
        TurboQuantizer(64, 4, rotation="givens")
    with pytest.raises(TypeError, match="norm_correction"):
        TurboQuantizer(64, 4, norm_correction=1)
    with pytest.raises(ValueError, match="norm_correction=True cannot be combined with qjl"):
        TurboQuantizer(64, 4, qjl=True, norm_correction=True)
    assert TurboQuantizer(64, 4, qjl=True).norm_correction is False  # the default follows qjl
    assert TurboQuantizer(64, 4).norm_correction is True


@pytest.mark.parametrize("dtype", (torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64))
def test_non_float_input_raises_type_error(dtype):
    """Integer, bool and complex inputs raise TypeError (in quantize and inner_product)."""
    quantizer = TurboQuantizer(64, 4)
    bad = torch.zeros(2, 64, dtype=dtype)
    with pytest.raises(TypeError, match="dtype"):
        quantizer.quantize(bad)
    with pytest.raises(TypeError, match="dtype"):
        quantizer.inner_product(bad, quantizer.quantize(torch.randn(3, 64)))


def test_non_tensor_input_raises_type_error():
    """Lists and arrays are not accepted."""
    with pytest.raises(TypeError, match="torch.Tensor"):
        TurboQuantizer(64, 4).quantize([[0.0] * 64])


@pytest.mark.parametrize("shape", [(2, 63), (2, 65), (64, 2), (), (0,)])
def test_last_dim_mismatch_raises(shape):
    """The last dim must equal the quantizer's dim (also for the query)."""
    quantizer = TurboQuantizer(64, 4)
    with pytest.raises(ValueError, match="dim"):
        quantizer.quantize(torch.zeros(shape))
    with pytest.raises(ValueError, match="dim"):
        quantizer.inner_product(torch.zeros(shape), quantizer.quantize(torch.randn(3, 64)))


@pytest.mark.parametrize("bad", (math.nan, math.inf, -math.inf))
def test_non_finite_input_raises_by_default(bad):
    """NaN/Inf anywhere raise ValueError with check_finite (the default)."""
    x = torch.randn(4, 64)
    x[2, 5] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        TurboQuantizer(64, 4).quantize(x)


@pytest.mark.parametrize("bits, qjl", [(4, False), (3, True)])
@pytest.mark.parametrize("dim", (64, 96))
@pytest.mark.parametrize("bad", (math.nan, math.inf, -math.inf))
def test_non_finite_without_check_only_spoils_its_vector(dim, bits, qjl, bad, generator):
    """With check_finite=False a NaN/Inf vector decodes to non-finite values; the others are unaffected."""
    quantizer = TurboQuantizer(dim, bits, qjl=qjl)
    x = torch.randn(6, dim, generator=generator)
    spoiled = x.clone()
    spoiled[3, 7] = bad
    restored = quantizer.dequantize(quantizer.quantize(spoiled, check_finite=False))
    assert not torch.isfinite(restored[3]).any()
    others = [0, 1, 2, 4, 5]
    clean = quantizer.dequantize(quantizer.quantize(x[others]))
    assert torch.isfinite(restored[others]).all()
    torch.testing.assert_close(restored[others], clean, rtol=0, atol=1e-6)


def test_wrong_quantized_tensor_raises(generator):
    """dequantize/inner_product reject a QuantizedTensor of another dim, bits or qjl, and non-QuantizedTensors."""
    quantizer = TurboQuantizer(64, 3, qjl=True)
    x = torch.randn(2, 64, generator=generator)
    for other in (TurboQuantizer(64, 2, qjl=True), TurboQuantizer(64, 3), TurboQuantizer(128, 3, qjl=True)):
        q = other.quantize(torch.randn(2, other.dim, generator=generator))
        with pytest.raises(ValueError, match="quantizer has"):
            quantizer.dequantize(q)
        with pytest.raises(ValueError, match="quantizer has"):
            quantizer.inner_product(x, q)
    for not_quantized in (x, None):
        with pytest.raises(TypeError, match="QuantizedTensor"):
            quantizer.dequantize(not_quantized)
        with pytest.raises(TypeError, match="QuantizedTensor"):
            quantizer.inner_product(x, not_quantized)
