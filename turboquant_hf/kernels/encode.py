"""Encode (B, H, n, D) vectors into preallocated QuantizedTensor storage: Triton kernel + torch twin.

The kernel mirrors ``TurboQuantizer.quantize``: fp32 norm (max |x_j| * ||x / max |x_j|||, finite over the fp32
range), rotation as tensor-core dots with exact products (``rotate.rotate_columns``; it differs from the torch matmul
only by fp32 rounding), index = number of boundaries < y
(ties go to the lower centroid like ``torch.bucketize``), the bit layout of ``packing.py``,
and the stored scale ||x|| / ||c[i]|| (norm correction) or ||x||. QJL quantizers use the torch twin.
"""

from __future__ import annotations

import torch

from ..quantizer import QuantizedTensor, TurboQuantizer
from ._common import (
    cdiv, check_same_device, check_supported, kernel_state, launch_device, row_block, row_launch, tl, triton,
    use_triton,
)
from .rotate import column_block, rotate_columns, split_fp16

# Launch per device type (see row_launch); bench_attention.py --sweep times alternatives on a GPU.
_LAUNCH = {"cuda": {"elements": 8192, "num_warps": 4}, "cpu": {"elements": 1024, "num_warps": 4}}


@triton.jit
def _count_all(y, boundaries_ptr, BITS: tl.constexpr):
    """Number of the 2**BITS - 1 sorted boundaries < y, int32: one compare-and-add per boundary, in registers."""
    count = tl.zeros(y.shape, dtype=tl.int32)
    for k in tl.static_range((1 << BITS) - 1):
        count += (y > tl.load(boundaries_ptr + k)).to(tl.int32)
    return count


@triton.jit
def _count_symmetric(y, boundaries_ptr, BITS: tl.constexpr):
    """Same result as _count_all with half the compares, for a symmetric codebook (b[L-2-k] = -b[k] and
    b[L/2-1] = 0 exactly, L = 2**BITS levels; ``TurboQuantizer`` builds it so): count the L/2-1 positive boundaries
    below |y|; y > 0 gives L/2 + count, y <= 0 gives L/2-1 - count', where count' counts those <= |y| (|y| nudged
    up one ulp, so ties still go to the lower centroid). 0/1 summed in fp32 (exact, fewer instructions)."""
    HALF: tl.constexpr = 1 << (BITS - 1)
    magnitude = tl.abs(y)
    nudged = tl.where(y < 0, (magnitude.to(tl.int32, bitcast=True) + 1).to(tl.float32, bitcast=True), magnitude)
    count = tl.zeros(y.shape, dtype=tl.float32)
    for k in tl.static_range(HALF - 1):
        count += (nudged > tl.load(boundaries_ptr + HALF + k)).to(tl.float32)
    count = count.to(tl.int32)
    return tl.where(y > 0, HALF + count, HALF - 1 - count)


@triton.jit
def _bucketize(y, boundaries_ptr, BITS: tl.constexpr):
    """Number of sorted boundaries < y, int32 (ties go to the lower centroid and NaN goes last, like
    torch.bucketize); y finite or NaN. Up to 4 bits in registers with no dependent loads: _count_symmetric at 4 bits,
    _count_all below (which is faster where: benchmarks/RESULTS.md, ``probe_encode_bucketize.py``). 8 bits by binary
    lifting over table loads."""
    LAST: tl.constexpr = (1 << BITS) - 1
    if BITS == 4:
        indices = _count_symmetric(y, boundaries_ptr, BITS)
    elif BITS < 4:
        indices = _count_all(y, boundaries_ptr, BITS)
    else:
        indices = tl.zeros(y.shape, dtype=tl.int32)
        for level in tl.static_range(BITS):
            candidate = indices + (1 << (BITS - 1 - level))
            indices = tl.where(tl.load(boundaries_ptr + candidate - 1) < y, candidate, indices)
    return tl.where(y != y, LAST, indices)


