"""Rotations inside the Triton kernels: fp16 tensor-core dots whose products are exact, summed in fp32.

A rotation matrix M (R or R^T, fp32) is handed to a kernel as ``pieces``: P fp16 matrices whose sum is M / scale.
The randomized Hadamard rotation is sqrt(D) * R = H diag(signs), whose entries are +-1: one exact piece, scale
1 / sqrt(D). A dense (Haar) rotation is split into fp16 hi + lo (2 pieces, 22 bits), scale 1. The other operand
is split the same way (``split_fp16``): fp16 tiles are exact as they are (one piece), fp32 tiles become fp16
hi + lo. Each product of two pieces is exact in the tensor core's fp32 accumulator, so a rotation costs one to
three fp16 dots instead of an fp32 FMA matmul (the encode kernel spent most of its time there), within ~2^-22
relative of fp32: the lo x lo term is dropped. fp32 tiles must stay below 65504 in
magnitude (callers normalize first or document the bound). fp16, not bf16: Triton's interpreter computes bf16
dots on the raw bits (3.9), and the same operations must run under the interpreter in the CPU tests.
"""

from __future__ import annotations

import torch

from ._common import tl, triton

_COLUMN_BLOCK = 64  # output columns per rotate_columns call in the kernels (a (rows, 64) fp32 tile)


def column_block(dim: int) -> int:
    """BLOCK_COL of a kernel that rotates rows of ``dim`` coordinates: 64 output columns per rotate_columns call,
    fewer when the rows are shorter."""
    return min(_COLUMN_BLOCK, dim)


def tile_pieces(dtype: torch.dtype) -> int:
    """How many fp16 pieces a tile of ``dtype`` meets ``rotate_columns`` in: 1 for fp16 (exact), else 2."""
    return 1 if dtype == torch.float16 else 2


@triton.jit
def split_fp16(a):
    """fp32 a -> (hi, lo) fp16 with hi + lo = a to about 2^-22 relative: fp16 tensor-core dots against both
    reach fp32-level accuracy. Needs |a| < 65504."""
    hi = a.to(tl.float16)
    return hi, (a - hi.to(tl.float32)).to(tl.float16)


@triton.jit
def rotate_columns(hi, lo, pieces_ptr, col0, HEAD_DIM: tl.constexpr, BLOCK_COL: tl.constexpr,
                   TILE_PIECES: tl.constexpr, ROT_PIECES: tl.constexpr):
    """Columns col0 .. col0 + BLOCK_COL of tile @ (sum of the ROT_PIECES fp16 (HEAD_DIM, HEAD_DIM) matrices at
    pieces_ptr), fp32 (ROWS, BLOCK_COL). tile (ROWS, HEAD_DIM) = hi when TILE_PIECES == 1 (an fp16 tile; lo is
    ignored), else hi + lo (``split_fp16`` of an fp32 tile). Dots of piece pairs (i, j) with
    i + j < max(TILE_PIECES, ROT_PIECES), accumulated in fp32."""
    rows = tl.arange(0, HEAD_DIM)
    cols = col0 + tl.arange(0, BLOCK_COL)
    acc = tl.zeros((hi.shape[0], BLOCK_COL), tl.float32)
    for j in tl.static_range(ROT_PIECES):
        matrix = tl.load(pieces_ptr + j * HEAD_DIM * HEAD_DIM + rows[:, None] * HEAD_DIM + cols[None, :])
        acc = tl.dot(hi, matrix, acc)
        if TILE_PIECES > 1 and j == 0:
            acc = tl.dot(lo, matrix, acc)
    return acc
