"""Dequantize a QuantizedTensor into a preallocated dense tensor: Triton kernel + torch twin.

``centroid_tile`` (shared with the fused attention kernel) unpacks a tile of packed vectors in registers
(shifts and masks, then ``tl.join`` to restore coordinate order) and gathers each coordinate's centroid
from the codebook in global memory: at most 64 bytes for <= 4 bits, so every warp-wide gather hits one
L1 line.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton (macOS, Windows): the torch twins still work and backend_for picks them
    from types import SimpleNamespace

    triton, tl = SimpleNamespace(jit=lambda fn: fn), None

from ..backend import backend_for, warn_once
from ..quantizer import QuantizedTensor, TurboQuantizer
from .encode import rotation_matrices, triton_unsupported

# Coordinates decoded and contracted per tl.dot step.
_BLOCK_K = 32
_codebook_cache: dict[tuple, torch.Tensor] = {}


def round_to_tf32(values: torch.Tensor) -> torch.Tensor:
    """fp32 -> the nearest tf32 value (10 mantissa bits, halves away from zero), kept as fp32."""
    bits = values.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & -0x2000).view(torch.float32)


def codebook_on(quantizer: TurboQuantizer, device: torch.device, tf32: bool = False) -> torch.Tensor:
    """The (2**mse_bits,) fp32 centroids on ``device``; ``tf32`` rounds them to nearest tf32 (for
    tensor-core dots, which would otherwise truncate them). Cached per (dim, bits, device, tf32)."""
    key = (quantizer.dim, quantizer.mse_bits, device, tf32)
    found = _codebook_cache.get(key)
    if found is None:
        centroids = quantizer.state(device)[1].float().contiguous()
        found = _codebook_cache[key] = round_to_tf32(centroids) if tf32 else centroids
    return found


@triton.jit
def _interleave(fields_even, fields_odd):
    """(..., G) and (..., G) -> (..., 2G) alternating even, odd: the packing order of neighbours."""
    joined = tl.join(fields_even, fields_odd)
    return tl.reshape(joined, (joined.shape[0], joined.shape[1] * 2))


@triton.jit
def centroid_tile(row_ptrs, row_valid, stride_byte, codebook_ptr, BITS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Packed vectors -> their centroids: row_ptrs (BLOCK_N,) uint8 pointers to each vector's first byte,
    row_valid (BLOCK_N,) bool -> (BLOCK_N, HEAD_DIM) fp32 (invalid rows decode index 0, finite)."""
    MASK: tl.constexpr = (1 << BITS) - 1
    if BITS == 3:
        # Group g of 8 indices = bytes 3g..3g+2, a little-endian 24-bit word, index j at bit 3j.
        group_ptrs = row_ptrs[:, None] + (tl.arange(0, HEAD_DIM // 8) * 3)[None, :] * stride_byte
        byte0 = tl.load(group_ptrs, mask=row_valid[:, None], other=0).to(tl.int32)
        byte1 = tl.load(group_ptrs + stride_byte, mask=row_valid[:, None], other=0).to(tl.int32)
        byte2 = tl.load(group_ptrs + 2 * stride_byte, mask=row_valid[:, None], other=0).to(tl.int32)
        word = byte0 | (byte1 << 8) | (byte2 << 16)
        evens = _interleave(_interleave(word & MASK, (word >> 12) & MASK),
                            _interleave((word >> 6) & MASK, (word >> 18) & MASK))
        odds = _interleave(_interleave((word >> 3) & MASK, (word >> 15) & MASK),
                           _interleave((word >> 9) & MASK, (word >> 21) & MASK))
        indices = _interleave(evens, odds)
    else:
        PER_BYTE: tl.constexpr = 8 // BITS
        byte_ptrs = row_ptrs[:, None] + tl.arange(0, HEAD_DIM // PER_BYTE)[None, :] * stride_byte
        word = tl.load(byte_ptrs, mask=row_valid[:, None], other=0).to(tl.int32)
        if PER_BYTE == 1:
            indices = word
        elif PER_BYTE == 2:
            indices = _interleave(word & MASK, word >> 4)
        elif PER_BYTE == 4:
            indices = _interleave(_interleave(word & MASK, (word >> 4) & MASK),
                                  _interleave((word >> 2) & MASK, word >> 6))
        else:
            evens = _interleave(_interleave(word & 1, (word >> 4) & 1), _interleave((word >> 2) & 1, (word >> 6) & 1))
            odds = _interleave(_interleave((word >> 1) & 1, (word >> 5) & 1), _interleave((word >> 3) & 1, word >> 7))
            indices = _interleave(evens, odds)
    return tl.load(codebook_ptr + indices)


@triton.jit
def _dequant_kernel(
    packed_ptr, stride_pb, stride_ph, stride_pn, stride_pbyte,
    norms_ptr, stride_nb, stride_nh, stride_nn,
    rot_ptr, codebook_ptr,
    out_ptr, stride_ob, stride_oh, stride_on, stride_od,
    heads, n_tokens,
    HEAD_DIM: tl.constexpr, BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < n_tokens
    rows64 = rows.to(tl.int64)
    row_ptrs = packed_ptr + b * stride_pb + h * stride_ph + rows64 * stride_pn
    norms = tl.load(norms_ptr + b * stride_nb + h * stride_nh + rows64 * stride_nn, mask=row_valid, other=0.0)
    dims = tl.arange(0, HEAD_DIM)
    ks = tl.arange(0, BLOCK_K)
    dense = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    # c[idx] @ R contracted over BLOCK_K coordinates at a time (decoded once each): small dot operands
    # stay in registers where a whole (BLOCK_M, HEAD_DIM) operand would spill.
    for k0 in range(0, HEAD_DIM, BLOCK_K):
        codes = centroid_tile(row_ptrs + (k0 * BITS // 8) * stride_pbyte, row_valid, stride_pbyte, codebook_ptr, BITS,
                              BLOCK_K)
        rot = tl.load(rot_ptr + (k0 + ks)[:, None] * HEAD_DIM + dims[None, :])
        dense = tl.dot(codes, rot, dense, input_precision=PRECISION)
    out_ptrs = out_ptr + b * stride_ob + h * stride_oh + rows64[:, None] * stride_on + dims[None, :] * stride_od
    tl.store(out_ptrs, (dense * norms[:, None]).to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


def _check(q: QuantizedTensor, quantizer: TurboQuantizer, out: torch.Tensor) -> None:
    quantizer._check_quantized(q)
    if q.norms.dim() != 3 or tuple(out.shape) != (*q.norms.shape, quantizer.dim):
        raise ValueError(f"out must be (batch, heads, n, dim) = {(*q.norms.shape, quantizer.dim)} for q of leading "
                         f"shape (batch, heads, n), got {tuple(out.shape)}")


def dequantize_into_torch(q: QuantizedTensor, quantizer: TurboQuantizer, out: torch.Tensor) -> None:
    """Write norm * R^T c[idx] (+ the QJL term) into out (torch reference).

    q: QuantizedTensor with leading shape (batch, heads, n) (views such as storage[:, :, :n] are fine);
    out: (batch, heads, n, dim) fp16/bf16/fp32, written in place.
    """
    _check(q, quantizer, out)
    out.copy_(quantizer.dequantize(q, out.dtype))


def dequantize_into_triton(q: QuantizedTensor, quantizer: TurboQuantizer, out: torch.Tensor) -> None:
    """Same contract as ``dequantize_into_torch``; within 1e-5 relative of it in fp32.

    QJL quantizers and odd head dims use the torch twin.
    """
    reason = triton_unsupported(quantizer)
    if reason is not None:
        warn_once(f"turboquant_hf: Triton dequantize does not support {reason}; using the torch path")
        return dequantize_into_torch(q, quantizer, out)
    _check(q, quantizer, out)
    batch, heads, n_tokens = q.norms.shape
    if n_tokens == 0:
        return None
    device = out.device
    rot, _ = rotation_matrices(quantizer, device)
    codebook = codebook_on(quantizer, device)
    on_cuda = device.type == "cuda"
    block_m = 32 if on_cuda else 16
    grid = (triton.cdiv(n_tokens, block_m), batch * heads)
    _dequant_kernel[grid](
        q.packed_indices, *q.packed_indices.stride(),
        q.norms, *q.norms.stride(),
        rot, codebook,
        out, *out.stride(),
        heads, n_tokens,
        HEAD_DIM=quantizer.dim, BITS=quantizer.mse_bits, BLOCK_M=block_m, BLOCK_K=min(_BLOCK_K, quantizer.dim),
        # 3xTF32 keeps fp32 accuracy (~1e-6) at tensor-core speed; the interpreter ignores the setting.
        PRECISION="tf32x3" if on_cuda else "ieee",
        num_warps=8 if on_cuda else 4,
    )
    return None


def dequantize_into(q: QuantizedTensor, quantizer: TurboQuantizer, out: torch.Tensor) -> None:
    """Dequantize q (batch, heads, n) into out (batch, heads, n, dim) with the backend for out.device."""
    if backend_for(out.device) == "triton":
        return dequantize_into_triton(q, quantizer, out)
    return dequantize_into_torch(q, quantizer, out)