@triton.jit(do_not_specialize=["n_tokens", "start"])
def _encode_kernel(
    x_ptr, stride_xb, stride_xh, stride_xn, stride_xd,
    y_ptr, stride_yb, stride_yh, stride_yn, stride_yd,
    rot_ptr, boundaries_ptr, centroids_ptr,
    packed_ptr, packed_y_ptr, stride_pb, stride_ph, stride_pn, stride_pbyte,
    scales_ptr, scales_y_ptr, stride_sb, stride_sh, stride_sn,
    heads, n_tokens, start, start_ptr, rot_scale,
    HEAD_DIM: tl.constexpr, BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_COL: tl.constexpr,
    ROT_PIECES: tl.constexpr, NORM_CORRECTION: tl.constexpr, DEVICE_START: tl.constexpr, PAIR: tl.constexpr,
):
    """Rows [start, start + n_tokens) of one (batch, head) of x into (packed, scales); DEVICE_START: start is read
    from start_ptr (int64), so a CUDA graph replays the launch as the cache grows. PAIR: grid axis 2 picks x or
    y -> (packed_y, scales_y), which share the quantizer, dtype and slot strides: keys and values in one launch."""
    if DEVICE_START:
        start = tl.load(start_ptr)
    b, h, rows, row_valid = row_block(heads, n_tokens, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    rows64 = rows.to(tl.int64)
    x_ptrs = x_ptr + b * stride_xb + h * stride_xh + rows64[:, None] * stride_xn + dims[None, :] * stride_xd
    slot = start + rows64
    slot_offsets = b * stride_pb + h * stride_ph + slot * stride_pn
    scale_offsets = b * stride_sb + h * stride_sh + slot * stride_sn
    packed_rows = packed_ptr + slot_offsets
    scale_ptrs = scales_ptr + scale_offsets
    if PAIR:
        if tl.program_id(2) == 1:
            x_ptrs = y_ptr + b * stride_yb + h * stride_yh + rows64[:, None] * stride_yn + dims[None, :] * stride_yd
            packed_rows = packed_y_ptr + slot_offsets
            scale_ptrs = scales_y_ptr + scale_offsets
    x = tl.load(x_ptrs, mask=row_valid[:, None], other=0.0).to(tl.float32)
    # ||x|| = m ||x / m||, m = max |x_j|, like the torch twin: no overflow of the sum of squares above ~1.8e19, no
    # underflow of tiny vectors. Zero vectors divide by 1: their norm of 0 decodes them to exact zeros.
    max_abs = tl.max(tl.abs(x), axis=1)
    scaled = x / tl.where(max_abs > 0, max_abs, 1.0)[:, None]
    scaled_norms = tl.sqrt(tl.sum(scaled * scaled, axis=1))
    scales = max_abs * scaled_norms  # ||x||
    # |unit| <= 1: safe to split into fp16.
    unit_hi, unit_lo = split_fp16(scaled * (1.0 / tl.where(scaled_norms > 0, scaled_norms, 1.0))[:, None])

    centroid_sq = tl.zeros((BLOCK_M,), tl.float32)  # ||c[i]||^2, summed column block by column block
    PER_BYTE: tl.constexpr = 8 // BITS  # indices per byte (unused at 3 bits: those pack by 3-byte groups)
    for col0 in tl.static_range(0, HEAD_DIM, BLOCK_COL):
        rotated = rotate_columns(unit_hi, unit_lo, rot_ptr, col0, HEAD_DIM, BLOCK_COL, 2, ROT_PIECES) * rot_scale
        indices = _bucketize(rotated, boundaries_ptr, BITS)
        if NORM_CORRECTION:
            centroids = tl.load(centroids_ptr + indices)
            centroid_sq += tl.sum(centroids * centroids, axis=1)
        byte0 = col0 * BITS // 8
        if BITS == 3:
            # 8 indices -> a 24-bit word -> 3 little-endian bytes.
            groups = tl.reshape(indices, (BLOCK_M, BLOCK_COL // 8, 8))
            word = tl.sum(groups << (tl.arange(0, 8) * 3)[None, None, :], axis=2)
            group_ptrs = packed_rows[:, None] + (byte0 + tl.arange(0, BLOCK_COL // 8) * 3)[None, :] * stride_pbyte
            tl.store(group_ptrs, (word & 0xFF).to(tl.uint8), mask=row_valid[:, None])
            tl.store(group_ptrs + stride_pbyte, ((word >> 8) & 0xFF).to(tl.uint8), mask=row_valid[:, None])
            tl.store(group_ptrs + 2 * stride_pbyte, ((word >> 16) & 0xFF).to(tl.uint8), mask=row_valid[:, None])
        else:
            fields = tl.reshape(indices, (BLOCK_M, BLOCK_COL // PER_BYTE, PER_BYTE))
            packed = tl.sum(fields << (tl.arange(0, PER_BYTE) * BITS)[None, None, :], axis=2)
            byte_ptrs = packed_rows[:, None] + (byte0 + tl.arange(0, BLOCK_COL // PER_BYTE))[None, :] * stride_pbyte
            tl.store(byte_ptrs, packed.to(tl.uint8), mask=row_valid[:, None])
    if NORM_CORRECTION:
        scales = scales / tl.sqrt(centroid_sq)
    tl.store(scale_ptrs, scales, mask=row_valid)


def _check(x: torch.Tensor, quantizer: TurboQuantizer, storage: QuantizedTensor, start: int | torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[-1] != quantizer.dim:
        raise ValueError(f"x must be (batch, heads, n, dim={quantizer.dim}), got {tuple(x.shape)}")
    if (storage.dim, storage.mse_bits, storage.qjl_signs is not None) != (quantizer.dim, quantizer.mse_bits,
                                                                          quantizer.qjl):
        raise ValueError("storage was not made by a quantizer with this dim, bits and qjl")
    check_same_device("encode", x.device, packed_indices=storage.packed_indices, scales=storage.scales)
    capacity = storage.scales.shape
    if len(capacity) != 3 or tuple(capacity[:2]) != tuple(x.shape[:2]):
        raise ValueError(f"storage leading shape must be (batch, heads, capacity) = ({x.shape[0]}, {x.shape[1]}, "
                         f"capacity), got {tuple(capacity)}")
    if isinstance(start, torch.Tensor):  # read on the device: the caller keeps start + n within the capacity
        if start.dtype != torch.int64 or start.device != x.device or start.numel() < 1:
            raise ValueError(f"a tensor start must be int64 on {x.device} with the start as its first element, got "
                             f"{start.dtype} {tuple(start.shape)} on {start.device}")
    elif start < 0 or start + x.shape[2] > capacity[2]:
        raise ValueError(f"start={start} + n={x.shape[2]} exceeds the storage capacity {capacity[2]}")


def encode_into_torch(x: torch.Tensor, quantizer: TurboQuantizer, storage: QuantizedTensor,
                      start: int | torch.Tensor, also: tuple[torch.Tensor, QuantizedTensor] | None = None) -> None:
    """Write the encoding of x into storage[:, :, start:start + n] (torch reference).

    x: (batch, heads, n, dim) fp16/bf16/fp32; storage: QuantizedTensor with leading shape
    (batch, heads, capacity), written in place. start: an int, or an int64 tensor on x.device whose first element
    is the start (read on the device: no host sync, and no capacity check). also: a second (states, storage)
    encoded alike (the Triton kernel takes both in one launch).
    """
    if also is not None:
        second_x, second = also
        encode_into_torch(second_x, quantizer, second, start)
    _check(x, quantizer, storage, start)
    encoded = quantizer.quantize(x, check_finite=False)
    if isinstance(start, torch.Tensor):
        positions = start.reshape(-1)[0] + torch.arange(x.shape[2], device=x.device)
    for name in ("packed_indices", "scales", "qjl_signs", "residual_norms"):
        source = getattr(encoded, name)
        if source is None:
            continue
        if isinstance(start, torch.Tensor):
            getattr(storage, name).index_copy_(2, positions, source)
        else:
            getattr(storage, name)[:, :, start:start + x.shape[2]].copy_(source)


def encode_into_triton(x: torch.Tensor, quantizer: TurboQuantizer, storage: QuantizedTensor,
                       start: int | torch.Tensor, also: tuple[torch.Tensor, QuantizedTensor] | None = None) -> None:
    """Same contract as ``encode_into_torch`` (ValueError for QJL quantizers and head dims that are not a power of
    two >= 16, which ``encode_into`` sends to the torch twin). ``also``: a second (states, storage) of x's shape
    and dtype, storage shaped and strided like ``storage``, encoded by the same quantizer in the same launch."""
    check_supported("encode", quantizer)
    _check(x, quantizer, storage, start)
    second_x, second = (x, storage) if also is None else also
    if also is not None:
        _check(second_x, quantizer, second, start)
        if not _launch_together(x, storage, second_x, second):
            raise ValueError("also: states must match x in shape and dtype, and its storage the strides of storage")
    batch, heads, n_tokens, dim = x.shape
    if n_tokens == 0:
        return None
    operands, state = kernel_state(quantizer, x.device), quantizer.state(x.device)
    packed, scales = storage.packed_indices, storage.scales
    device_start = isinstance(start, torch.Tensor)
    block_m, num_warps = row_launch(_LAUNCH, x.device, dim, n_tokens)
    grid = (cdiv(n_tokens, block_m), batch * heads, 1 if also is None else 2)
    with launch_device(x.device):
        _encode_kernel[grid](
            x, *x.stride(),
            second_x, *second_x.stride(),
            operands.rotate, state.boundaries, state.centroids,
            packed, second.packed_indices, *packed.stride(),
            scales, second.scales, *scales.stride(),
            heads, n_tokens, *((0, start) if device_start else (start, scales)), operands.rotate_scale,
            HEAD_DIM=dim, BITS=quantizer.mse_bits, BLOCK_M=block_m, BLOCK_COL=column_block(dim),
            ROT_PIECES=operands.rotate.shape[0],
            NORM_CORRECTION=quantizer.norm_correction, DEVICE_START=device_start, PAIR=also is not None,
            num_warps=num_warps,
        )
    return None


def encode_into(x: torch.Tensor, quantizer: TurboQuantizer, storage: QuantizedTensor,
                start: int | torch.Tensor, also: tuple[torch.Tensor, QuantizedTensor] | None = None) -> None:
    """Encode x (batch, heads, n, dim) (and ``also``) into storage[:, :, start:start + n] with the backend for
    x.device."""
    run = encode_into_triton if use_triton(x.device, "encode", quantizer) else encode_into_torch
    return run(x, quantizer, storage, start, also)


def _launch_together(x: torch.Tensor, storage: QuantizedTensor, y: torch.Tensor, y_storage: QuantizedTensor) -> bool:
    """Whether one encode launch can take both: same shape and dtype, slots of the same strides."""
    return (x.shape, x.dtype) == (y.shape, y.dtype) and all(
        a.stride() == b.stride() for a, b in zip(storage.tensors(), y_storage.tensors()))


def encode_pair_into(keys: torch.Tensor, values: torch.Tensor, key_quantizer: TurboQuantizer,
                     value_quantizer: TurboQuantizer, key_storage: QuantizedTensor, value_storage: QuantizedTensor,
                     start: int | torch.Tensor) -> None:
    """``encode_into`` for keys and values (B, H, n, D), as one call (one Triton launch) when they share the
    quantizer (bits and seed), dtype and storage strides, as a decode step's keys and values do: a launch per layer
    less. Otherwise one call each."""
    if key_quantizer is value_quantizer and _launch_together(keys, key_storage, values, value_storage):
        encode_into(keys, key_quantizer, key_storage, start, also=(values, value_storage))
    else:
        encode_into(keys, key_quantizer, key_storage, start)
        encode_into(values, value_quantizer, value_storage, start)
