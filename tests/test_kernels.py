"""Triton kernels vs their torch twins vs a float64 reference.

Without CUDA the kernels run in Triton's CPU interpreter on tiny shapes. With CUDA the same small cases
run compiled (marked gpu, so ``-m gpu`` selects them) next to GPU-scale cases.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ON_CUDA = torch.cuda.is_available()


def _interpreter_possible() -> bool:
    """Triton fixes interpreter-or-compiler for every @triton.jit function (its own tl.sum included) when
    it is decorated: the interpreter works in this process only if triton loads after TRITON_INTERPRET=1."""
    if "triton" not in sys.modules:
        return True
    import triton.language.standard

    return type(triton.language.standard.sum).__name__ == "InterpretedFunction"


# On CPU: the interpreter in this process when possible, else (triton already imported by an earlier
# test module) the CPU cases rerun in a fresh interpreter process, see test_cpu_cases_in_subprocess.
IN_PROCESS = ON_CUDA or _interpreter_possible()
if not ON_CUDA and IN_PROCESS:
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from turboquant_hf import QuantizedTensor, TurboQuantizer, backend, unpack  # noqa: E402

encode_mod, dequant_mod, attention_mod, decode_attention_fast, rotate_mod, common_mod, kernels = (
    importlib.import_module(f"turboquant_hf.kernels{name}")
    for name in (".encode", ".dequant", ".decode_attention", ".decode_attention_fast", ".rotate", "._common", "")
)

DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
# Small cases: the interpreter on CPU; compiled (and selected by -m gpu) on CUDA.
if ON_CUDA:
    small = pytest.mark.gpu
elif IN_PROCESS:
    small = lambda test: test  # noqa: E731
else:
    small = pytest.mark.skip(reason="triton was imported before TRITON_INTERPRET=1; run in a subprocess instead")
needs_compiled_cuda = pytest.mark.skipif(not ON_CUDA or backend.triton_interpreting(),
                                         reason="needs CUDA with compiled Triton")
EPS = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def _randn(*shape, seed: int, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=_generator(seed)) * scale).to(DEVICE, dtype)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64."""
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def _sentinel_storage(quantizer: TurboQuantizer, batch: int, heads: int, capacity: int) -> QuantizedTensor:
    """Storage whose every slot holds recognizable garbage, to see what a kernel writes."""
    lead = (batch, heads, capacity)
    packed = torch.full((*lead, quantizer.dim * quantizer.mse_bits // 8), 0xA5, dtype=torch.uint8, device=DEVICE)
    norms = torch.full(lead, -1.0, device=DEVICE)
    signs = residual_norms = None
    if quantizer.qjl:
        signs = torch.full((*lead, quantizer.dim // 8), 0x5A, dtype=torch.uint8, device=DEVICE)
        residual_norms = torch.full(lead, -2.0, device=DEVICE)
    return QuantizedTensor(packed, norms, signs, residual_norms, quantizer.dim, quantizer.mse_bits, torch.float32)


def _clone(storage: QuantizedTensor) -> QuantizedTensor:
    return storage._map(torch.clone)


def _boundary_distance(x: torch.Tensor, quantizer: TurboQuantizer) -> torch.Tensor:
    """Distance of each rotated unit coordinate (torch path, fp32) to its nearest codebook boundary."""
    state = quantizer.state(x.device)
    rotation, boundaries = state.rotation, state.boundaries
    x64 = x.double()  # float64: the norm of any fp32 vector, huge or subnormal, is exact enough
    norms = torch.linalg.vector_norm(x64, dim=-1, keepdim=True)
    rotated = rotation.rotate((x64 / torch.where(norms > 0, norms, torch.ones_like(norms))).float())
    return (rotated.unsqueeze(-1) - boundaries).abs().amin(dim=-1)


def _reference_attention(query, keys, values, key_quantizer, value_quantizer, residual_keys, residual_values,
                         scale, softcap=None, attention_mask=None, key_offset=None) -> torch.Tensor:
    """softmax(q . dequant(K)^T) . dequant(V) in float64, with causal/mask/softcap, GQA by repeat; ``key_offset`` added
    to the decoded keys."""
    dense_keys = key_quantizer.dequantize(keys, torch.float32).double()
    if key_offset is not None:
        dense_keys = dense_keys + key_offset.double()
    dense_values = value_quantizer.dequantize(values, torch.float32).double()
    if residual_keys is not None:
        dense_keys = torch.cat([dense_keys, residual_keys.double()], dim=2)
        dense_values = torch.cat([dense_values, residual_values.double()], dim=2)
    group = query.shape[1] // dense_keys.shape[1]
    dense_keys = dense_keys.repeat_interleave(group, dim=1)
    dense_values = dense_values.repeat_interleave(group, dim=1)
    scores = query.double() @ dense_keys.transpose(-1, -2) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    n_queries, kv_len = query.shape[2], dense_keys.shape[2]
    positions = torch.arange(kv_len, device=query.device)
    allowed = positions[None, :] <= (kv_len - n_queries + torch.arange(n_queries, device=query.device))[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    if attention_mask is not None:
        mask = attention_mask[..., :kv_len]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return weights @ dense_values


@pytest.mark.skipif(ON_CUDA or IN_PROCESS, reason="the CPU cases run in this process")
def test_cpu_cases_in_subprocess():
    """Rerun this file's CPU cases under a fresh interpreter process (TRITON_INTERPRET=1 from the start)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-m", "not gpu"]
    result = subprocess.run(command, env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


# ----------------------------------------------------------------------------------------------- backend


def test_backend_for(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("TURBOQUANT_BACKEND", "torch")
    assert backend.backend_for(cpu) == "torch"
    monkeypatch.setenv("TURBOQUANT_BACKEND", "fast")
    with pytest.raises(ValueError, match="TURBOQUANT_BACKEND"):
        backend.backend_for(cpu)
    monkeypatch.setenv("TURBOQUANT_BACKEND", "auto")
    assert backend.backend_for(cpu) == "torch"
    monkeypatch.setenv("TURBOQUANT_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.backend_for(cpu) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        backend.backend_for(cpu)
    if ON_CUDA:
        monkeypatch.setenv("TURBOQUANT_BACKEND", "auto")
        assert backend.backend_for(torch.device("cuda")) == "triton"


# ----------------------------------------------------------------------------------------------- rotate


@pytest.mark.parametrize("rotation, dim", [("hadamard", 64), ("hadamard", 128), ("dense", 64), ("dense", 32)])
@pytest.mark.parametrize("transpose", [False, True])
def test_rotation_operands_sum_to_the_matrix(rotation, dim, transpose):
    quantizer = TurboQuantizer(dim, 4, rotation=rotation, seed=7)
    operands = common_mod.kernel_state(quantizer, DEVICE)
    pieces, scale = (operands.rotate, operands.rotate_scale) if transpose else (operands.unrotate, operands.unrotate_scale)
    matrix = quantizer.state(DEVICE).rotation.matrix().double()
    matrix = matrix.T if transpose else matrix
    assert pieces.dtype == torch.float16 and pieces.is_contiguous()
    if rotation == "hadamard":  # sqrt(D) R = H diag(signs): one exact piece of +-1
        assert pieces.shape == (1, dim, dim) and scale == 1 / math.sqrt(dim)
        assert set(pieces.unique().tolist()) == {-1.0, 1.0}
    else:
        assert pieces.shape == (2, dim, dim) and scale == 1.0
    error = (pieces.double().sum(0) * scale - matrix).abs().max().item()
    assert error <= 2.0**-22 * matrix.abs().max().item()


@triton.jit
def _rotate_kernel(tile_ptr, pieces_ptr, out_ptr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_COL: tl.constexpr,
                   TILE_PIECES: tl.constexpr, ROT_PIECES: tl.constexpr):
    rows, dims = tl.arange(0, ROWS), tl.arange(0, HEAD_DIM)
    tile = tl.load(tile_ptr + rows[:, None] * HEAD_DIM + dims[None, :])
    hi, lo = tile, tile
    if TILE_PIECES > 1:
        hi, lo = rotate_mod.split_fp16(tile)
    cols = tl.arange(0, BLOCK_COL)
    for col0 in tl.static_range(0, HEAD_DIM, BLOCK_COL):
        block = rotate_mod.rotate_columns(hi, lo, pieces_ptr, col0, HEAD_DIM, BLOCK_COL, TILE_PIECES, ROT_PIECES)
        tl.store(out_ptr + rows[:, None] * HEAD_DIM + (col0 + cols)[None, :], block)


@small
@pytest.mark.parametrize("rotation", ["hadamard", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotate_columns_matches_float64(rotation, dtype):
    """fp16 tiles are exact operands; fp32 tiles split into fp16 hi + lo: within 2^-20 of float64 either way."""
    dim = 64
    quantizer = TurboQuantizer(dim, 4, rotation=rotation, seed=2)
    operands = common_mod.kernel_state(quantizer, DEVICE)
    pieces, scale = operands.rotate, operands.rotate_scale
    tile = _randn(1, 1, 16, dim, seed=4).reshape(16, dim).to(dtype)
    out = torch.empty(16, dim, device=DEVICE)
    _rotate_kernel[(1,)](tile, pieces, out, 16, dim, 32, rotate_mod.tile_pieces(dtype), pieces.shape[0])
    expected = tile.double() @ quantizer.state(DEVICE).rotation.matrix().double().T
    assert ((out.double() * scale - expected).abs().max() <= 2.0**-20 * expected.abs().max()).item()


@triton.jit
def _bucketize_kernel(y_ptr, boundaries_ptr, out_ptr, N: tl.constexpr, BITS: tl.constexpr):
    offsets = tl.arange(0, N)
    tl.store(out_ptr + offsets, encode_mod._bucketize(tl.load(y_ptr + offsets), boundaries_ptr, BITS))


@small
@pytest.mark.parametrize("bits", (1, 2, 3, 4, 8))
def test_bucketize_matches_torch_on_ties_signs_and_nan(bits):
    """The kernel's index rule equals torch.bucketize (boundaries < y) exactly: every boundary, its neighbouring
    floats on both sides, +-0, the extremes, NaN (last index), and random values of both signs."""
    boundaries = TurboQuantizer(64, bits).state(DEVICE).boundaries
    neighbours = torch.cat([boundaries, torch.nextafter(boundaries, torch.tensor(2.0, device=DEVICE)),
                            torch.nextafter(boundaries, torch.tensor(-2.0, device=DEVICE))])
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, float("nan")], device=DEVICE)
    values = torch.cat([neighbours, special, _randn(1, 1, 1, 512, seed=9).flatten() * 0.3])
    y = torch.full((2048,), float("nan"), device=DEVICE)
    y[: values.numel()] = values
    out = torch.empty(2048, dtype=torch.int32, device=DEVICE)
    _bucketize_kernel[(1,)](y, boundaries, out, 2048, bits)
    expected = torch.where(y.isnan(), 2**bits - 1, torch.bucketize(y, boundaries))
    assert torch.equal(out.long(), expected)


# ----------------------------------------------------------------------------------------------- encode


def _check_encoding(storage: QuantizedTensor, reference: QuantizedTensor, x: torch.Tensor,
                    quantizer: TurboQuantizer, start: int) -> None:
    """Indices equal except (< 0.1% of them) within 1e-5/sqrt(D) of a boundary; stored scales within 1e-6 of
    float64 ||x|| (/ ||c[i]|| of the kernel's own indices, with norm correction; plus two fp32 subnormal steps for
    subnormal scales); slots outside [start, start + n) untouched."""
    stop = start + x.shape[2]
    window = slice(start, stop)
    for name in ("packed_indices", "scales"):
        got, want = getattr(storage, name), getattr(reference, name)
        assert torch.equal(got[:, :, :start], want[:, :, :start]) and torch.equal(got[:, :, stop:], want[:, :, stop:])
    got = unpack(storage.packed_indices[:, :, window], quantizer.mse_bits, quantizer.dim)
    want = unpack(reference.packed_indices[:, :, window], quantizer.mse_bits, quantizer.dim)
    expected_norms = x.double().norm(dim=-1)
    if quantizer.norm_correction:
        centroids = quantizer.state(got.device).centroids.double()
        expected_norms = expected_norms / centroids[got.long()].norm(dim=-1)
    norms = storage.scales[:, :, window].double()
    assert ((norms - expected_norms).abs() <= 1e-6 * expected_norms + 2.0**-148).all()
    mismatch = got != want
    assert mismatch.float().mean().item() < 1e-3
    if mismatch.any():
        distances = _boundary_distance(x, quantizer)[mismatch]
        assert (distances <= 1e-5 / math.sqrt(quantizer.dim)).all(), distances.max()


@small
@pytest.mark.parametrize(
    "bits, dim, dtype, rotation, norm_correction",
    [
        (4, 128, torch.float32, "hadamard", True),
        (4, 128, torch.float32, "hadamard", False),
        (3, 128, torch.bfloat16, "hadamard", True),
        (2, 64, torch.float16, "hadamard", False),
        (3, 64, torch.float32, "dense", True),
        (1, 64, torch.float32, "hadamard", True),
        (8, 64, torch.bfloat16, "hadamard", True),
    ],
)
def test_encode_matches_torch(bits, dim, dtype, rotation, norm_correction):
    quantizer = TurboQuantizer(dim, bits, rotation=rotation, seed=3, norm_correction=norm_correction)
    x = _randn(2, 2, 37, dim, seed=bits * dim, dtype=dtype)
    x[0, 1, 5] = 0  # a zero vector: norm 0, indices of y = 0
    reference = _sentinel_storage(quantizer, 2, 2, 50)
    storage = _clone(reference)
    encode_mod.encode_into_torch(x, quantizer, reference, 6)
    encode_mod.encode_into_triton(x, quantizer, storage, 6)
    _check_encoding(storage, reference, x, quantizer, 6)


@small
@pytest.mark.parametrize("bits", (4, 3, 2))
def test_encode_at_a_device_start_equals_an_int_start(bits):
    """A tensor start (the static layout's device-side length, read in the kernel) writes the same slots as the int
    start, in the kernel and in the torch twin (index_copy), and touches no other slot."""
    quantizer = TurboQuantizer(64, bits, seed=5)
    x = _randn(2, 2, 5, 64, seed=bits, dtype=torch.bfloat16)
    start = torch.tensor([6, 0], dtype=torch.int64, device=x.device)  # [start, anything]: the first element counts
    for encode in (encode_mod.encode_into_torch, encode_mod.encode_into_triton):
        reference = _sentinel_storage(quantizer, 2, 2, 12)
        storage = _clone(reference)
        encode(x, quantizer, reference, 6)
        encode(x, quantizer, storage, start)
        for name in ("packed_indices", "scales"):
            torch.testing.assert_close(getattr(storage, name), getattr(reference, name), rtol=0, atol=0)
    with pytest.raises(ValueError, match="int64"):
        encode_mod.encode_into_torch(x, quantizer, storage, start.int())


@small
@pytest.mark.parametrize("bits, device_start", [(4, True), (3, False), (2, True)])
def test_encode_pair_in_one_launch_equals_two_launches(bits, device_start, monkeypatch):
    """Keys and values in one launch (grid axis 2 picks the tensor; values given transposed strides as a model's
    view hands them) write exactly what one launch each writes; encode_pair_into takes that route only when the
    quantizer, dtype and slot strides agree, and two calls otherwise (different bits)."""
    monkeypatch.setenv("TURBOQUANT_BACKEND", "triton")  # encode_pair_into dispatches (the interpreter on CPU)
    quantizer = TurboQuantizer(64, bits, seed=5)
    keys = _randn(2, 3, 5, 64, seed=bits, dtype=torch.bfloat16)
    values = _randn(2, 5, 3, 64, seed=bits + 1, dtype=torch.bfloat16).transpose(1, 2)
    start = torch.tensor([4, 0], dtype=torch.int64, device=keys.device) if device_start else 4
    slots = [_sentinel_storage(quantizer, 2, 3, 12) for _ in range(4)]
    encode_mod.encode_into_triton(keys, quantizer, slots[0], start)
    encode_mod.encode_into_triton(values, quantizer, slots[1], start)
    encode_mod.encode_pair_into(keys, values, quantizer, quantizer, slots[2], slots[3], start)
    for got, want in ((slots[2], slots[0]), (slots[3], slots[1])):
        for name in ("packed_indices", "scales"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=0)
    with pytest.raises(ValueError, match="also: states must match x"):
        encode_mod.encode_into_triton(keys, quantizer, slots[2], start, also=(values[:, :, :4], slots[3]))
    other = TurboQuantizer(64, 4 if bits != 4 else 3, seed=5)  # different bits: one call each, same result
    reference, storage = _sentinel_storage(other, 2, 3, 12), _sentinel_storage(other, 2, 3, 12)
    encode_mod.encode_into_triton(values, other, reference, start)
    encode_mod.encode_pair_into(keys, values, quantizer, other, slots[2], storage, start)
    torch.testing.assert_close(storage.packed_indices, reference.packed_indices, rtol=0, atol=0)


def test_encode_rejects_overflow():
    quantizer = TurboQuantizer(64, 4)
    storage = _sentinel_storage(quantizer, 1, 1, 8)
    with pytest.raises(ValueError, match="capacity"):
        encode_mod.encode_into_triton(_randn(1, 1, 5, 64, seed=0), quantizer, storage, 4)


# (dtype, largest |x_j|): past the fp32 sum of squares (norms above ~1.8e19 once gave NaN), near the fp32 maximum,
# below its underflow (tiny norms once gave 0), subnormal; fp16 and bf16 at their extremes.
EXTREME_SCALES = [
    (torch.float32, 1e30), (torch.float32, 3e37), (torch.float32, 1e-30), (torch.float32, 1e-42),
    (torch.float16, 65504.0), (torch.float16, 1e-5), (torch.bfloat16, 3e37), (torch.bfloat16, 1e-30),
    # Triton's interpreter (3.9) converts bf16 subnormals to fp32 wrongly (1.1e-39 -> 5.9e-39): compiled CUDA only.
    # There (H200, triton 3.6) 0.4-0.6 % of the indices differ from the twin's, more than boundary ties explain, while
    # fp32 subnormals (1e-42) match: a known defect, not yet understood.
    pytest.param(torch.bfloat16, 1e-39, marks=[
        pytest.mark.skipif(not ON_CUDA, reason="interpreter bf16 subnormals"),
        pytest.mark.xfail(strict=True, reason="bf16 subnormal inputs: indices differ from the twin on CUDA")]),
]


def _scaled_to(max_abs: float, dtype: torch.dtype, *shape, seed: int) -> torch.Tensor:
    """Gaussian vectors rescaled in float64 to max |x_j| = max_abs, then rounded to dtype; one zero vector."""
    x = _randn(*shape, seed=seed, dtype=torch.float64)
    x = (x / x.abs().amax(dim=-1, keepdim=True) * max_abs).to(dtype)
    x[0, 1, 5] = 0
    return x


@small
@pytest.mark.parametrize("bits", (4, 3))
@pytest.mark.parametrize("dtype, max_abs", EXTREME_SCALES, ids=lambda v: str(v).replace("torch.", ""))
def test_encode_and_dequantize_extreme_norms_match_torch(dtype, max_abs, bits):
    """The kernels' max-abs-scaled norm math equals the torch twin's over the whole range of each dtype: stored
    scales against float64, indices, and the decoded vectors (saturated at the dtype's largest value, finite)."""
    quantizer = TurboQuantizer(64, bits, seed=3)
    x = _scaled_to(max_abs, dtype, 2, 2, 37, 64, seed=bits)
    reference = _sentinel_storage(quantizer, 2, 2, 40)
    storage = _clone(reference)
    encode_mod.encode_into_torch(x, quantizer, reference, 2)
    encode_mod.encode_into_triton(x, quantizer, storage, 2)
    _check_encoding(storage, reference, x, quantizer, 2)
    assert torch.isfinite(storage.scales).all() and (storage.scales[0, 1, 7] == 0)
    view = storage[:, :, 2:39]
    out, expected = torch.empty_like(x), torch.empty_like(x)
    dequant_mod.dequantize_into_torch(view, quantizer, expected)
    dequant_mod.dequantize_into_triton(view, quantizer, out)
    assert torch.isfinite(out).all() and torch.isfinite(expected).all() and (out[0, 1, 5] == 0).all()
    # The kernel scales by norm / sqrt(D) first: a subnormal scale rounds once more (< 2^-149 times |R^T c| <= 8).
    scale = expected.double().abs().max()
    tolerance = 1e-5 * scale + 2 * EPS[dtype] * expected.double().abs() + 2.0**-146
    assert ((out.double() - expected.double()).abs() <= tolerance).all()


@small
@pytest.mark.parametrize("key_norm_scale", (1e30, 1e-30))
def test_decode_attention_extreme_key_norms(key_norm_scale):
    """Compressed keys of norm ~1e31 (one-hot softmax) or ~1e-29 (uniform) attend like float64: key norms only scale
    fp32 logits. (Value norms, |q|, |q * scale| and the residual window must stay below 65504: module docstring.)"""
    args, kwargs = AttentionCase(1, 2, 2, 64, 120, 2, 4, 4, 5).build()
    keys = args[1]
    keys.scales.mul_(key_norm_scale)
    out = attention_mod.decode_attention_triton(*args, **kwargs)
    twin = attention_mod.decode_attention_torch(*args, **kwargs)
    reference = _reference_attention(*args, **kwargs)
    assert torch.isfinite(out).all() and torch.isfinite(twin).all()
    assert _relative_error(out, reference) <= 1e-4 and _relative_error(twin, reference) <= 1e-4


# ----------------------------------------------------------------------------------------------- dequantize


def _check_dequantized(out: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32: within 1e-5 of max |expected|; fp16/bf16: plus one ulp of the output dtype (the two fp32 values
    may round to neighbours)."""
    scale = expected.float().abs().max()
    tolerance = 1e-5 * scale + 2 * EPS[out.dtype] * expected.float().abs()
    assert ((out.float() - expected.float()).abs() <= tolerance).all()


@small
@pytest.mark.parametrize(
    "bits, dim, dtype, rotation",
    [
        (4, 128, torch.float32, "hadamard"),
        (3, 64, torch.bfloat16, "hadamard"),
        (2, 128, torch.float16, "hadamard"),
        (4, 64, torch.float32, "dense"),
        (1, 64, torch.float32, "hadamard"),
        (8, 64, torch.float32, "hadamard"),
        (3, 128, torch.float32, "hadamard"),
    ],
)
def test_dequantize_matches_torch(bits, dim, dtype, rotation):
    quantizer = TurboQuantizer(dim, bits, rotation=rotation, seed=5)
    storage = quantizer.quantize(_randn(2, 2, 40, dim, seed=bits + dim))
    storage.scales[1, 0, 3] = 0  # a zero vector decodes to exact zeros
    view = storage[:, :, :29]  # strided, like a cache's storage[:, :, :length]
    out = torch.full((2, 2, 40, dim), float("nan"), dtype=dtype, device=DEVICE)[:, :, :29]
    expected = torch.empty_like(out)
    dequant_mod.dequantize_into_torch(view, quantizer, expected)
    dequant_mod.dequantize_into_triton(view, quantizer, out)
    _check_dequantized(out, expected)
    assert (out[1, 0, 3] == 0).all()


def test_torch_dequantize_slices_equal_one_pass(monkeypatch):
    """The torch twin dequantizes in token slices: slice edges change nothing (3 heads, 10 tokens per slice)."""
    quantizer = TurboQuantizer(64, 4, seed=6)
    storage = quantizer.quantize(_randn(1, 3, 37, 64, seed=9).cpu())[:, :, :35]
    expected = quantizer.dequantize(storage)
    monkeypatch.setattr(dequant_mod, "_TORCH_SLICE_VECTORS", 30)
    out = torch.full((1, 3, 35, 64), float("nan"))
    dequant_mod.dequantize_into_torch(storage, quantizer, out)
    assert torch.equal(out, expected)


def test_torch_dequantize_memory_stays_near_its_output():
    """Peak extra memory of the torch twin for a 128 MiB output, measured in a fresh process (max RSS): the
    reference's int64 indices and fp32 temporaries alone take ~10x the output when not sliced."""
    script = """
import resource, torch, importlib
torch.set_num_threads(1)
from turboquant_hf import QuantizedTensor, TurboQuantizer
dequant = importlib.import_module("turboquant_hf.kernels.dequant")
n = 65536
q = QuantizedTensor(torch.randint(0, 256, (1, 8, n, 64), dtype=torch.uint8), torch.rand(1, 8, n), None, None, 128, 4,
                    torch.bfloat16)
out = torch.zeros(1, 8, n, 128, dtype=torch.bfloat16)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
dequant.dequantize_into_torch(q, TurboQuantizer(128, 4), out)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 / out.nbytes)
"""
    env = {**os.environ, "TURBOQUANT_BACKEND": "torch", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.split()[-1]) < 3.0  # measured: 0.5-1.1 sliced (~80 MB per slice), 10.5 in one pass


# ----------------------------------------------------------------------------------------------- attention


@dataclasses.dataclass
class AttentionCase:
    batch: int
    kv_heads: int
    group: int
    dim: int
    compressed: int
    n_queries: int
    key_bits: int
    value_bits: int
    residual: int
    dtype: torch.dtype = torch.float32
    softcap: float | None = None
    mask: str | None = None  # None, "bool" or "additive"
    rotation: str = "hadamard"
    query_scale: float = 1.0
    key_offset: float = 0.0  # nonzero: the packed keys are centered, stored without an offset of about this size

    def __str__(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        extras = "".join(f"-{part}" for part in (self.mask, self.softcap and f"cap{self.softcap:g}",
                                                 self.rotation != "hadamard" and self.rotation,
                                                 self.key_offset and f"offset{self.key_offset:g}") if part)
        return (f"B{self.batch}-H{self.kv_heads}x{self.group}-D{self.dim}-N{self.compressed}+{self.residual}"
                f"-M{self.n_queries}-k{self.key_bits}v{self.value_bits}-{dtype}{extras}")

    def build(self, seed: int = 0):
        key_quantizer = TurboQuantizer(self.dim, self.key_bits, rotation=self.rotation, seed=seed + 1)
        value_quantizer = TurboQuantizer(self.dim, self.value_bits, rotation=self.rotation, seed=seed + 2)
        lead = (self.batch, self.kv_heads)
        keys = key_quantizer.quantize(_randn(*lead, self.compressed, self.dim, seed=seed + 3))
        values = value_quantizer.quantize(_randn(*lead, self.compressed, self.dim, seed=seed + 4))
        query = _randn(self.batch, self.kv_heads * self.group, self.n_queries, self.dim, seed=seed + 5,
                       dtype=self.dtype, scale=self.query_scale)
        key_offset = None
        if self.key_offset:  # a shared component, as Qwen2's key bias gives (storage.PackedKV's center_keys)
            key_offset = self.key_offset * (1 + _randn(*lead, 1, self.dim, seed=seed + 8))
        residual_keys = residual_values = None
        if self.residual:
            residual_keys = _randn(*lead, self.residual, self.dim, seed=seed + 6)
            residual_keys = (residual_keys if key_offset is None else residual_keys + key_offset).to(self.dtype)
            residual_values = _randn(*lead, self.residual, self.dim, seed=seed + 7, dtype=self.dtype)
        kv_len = self.compressed + self.residual
        attention_mask = None
        if self.mask is not None:
            # Left padding of batch row 0 (the first 7 positions), plus a longer-than-needed mask.
            allowed = torch.ones(self.batch, 1, self.n_queries, kv_len + 3, dtype=torch.bool, device=DEVICE)
            allowed[0, :, :, :7] = False
            attention_mask = allowed
            if self.mask == "additive":
                attention_mask = torch.zeros(allowed.shape, dtype=self.dtype, device=DEVICE)
                attention_mask = attention_mask.masked_fill(~allowed, torch.finfo(self.dtype).min)
                attention_mask[..., 9] -= 1.5  # a soft bias too
        args = (query, keys, values, key_quantizer, value_quantizer, residual_keys, residual_values)
        kwargs = {"scale": self.dim**-0.5, "softcap": self.softcap, "attention_mask": attention_mask}
        if key_offset is not None:
            kwargs["key_offset"] = key_offset
        return args, kwargs


SMALL_CASES = [
    # batch, kv_heads, group, dim, compressed, M, key bits, value bits, residual, ...
    AttentionCase(1, 1, 2, 64, 300, 1, 4, 4, 5),
    AttentionCase(2, 2, 4, 128, 200, 3, 3, 2, 8, torch.bfloat16, softcap=30.0, mask="bool"),
    AttentionCase(1, 2, 2, 64, 100, 3, 2, 3, 0, torch.float16, mask="additive"),
    AttentionCase(2, 1, 4, 128, 70, 1, 4, 4, 16, torch.float32, mask="bool", query_scale=4.0),
    AttentionCase(1, 2, 4, 64, 0, 3, 4, 4, 9, torch.bfloat16),  # residual window only
    AttentionCase(1, 1, 4, 64, 90, 1, 2, 4, 3, torch.float32, softcap=5.0, rotation="dense"),
    AttentionCase(1, 1, 8, 64, 40, 3, 3, 3, 3, torch.float32),  # 24 query rows: BLOCK_R 32
    AttentionCase(1, 2, 4, 128, 130, 3, 4, 4, 6, torch.float16, softcap=20.0, mask="additive"),
    AttentionCase(1, 2, 4, 64, 150, 1, 8, 4, 5, torch.bfloat16),  # layer 0's default: 8-bit keys, 4-bit values
    # Centered packed keys (the dynamic layout's default): the kernel adds q . offset to their logits.
    AttentionCase(2, 2, 4, 64, 260, 1, 4, 4, 7, torch.bfloat16, key_offset=20.0),
    AttentionCase(1, 2, 2, 128, 90, 3, 3, 4, 5, torch.float16, softcap=30.0, mask="bool", key_offset=5.0),
    AttentionCase(1, 1, 4, 64, 150, 1, 8, 4, 3, torch.float32, key_offset=1.0),
    AttentionCase(1, 1, 8, 64, 40, 3, 4, 3, 3, torch.float32, key_offset=3.0),  # 24 rows: BLOCK_R 32
]


@small
@pytest.mark.parametrize("case", SMALL_CASES, ids=str)
def test_decode_attention_matches_torch_and_float64(case):
    args, kwargs = case.build()
    out = attention_mod.decode_attention_triton(*args, **kwargs)
    twin = attention_mod.decode_attention_torch(*args, **kwargs)
    reference = _reference_attention(*args, **kwargs)
    assert out.shape == twin.shape == args[0].shape and out.dtype == args[0].dtype
    eps = EPS[case.dtype]
    # Against the twin: fp32-level (fp16 hi + lo tensor-core dots on CUDA, the same roundings emulated on
    # CPU), plus at most one rounding step of a half-precision output.
    slack = 1e-5 * twin.float().abs().max()
    assert ((out.float() - twin.float()).abs() <= slack + 2 * eps * twin.float().abs()).all()
    # Against float64: 1e-4 relative (the issue asks 1e-3), plus the output dtype's rounding (up to one ulp:
    # the interpreter truncates fp32 to bf16).
    assert _relative_error(out, reference) <= 1e-4 + 2 * eps


STATIC_CASES = [  # (case: slots = compressed, ring rows = residual), L cached tokens, F first ring position
    (AttentionCase(1, 2, 4, 64, 300, 1, 4, 4, 9), 200, 0),
    (AttentionCase(2, 1, 2, 128, 80, 1, 3, 2, 9, torch.bfloat16, mask="bool"), 5, 0),  # L below the ring
    (AttentionCase(1, 2, 2, 64, 120, 3, 2, 4, 6, torch.float16, softcap=20.0), 70, 67),  # after a crop
    (AttentionCase(2, 2, 4, 64, 64, 1, 4, 3, 0, mask="additive"), 64, 0),  # no ring, every slot used
    (AttentionCase(1, 2, 4, 64, 90, 1, 8, 4, 9, torch.bfloat16), 60, 0),  # 8-bit keys (layer 0's default)
]


@small
@pytest.mark.parametrize("case, length, floor", STATIC_CASES, ids=lambda value: str(value))
def test_static_decode_attention_equals_the_dynamic_call(case, length, floor):
    """With ``length`` (the static layout's device-side lengths), the kernel and its twin read slots [0, c) packed and
    tokens c .. L - 1 from the ring rows p % W, c = max(L - W, F): the same as the dynamic call over those slots and
    those tokens in order."""
    (query, slots_k, slots_v, key_quantizer, value_quantizer, ring_k, ring_v), kwargs = case.build(seed=length)
    lengths = torch.tensor([length, floor], dtype=torch.int64, device=DEVICE)
    ring = 0 if ring_k is None else ring_k.shape[2]
    start = max(length - ring, floor, 0)
    rows = torch.arange(start, length, device=DEVICE) % max(ring, 1)
    window = (None, None) if ring_k is None else (ring_k[:, :, rows], ring_v[:, :, rows])
    dynamic_kwargs = dict(kwargs)
    if kwargs["attention_mask"] is not None:
        dynamic_kwargs["attention_mask"] = kwargs["attention_mask"][..., :length]
    expected = attention_mod.decode_attention_torch(query, slots_k[:, :, :start], slots_v[:, :, :start],
                                                    key_quantizer, value_quantizer, *window, **dynamic_kwargs)
    twin = attention_mod.decode_attention_torch(query, slots_k, slots_v, key_quantizer, value_quantizer, ring_k, ring_v,
                                                length=lengths, **kwargs)
    out = attention_mod.decode_attention_triton(query, slots_k, slots_v, key_quantizer, value_quantizer, ring_k, ring_v,
                                                length=lengths, **kwargs)
    eps = EPS[case.dtype]
    assert _relative_error(twin, expected) <= 1e-5 + 2 * eps
    assert _relative_error(out, expected) <= 1e-5 + 2 * eps


@small
def test_decode_attention_takes_fp32_window_keys_beside_half_precision_queries():
    """What the fused path hands the kernel with centered keys: the window's keys less the offset in fp32, values and
    queries in bf16. The kernel reads each window tensor in its own dtype, like the twin."""
    (query, keys, values, key_quantizer, value_quantizer, residual_keys, residual_values), kwargs = AttentionCase(
        1, 2, 2, 64, 100, 1, 4, 4, 6, torch.bfloat16).build(seed=5)
    args = (query, keys, values, key_quantizer, value_quantizer, residual_keys.float() * 3.0, residual_values)
    out = attention_mod.decode_attention_triton(*args, **kwargs)
    twin = attention_mod.decode_attention_torch(*args, **kwargs)
    assert out.dtype == torch.bfloat16
    assert _relative_error(out, twin) <= 1e-5 + 2 * EPS[torch.bfloat16]


@small
def test_decode_attention_fully_masked_row_is_zero():
    case = AttentionCase(2, 1, 2, 64, 50, 1, 4, 4, 2)
    args, kwargs = case.build()
    mask = torch.ones(2, 1, 1, 52, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    kwargs["attention_mask"] = mask
    out = attention_mod.decode_attention_triton(*args, **kwargs)
    twin = attention_mod.decode_attention_torch(*args, **kwargs)
    assert (out[1] == 0).all() and (twin[1] == 0).all()
    assert torch.allclose(out, twin, atol=1e-5 * twin.abs().max().item())


# ----------------------------------------------------------------------------------------------- dispatch


@small
def test_dispatchers_follow_the_backend(monkeypatch):
    case = AttentionCase(1, 1, 2, 64, 40, 1, 4, 4, 2)
    args, kwargs = case.build()
    monkeypatch.setenv("TURBOQUANT_BACKEND", "torch")
    torch_out = kernels.decode_attention(*args, **kwargs)
    assert torch.equal(torch_out, attention_mod.decode_attention_torch(*args, **kwargs))
    monkeypatch.setenv("TURBOQUANT_BACKEND", "triton")
    assert torch.equal(kernels.decode_attention(*args, **kwargs), attention_mod.decode_attention_triton(*args, **kwargs))
    quantizer = args[3]
    x = _randn(1, 1, 4, 64, seed=1)
    storage = _sentinel_storage(quantizer, 1, 1, 4)
    kernels.encode_into(x, quantizer, storage, 0)
    out = torch.empty(1, 1, 4, 64, device=DEVICE)
    kernels.dequantize_into(storage, quantizer, out)
    assert _relative_error(out, quantizer.dequantize(quantizer.quantize(x))) < 1e-5


@small
def test_qjl_uses_the_torch_twin_and_logs_once(monkeypatch, caplog):
    """The dispatching functions send what the kernels cannot do to the torch twin (one warning); the kernels'
    own entry points refuse it."""
    monkeypatch.setattr(backend, "_warned", set())
    monkeypatch.setenv("TURBOQUANT_BACKEND", "triton")
    quantizer = TurboQuantizer(64, 3, qjl=True, seed=7)
    x = _randn(1, 2, 5, 64, seed=8)
    storage, reference = _sentinel_storage(quantizer, 1, 2, 9), _sentinel_storage(quantizer, 1, 2, 9)
    with caplog.at_level(logging.WARNING, logger="turboquant_hf"):
        kernels.encode_into(x, quantizer, storage, 2)
        kernels.encode_into(x, quantizer, storage, 2)
    encode_mod.encode_into_torch(x, quantizer, reference, 2)
    assert all(torch.equal(a, b) for a, b in zip(storage.tensors(), reference.tensors()))
    assert sum("QJL" in record.getMessage() for record in caplog.records) == 1
    out, expected = torch.empty(1, 2, 9, 64, device=DEVICE), torch.empty(1, 2, 9, 64, device=DEVICE)
    kernels.dequantize_into(storage, quantizer, out)
    dequant_mod.dequantize_into_torch(storage, quantizer, expected)
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="Triton encode does not support QJL"):
        encode_mod.encode_into_triton(x, quantizer, storage, 2)
    with pytest.raises(ValueError, match="Triton dequantize does not support QJL"):
        dequant_mod.dequantize_into_triton(storage, quantizer, out)


@small
@pytest.mark.parametrize("bits", (2.5, 3.5, 4.5))
def test_fractional_bits_run_the_kernels_part_by_part(monkeypatch, bits):
    """A split's parts go through the encode and dequantize kernels: the slots match the torch twins' (as
    _check_encoding allows), and the same (torch-encoded) slots decode through both dequantize paths, back in the
    model's channel order, within 1e-5 of each other (decoding each backend's own slots would add the boundary
    flips _check_encoding allows). The attention over them is dense (``tests/test_outliers.py`` compares it with
    sdpa)."""
    from turboquant_hf.outliers import SplitQuantizer, outlier_order
    from turboquant_hf.storage import decode_slots, empty_slots, encode_slots

    quantizer = SplitQuantizer(64, bits, seed=3)
    x = _randn(1, 2, 7, 64, seed=int(bits * 10)) * torch.linspace(0.2, 3.0, 64, device=DEVICE)
    channels = outlier_order(x, quantizer.outlier_channels)
    slots, decoded = {}, {}
    for choice in ("torch", "triton"):
        monkeypatch.setenv("TURBOQUANT_BACKEND", choice)
        slots[choice] = empty_slots(quantizer, 1, 2, 9, torch.float32, DEVICE, fill=torch.zeros)
        encode_slots(x, quantizer, slots[choice], 2, channels)
        decoded[choice] = torch.zeros(1, 2, 9, 64, device=DEVICE)
        decode_slots(slots["torch"], quantizer, decoded[choice], channels)
    ordered = torch.take_along_dim(x, channels[:, :, None], dim=-1)
    for part, part_x, name in zip(quantizer.parts, quantizer.split(ordered), ("outliers", "regular")):
        _check_encoding(getattr(slots["triton"], name), getattr(slots["torch"], name), part_x, part, 2)
    assert _relative_error(decoded["triton"], decoded["torch"]) < 1e-5


# ----------------------------------------------------------------------------------------------- GPU scale


@pytest.mark.gpu
@needs_compiled_cuda
@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gpu_encode_and_dequantize(dim, bits):
    quantizer = TurboQuantizer(dim, bits, seed=11)
    x = _randn(2, 8, 4099, dim, seed=dim + bits, dtype=torch.bfloat16)
    reference = _sentinel_storage(quantizer, 2, 8, 5000)
    storage = _clone(reference)
    encode_mod.encode_into_torch(x, quantizer, reference, 17)
    encode_mod.encode_into_triton(x, quantizer, storage, 17)
    _check_encoding(storage, reference, x, quantizer, 17)
    view = reference[:, :, :4116]
    for dtype in (torch.float32, torch.bfloat16):
        out, expected = (torch.empty(2, 8, 4116, dim, dtype=dtype, device=DEVICE) for _ in range(2))
        dequant_mod.dequantize_into_torch(view, quantizer, expected)
        dequant_mod.dequantize_into_triton(view, quantizer, out)
        _check_dequantized(out, expected)


GPU_CASES = [
    AttentionCase(1, 8, 4, 128, 131072 - 128, 1, 4, 4, 128, torch.bfloat16, query_scale=3.0),
    AttentionCase(1, 8, 8, 128, 32768, 1, 3, 3, 64, torch.float16, query_scale=3.0),
    AttentionCase(16, 8, 4, 128, 4096, 1, 4, 2, 32, torch.bfloat16, mask="bool"),
    AttentionCase(4, 4, 8, 64, 8192, 3, 2, 2, 16, torch.bfloat16, softcap=50.0, query_scale=3.0),
    AttentionCase(2, 4, 4, 256, 16384, 1, 4, 4, 128, torch.bfloat16, softcap=30.0, query_scale=3.0),
    AttentionCase(8, 8, 4, 128, 2000, 4, 4, 4, 4, torch.float16, mask="additive"),
    AttentionCase(1, 2, 8, 256, 131072, 1, 3, 4, 0, torch.bfloat16, query_scale=3.0),
]


@pytest.mark.gpu
@needs_compiled_cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_decode_attention(case):
    args, kwargs = case.build(seed=20)
    out = attention_mod.decode_attention_triton(*args, **kwargs)
    twin = attention_mod.decode_attention_torch(*args, **kwargs)
    eps = EPS[case.dtype]
    assert _relative_error(out, twin) <= 1e-5 + 2 * eps
    # fp32 queries and residual against float64: 1e-5 relative, or fp32's epsilon times sqrt(tokens) where that is
    # more (rounding errors of a sum over L tokens grow like sqrt(L): 2.2e-5 at 131K tokens, where the kernel measured
    # 1.0e-5 on the H200 and torch's own fp32 attention of the same inputs 4.1e-6).
    fp32_case = dataclasses.replace(case, dtype=torch.float32)
    args, kwargs = fp32_case.build(seed=20)
    reference = _reference_attention(*args, **kwargs)
    bound = max(1e-5, torch.finfo(torch.float32).eps / 2 * math.sqrt(case.compressed + case.residual))
    assert _relative_error(attention_mod.decode_attention_triton(*args, **kwargs), reference) <= bound


def test_fast_split_scope_and_platform():
    """The Gluon kernel covers 4-bit keys and values (4 MSE bits: not 4 bits with QJL) at head_dim 128 only, and never
    runs off CUDA (the interpreter cannot run Gluon): every other case keeps the Triton split kernel."""
    covers = decode_attention_fast.fast_split_covers
    four = TurboQuantizer(128, 4)
    assert covers(four, four, 128)
    assert not covers(TurboQuantizer(128, 3), four, 128) and not covers(four, TurboQuantizer(128, 2), 128)
    assert not covers(TurboQuantizer(64, 4), TurboQuantizer(64, 4), 64)
    assert not covers(TurboQuantizer(128, 4, qjl=True), four, 128)
    assert not decode_attention_fast.fast_split_runs(torch.device("cpu"))


@small
def test_gluon_failure_falls_back_to_the_triton_split(monkeypatch, caplog):
    """A Gluon kernel that fails to compile (another Triton version) costs one warning: the call still returns the
    Triton split kernel's result, and the device stops taking the Gluon kernel."""
    args, kwargs = AttentionCase(1, 2, 4, 128, 300, 1, 4, 4, 5).build()
    expected = attention_mod.decode_attention_triton(*args, **kwargs)

    class Broken:
        def __getitem__(self, grid):
            def launch(*_, **__):
                raise RuntimeError("cannot compile")
            return launch

    monkeypatch.setattr(decode_attention_fast, "_fast_split_kernel", Broken())
    monkeypatch.setattr(decode_attention_fast, "_FAILED", set())
    monkeypatch.setattr(attention_mod, "fast_split_runs",
                        lambda device: str(device) not in decode_attention_fast._FAILED)
    monkeypatch.setattr(attention_mod, "FAST_MIN_TOKENS", 0)
    with caplog.at_level(logging.WARNING):
        out = attention_mod.decode_attention_triton(*args, **kwargs)
    assert torch.equal(out, expected)
    assert decode_attention_fast._FAILED == {str(DEVICE)} and "cannot compile" in caplog.text


FAST_CASES = [  # the Gluon split kernel's scope: 4-bit keys and values, head_dim 128
    AttentionCase(1, 8, 4, 128, 1, 1, 4, 4, 0, torch.bfloat16),  # one packed token, no window
    AttentionCase(1, 8, 4, 128, 16384 + 17, 1, 4, 4, 128, torch.bfloat16, query_scale=3.0),
    AttentionCase(8, 8, 4, 128, 32768, 1, 4, 4, 128, torch.bfloat16),
    AttentionCase(32, 8, 4, 128, 4096 + 3, 1, 4, 4, 0, torch.float16),
    AttentionCase(2, 4, 1, 128, 20000, 3, 4, 4, 7, torch.float16, softcap=30.0, mask="bool"),
    AttentionCase(2, 2, 8, 128, 17000, 2, 4, 4, 5, torch.bfloat16, mask="additive", key_offset=5.0),
    AttentionCase(1, 8, 4, 128, 131072 - 128, 1, 4, 4, 128, torch.bfloat16, key_offset=2.0),
]


@pytest.mark.gpu
@needs_compiled_cuda
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("case", FAST_CASES, ids=str)
def test_gpu_fast_split_matches_triton_split_and_float64(case, static, monkeypatch):
    """The Gluon split kernel (decode_attention_fast.py, GPU only) against its twin, the Triton split kernel, and
    float64: the same call with the fast kernel forced on (FAST_MIN_TOKENS 0) and off. ``static``: the same slots
    read as a static layout (lengths on the device, the window as a ring)."""
    if not decode_attention_fast.fast_split_runs(DEVICE):
        pytest.skip("this GPU or Triton cannot run the Gluon kernel")
    launches = []  # of the Gluon kernel itself (launch_fast_split runs the Triton one alone on unaligned rows)
    kernel = decode_attention_fast._fast_split_kernel

    class Counted:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(decode_attention_fast, "_fast_split_kernel", Counted())
    for dtype in (case.dtype, torch.float32):
        args, kwargs = dataclasses.replace(case, dtype=dtype).build(seed=30)
        if static:
            if "key_offset" in kwargs or kwargs["attention_mask"] is not None:
                pytest.skip("the static layout has no key offset; its masks span every slot (test_static*)")
            query, keys, values, key_quantizer, value_quantizer, ring_keys, ring_values = args
            if ring_keys is None:  # the static layout always has a ring
                ring_keys = _randn(case.batch, case.kv_heads, 1, case.dim, seed=31, dtype=dtype)
                ring_values = _randn(case.batch, case.kv_heads, 1, case.dim, seed=32, dtype=dtype)
            args = (query, keys, values, key_quantizer, value_quantizer, ring_keys, ring_values)
            kwargs["length"] = torch.tensor([max(case.compressed - 3, case.n_queries), 0], device=DEVICE)
        outs = {}
        for fast_min in (10**9, 0):
            monkeypatch.setattr(attention_mod, "FAST_MIN_TOKENS", fast_min)
            outs[fast_min] = attention_mod.decode_attention_triton(*args, **kwargs)
        eps = EPS[dtype]
        assert _relative_error(outs[0], outs[10**9]) <= 1e-5 + 2 * eps
        if dtype == torch.float32 and not static:
            bound = max(1e-5, torch.finfo(torch.float32).eps / 2 * math.sqrt(case.compressed + case.residual))
            assert _relative_error(outs[0], _reference_attention(*args, **kwargs)) <= bound
    assert launches, "the Gluon kernel was not launched"


@pytest.mark.gpu
@needs_compiled_cuda
def test_gpu_decode_steps_do_not_recompile(monkeypatch):
    """Growing lengths (one more token per step) must reuse the compiled kernels: Triton's default
    specialization of integer arguments would compile new variants mid-generation (seconds each)."""
    kernels = [attention_mod._split_kernel, attention_mod._merge_kernel]
    if decode_attention_fast.fast_split_runs(DEVICE):  # the Gluon kernel too, from the first packed token
        monkeypatch.setattr(attention_mod, "FAST_MIN_TOKENS", 0)
        kernels.append(decode_attention_fast._fast_split_kernel)
    caches = {kernel: getattr(kernel, "device_caches", None) for kernel in kernels}
    if any(cache is None for cache in caches.values()):
        pytest.skip("this Triton keeps no device_caches to inspect")

    def compiled() -> int:
        return sum(len(kernel.device_caches[DEVICE.index or 0][0]) for kernel in caches)

    # Like the cache: views of storage whose capacity is a multiple of 64 tokens, and of a fixed window buffer.
    case = AttentionCase(2, 2, 4, 128, 1088, 1, 4, 4, 64, torch.bfloat16)
    (query, keys, values, *quantizers, window_keys, window_values), kwargs = case.build()
    counts = []
    for step in range(40):  # compressed lengths 1000..1039, window 5..44: every residue mod 16 of both
        attention_mod.decode_attention_triton(query, keys[:, :, :1000 + step], values[:, :, :1000 + step], *quantizers,
                                              window_keys[:, :, :5 + step], window_values[:, :, :5 + step], **kwargs)
        counts.append(compiled())
    assert counts[-1] == counts[0], f"compiled variants grew during decode: {counts}"
