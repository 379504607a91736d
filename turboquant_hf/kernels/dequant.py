"""Dequantize a QuantizedTensor into a preallocated dense tensor: Triton kernel + torch twin.

``load_packed`` + ``decode_packed`` (shared with the fused attention kernel) turn a tile of packed vectors
into their fp16 centroids. Decoding gathers from a small lookup table (``_common.centroid_table``) whose entries
hold the fp16 centroids of 1, 2 or 4 neighbouring coordinates at once (one gather per byte at 2 and 4 bits),
and only then interleaves the gathered values back into coordinate order: gathering after the interleave
would make Triton shuffle a tile of 64-bit pointers through shared memory. The centroids are fp16 values
(see ``TurboQuantizer``), so the tile is exact and fp16 tensor-core dots lose nothing on that side.
"""

from __future__ import annotations

import torch

from ..quantizer import QuantizedTensor, TurboQuantizer
from ._common import (
    cdiv, check_same_device, check_supported, kernel_state, launch_device, row_block, row_launch, tl, triton,
    use_triton,
)
from .rotate import column_block, rotate_columns

# Launch per device type (see _common.row_launch; each program reads the rotation's pieces from L2, so larger blocks
# cut that traffic); bench_attention.py --sweep times alternatives on a GPU.
_LAUNCH = {"cuda": {"elements": 8192, "num_warps": 4}, "cpu": {"elements": 1024, "num_warps": 4}}
# Vectors per slice of the torch twin (bounds its temporaries to ~100 MB at head_dim 128).
_TORCH_SLICE_VECTORS = 1 << 14


@triton.jit
def _interleave(fields_even, fields_odd):
    """(..., G) and (..., G) -> (..., 2G) alternating even, odd: the packing order of neighbours."""
    joined = tl.join(fields_even, fields_odd)
    return tl.reshape(joined, (joined.shape[0], joined.shape[1] * 2))


