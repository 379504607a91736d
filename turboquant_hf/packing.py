"""Exact bit packing of b-bit indices along the last dim (torch reference).

Layout, for each group of 8 consecutive indices i_0..i_7 (b bits each) along the last dim: the
8*b-bit integer sum_j i_j << (b*j) is stored little-endian in b bytes. So 4-bit packs two per byte
(low nibble first), 2-bit four per byte, 1-bit eight per byte, 3-bit eight values in three bytes,
8-bit one per byte. A vector of dim indices takes exactly dim * b / 8 bytes.
"""

from __future__ import annotations

import torch

PACK_BITS = (1, 2, 3, 4, 8)


def packed_size(dim: int, bits: int) -> int:
    """Bytes that ``pack`` writes for one vector of ``dim`` ``bits``-bit indices."""
    if bits not in PACK_BITS:
        raise ValueError(f"bits must be one of {PACK_BITS}, got {bits!r}")
    if dim % 8 != 0:
        raise ValueError(f"dim must be a multiple of 8 for exact bit packing, got {dim}")
    return dim * bits // 8


def field_indices(bits: int, field_bits: int) -> torch.Tensor:
    """(2**field_bits, field_bits // bits) int64: row v = the ``bits``-bit indices that a ``field_bits``-bit field of
    value v holds, low bits first (the order of ``pack``). Lookup tables over packed fields are built from it."""
    values = torch.arange(1 << field_bits)
    shifts = torch.arange(field_bits // bits) * bits
    return (values[:, None] >> shifts) & ((1 << bits) - 1)


def pack(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """indices: (..., dim) integer in [0, 2**bits) -> (..., dim * bits // 8) uint8."""
    dim = indices.shape[-1]
    nbytes = packed_size(dim, bits)
    if bits == 8:
        return indices.to(torch.uint8)
    groups = indices.to(torch.int64).reshape(*indices.shape[:-1], dim // 8, 8)
    shifts = torch.arange(8, device=indices.device, dtype=torch.int64) * bits
    word = (groups << shifts).sum(dim=-1, dtype=torch.int64)  # (..., dim/8) holds 8*bits bits
    byte_shifts = torch.arange(bits, device=indices.device, dtype=torch.int64) * 8
    packed = (word.unsqueeze(-1) >> byte_shifts) & 0xFF
    return packed.to(torch.uint8).reshape(*indices.shape[:-1], nbytes)


def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """packed: (..., dim * bits // 8) uint8 -> (..., dim) int64 indices in [0, 2**bits)."""
    nbytes = packed_size(dim, bits)
    if packed.shape[-1] != nbytes:
        raise ValueError(f"packed last dim must be {nbytes} for dim={dim}, bits={bits}, got {packed.shape[-1]}")
    if bits == 8:
        return packed.long()
    lead = packed.shape[:-1]
    chunks = packed.to(torch.int64).reshape(*lead, dim // 8, bits)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = (chunks << byte_shifts).sum(dim=-1, dtype=torch.int64)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    indices = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return indices.reshape(*lead, dim).long()