@triton.jit
def fp16_field(entries, t: tl.constexpr):
    """The fp16 at bits 16t..16t+15 of int32/int64 table entries."""
    return ((entries >> (16 * t)) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def load_packed(row_ptrs, row_valid, stride_byte, BITS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """row_ptrs (BLOCK_N,) uint8 pointers to each vector's first byte -> (BLOCK_N, HEAD_DIM * BITS / 8) uint8
    bytes, or at 3 bits (BLOCK_N, HEAD_DIM / 8) int32 24-bit little-endian words (index j of a group at bit 3j).
    Invalid rows read 0."""
    if BITS == 3:
        group_ptrs = row_ptrs[:, None] + (tl.arange(0, HEAD_DIM // 8) * 3)[None, :] * stride_byte
        byte0 = tl.load(group_ptrs, mask=row_valid[:, None], other=0).to(tl.int32)
        byte1 = tl.load(group_ptrs + stride_byte, mask=row_valid[:, None], other=0).to(tl.int32)
        byte2 = tl.load(group_ptrs + 2 * stride_byte, mask=row_valid[:, None], other=0).to(tl.int32)
        words = byte0 | (byte1 << 8) | (byte2 << 16)
    else:
        byte_ptrs = row_ptrs[:, None] + tl.arange(0, HEAD_DIM * BITS // 8)[None, :] * stride_byte
        words = tl.load(byte_ptrs, mask=row_valid[:, None], other=0)
    return words


@triton.jit
def decode_packed(words, table_ptr, BITS: tl.constexpr):
    """Words of ``load_packed`` -> (BLOCK_N, HEAD_DIM) fp16 centroids in coordinate order (table: _common.centroid_table)."""
    words = words.to(tl.int32)
    if BITS == 8:
        centroids = tl.load(table_ptr + words)
    elif BITS == 4:  # one byte = coordinates 2g, 2g+1
        entries = tl.load(table_ptr + words)
        centroids = _interleave(fp16_field(entries, 0), fp16_field(entries, 1))
    elif BITS == 2:  # one byte = coordinates 4g..4g+3
        entries = tl.load(table_ptr + words)
        centroids = _interleave(_interleave(fp16_field(entries, 0), fp16_field(entries, 2)),
                                _interleave(fp16_field(entries, 1), fp16_field(entries, 3)))
    elif BITS == 3:  # one 24-bit word = coordinates 8g..8g+7, fetched as 4 pairs (2i, 2i+1)
        pair0 = tl.load(table_ptr + (words & 63))
        pair1 = tl.load(table_ptr + ((words >> 6) & 63))
        pair2 = tl.load(table_ptr + ((words >> 12) & 63))
        pair3 = tl.load(table_ptr + (words >> 18))
        evens = _interleave(_interleave(fp16_field(pair0, 0), fp16_field(pair2, 0)), _interleave(fp16_field(pair1, 0), fp16_field(pair3, 0)))
        odds = _interleave(_interleave(fp16_field(pair0, 1), fp16_field(pair2, 1)), _interleave(fp16_field(pair1, 1), fp16_field(pair3, 1)))
        centroids = _interleave(evens, odds)
    else:  # 1 bit: one byte = coordinates 8g..8g+7, fetched as two quads (low nibble 0..3, high nibble 4..7)
        low = tl.load(table_ptr + (words & 15))
        high = tl.load(table_ptr + (words >> 4))
        evens = _interleave(_interleave(fp16_field(low, 0), fp16_field(high, 0)), _interleave(fp16_field(low, 2), fp16_field(high, 2)))
        odds = _interleave(_interleave(fp16_field(low, 1), fp16_field(high, 1)), _interleave(fp16_field(low, 3), fp16_field(high, 3)))
        centroids = _interleave(evens, odds)
    return centroids


@triton.jit(do_not_specialize=["n_tokens"])
def _dequant_kernel(
    packed_ptr, stride_pb, stride_ph, stride_pn, stride_pbyte,
    scales_ptr, stride_sb, stride_sh, stride_sn,
    rot_ptr, table_ptr,
    out_ptr, stride_ob, stride_oh, stride_on, stride_od,
    heads, n_tokens, rot_scale,
    HEAD_DIM: tl.constexpr, BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_COL: tl.constexpr,
    ROT_PIECES: tl.constexpr, OUT_MAX: tl.constexpr,
):
    b, h, rows, row_valid = row_block(heads, n_tokens, BLOCK_M)
    rows64 = rows.to(tl.int64)
    row_ptrs = packed_ptr + b * stride_pb + h * stride_ph + rows64 * stride_pn
    scales = tl.load(scales_ptr + b * stride_sb + h * stride_sh + rows64 * stride_sn, mask=row_valid, other=0.0)
    codes = decode_packed(load_packed(row_ptrs, row_valid, stride_pbyte, BITS, HEAD_DIM), table_ptr, BITS)
    scales = scales * rot_scale
    out_rows = out_ptr + b * stride_ob + h * stride_oh + rows64 * stride_on
    cols = tl.arange(0, BLOCK_COL)
    # The fp16 centroids are exact: c[idx] @ R costs one fp16 dot per piece of R (one for Hadamard).
    for col0 in tl.static_range(0, HEAD_DIM, BLOCK_COL):
        dense = rotate_columns(codes, codes, rot_ptr, col0, HEAD_DIM, BLOCK_COL, 1, ROT_PIECES) * scales[:, None]
        # Saturate at the output dtype's largest value like the torch twin (NaN fails both compares: kept).
        dense = tl.where(dense > OUT_MAX, OUT_MAX, tl.where(dense < -OUT_MAX, -OUT_MAX, dense))
        tl.store(out_rows[:, None] + (col0 + cols)[None, :] * stride_od,
                 dense.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


def _check(q: QuantizedTensor, quantizer: TurboQuantizer, out: torch.Tensor) -> None:
    quantizer._check_quantized(q)
    check_same_device("dequantize", out.device, packed_indices=q.packed_indices, scales=q.scales)
    if q.scales.dim() != 3 or tuple(out.shape) != (*q.scales.shape, quantizer.dim):
        raise ValueError(f"out must be (batch, heads, n, dim) = {(*q.scales.shape, quantizer.dim)} for q of leading "
                         f"shape (batch, heads, n), got {tuple(out.shape)}")


def dequantize_into_torch(q: QuantizedTensor, quantizer: TurboQuantizer, out: torch.Tensor) -> None:
    """Write norm * R^T c[idx] (+ the QJL term) into out (torch reference).

    q: QuantizedTensor with leading shape (batch, heads, n) (views such as storage[:, :, :n] are fine);
    out: (batch, heads, n, dim) fp16/bf16/fp32, written in place.
    """
    _check(q, quantizer, out)
    # In token slices of about _TORCH_SLICE_VECTORS vectors: the reference's int64 indices and fp32 temporaries
    # take ~25x the output's bytes, which would make a long layer's transient past cost gigabytes.
    batch, heads, n_tokens = q.scales.shape
    step = max(1, _TORCH_SLICE_VECTORS // max(1, batch * heads))
    for start in range(0, n_tokens, step):
        out[:, :, start:start + step].copy_(quantizer.dequantize(q[:, :, start:start + step], out.dtype))


def dequantize_into_triton(q: QuantizedTensor, quantizer: TurboQuantizer, out: torch.Tensor) -> None:
    """Same contract as ``dequantize_into_torch``; within 1e-5 relative of it in fp32.

    ValueError for QJL quantizers and head dims that are not a power of two >= 16 (``dequantize_into`` sends them to
    the torch twin).
    """
    check_supported("dequantize", quantizer)
    _check(q, quantizer, out)
    batch, heads, n_tokens = q.scales.shape
    if n_tokens == 0:
        return None
    device = out.device
    operands = kernel_state(quantizer, device)
    block_m, num_warps = row_launch(_LAUNCH, device, quantizer.dim, n_tokens)
    grid = (cdiv(n_tokens, block_m), batch * heads)
    with launch_device(device):
        _dequant_kernel[grid](
            q.packed_indices, *q.packed_indices.stride(),
            q.scales, *q.scales.stride(),
            operands.unrotate, operands.table,
            out, *out.stride(),
            heads, n_tokens, operands.unrotate_scale,
            HEAD_DIM=quantizer.dim, BITS=quantizer.mse_bits, BLOCK_M=block_m,
            BLOCK_COL=column_block(quantizer.dim), ROT_PIECES=operands.unrotate.shape[0],
            OUT_MAX=torch.finfo(out.dtype).max, num_warps=num_warps,
        )
    return None


def dequantize_into(q: QuantizedTensor, quantizer: TurboQuantizer, out: torch.Tensor) -> None:
    """Dequantize q (batch, heads, n) into out (batch, heads, n, dim) with the backend for out.device."""
    run = dequantize_into_triton if use_triton(out.device, "dequantize", quantizer) else dequantize_into_torch
    return run(q, quantizer, out)
