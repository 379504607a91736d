"""Exact bit packing: round trips, byte counts, the documented byte layout, and bad arguments."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from turboquant_hf import pack, packed_size, unpack
from turboquant_hf.packing import field_indices

BITS = (1, 2, 3, 4, 8)


@settings(max_examples=50, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    lead=st.lists(st.integers(0, 4), max_size=3),
    groups=st.integers(1, 24),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip(bits, lead, groups, seed):
    """unpack(pack(i)) == i for random indices, leading shapes (incl. empty) and dims (multiples of 8)."""
    dim = 8 * groups
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, 2**bits, (*lead, dim), generator=generator)
    packed = pack(indices, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*lead, dim * bits // 8)
    restored = unpack(packed, bits, dim)
    assert restored.dtype == torch.int64
    assert torch.equal(restored, indices)


@pytest.mark.parametrize("bits", BITS)
def test_extreme_values_round_trip(bits):
    """All-zero and all-max indices survive (no sign extension or carry between groups)."""
    for value in (0, 2**bits - 1):
        indices = torch.full((3, 64), value)
        assert torch.equal(unpack(pack(indices, bits), bits, 64), indices)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dim", (8, 64, 80, 96, 128, 256))
def test_packed_size_is_exact(dim, bits):
    """A vector of dim b-bit indices takes exactly dim * b / 8 bytes."""
    assert packed_size(dim, bits) == dim * bits // 8
    assert pack(torch.zeros(dim, dtype=torch.int64), bits).numel() == dim * bits // 8


@pytest.mark.parametrize(
    "bits, indices, expected",
    [
        # 8 bits: one index per byte.
        (8, [0, 1, 127, 128, 200, 255, 7, 9], [0, 1, 127, 128, 200, 255, 7, 9]),
        # 4 bits: byte = i0 | i1 << 4 (low nibble first).
        (4, [1, 2, 3, 4, 5, 6, 7, 8], [0x21, 0x43, 0x65, 0x87]),
        (4, [15, 0, 0, 15, 10, 11, 12, 13], [0x0F, 0xF0, 0xBA, 0xDC]),
        # 2 bits: byte = i0 | i1 << 2 | i2 << 4 | i3 << 6.
        (2, [0, 1, 2, 3, 3, 0, 0, 0], [0b11100100, 0b00000011]),
        # 1 bit: byte = sum_j i_j << j.
        (1, [1, 0, 0, 0, 0, 0, 0, 1], [0x81]),
        (1, [0, 1, 1, 0, 0, 0, 0, 0], [0x06]),
        # 3 bits: word = sum_j i_j << 3j = 0b000_111_110_101_100_011_010_001 = 0x1F58D1, little-endian.
        (3, [1, 2, 3, 4, 5, 6, 7, 0], [0xD1, 0x58, 0x1F]),
        # 3 bits, all 7: 24 one-bits.
        (3, [7] * 8, [0xFF, 0xFF, 0xFF]),
        # 3 bits, only i_2 = 7: bits 6..8 straddle bytes 0 and 1.
        (3, [0, 0, 7, 0, 0, 0, 0, 0], [0xC0, 0x01, 0x00]),
    ],
)
def test_documented_layout(bits, indices, expected):
    """Hand-written examples of the documented layout, packed and unpacked."""
    packed = pack(torch.tensor(indices), bits)
    assert packed.tolist() == expected
    assert unpack(torch.tensor(expected, dtype=torch.uint8), bits, 8).tolist() == indices


def test_groups_are_independent_and_in_order():
    """Each group of 8 indices occupies its own b bytes, in order along the last dim."""
    first, second = [1, 2, 3, 4, 5, 6, 7, 0], [7] * 8
    assert pack(torch.tensor(first + second), 3).tolist() == [0xD1, 0x58, 0x1F, 0xFF, 0xFF, 0xFF]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(0, 16), (2, 0, 16), (0, 3, 64)])
def test_empty_tensors(shape, bits):
    """Empty leading dims pack to empty uint8 tensors and unpack back."""
    indices = torch.zeros(shape, dtype=torch.int64)
    packed = pack(indices, bits)
    assert packed.shape == (*shape[:-1], shape[-1] * bits // 8) and packed.dtype == torch.uint8
    assert unpack(packed, bits, shape[-1]).shape == shape


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dim", (1, 7, 12, 100))
def test_dim_not_multiple_of_8_raises(dim, bits):
    """dim must be a multiple of 8 for packed_size, pack and unpack."""
    with pytest.raises(ValueError, match="dim"):
        packed_size(dim, bits)
    with pytest.raises(ValueError, match="dim"):
        pack(torch.zeros(2, dim, dtype=torch.int64), bits)
    with pytest.raises(ValueError, match="dim"):
        unpack(torch.zeros(2, 16, dtype=torch.uint8), bits, dim)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("delta", (-1, 1, 8))
def test_wrong_packed_size_raises(bits, delta):
    """unpack rejects a packed last dim that is not dim * bits / 8."""
    packed = torch.zeros(2, packed_size(64, bits) + delta, dtype=torch.uint8)
    with pytest.raises(ValueError, match="packed"):
        unpack(packed, bits, 64)


@pytest.mark.parametrize("bits", (0, 5, 6, 7, 16))
def test_unsupported_bits_raise(bits):
    """Only 1, 2, 3, 4 and 8 bits are supported."""
    with pytest.raises(ValueError, match="bits"):
        packed_size(64, bits)
    with pytest.raises(ValueError, match="bits"):
        pack(torch.zeros(64, dtype=torch.int64), bits)
    with pytest.raises(ValueError, match="bits"):
        unpack(torch.zeros(64, dtype=torch.uint8), bits, 64)


@pytest.mark.parametrize("bits, field_bits", [(1, 4), (1, 8), (2, 8), (3, 6), (4, 8), (8, 8)])
def test_field_indices_recompose_each_field(bits, field_bits):
    """Row v of field_indices holds the indices whose little-endian packing is v; at 8 bits per field it agrees
    with unpack."""
    fields = field_indices(bits, field_bits)
    assert fields.shape == (1 << field_bits, field_bits // bits) and int(fields.max()) < 1 << bits
    recomposed = (fields << (torch.arange(field_bits // bits) * bits)).sum(-1)
    assert torch.equal(recomposed, torch.arange(1 << field_bits))
    if field_bits == 8 and bits != 8:
        per_row = 8 // bits  # 8 bytes of every value v make one packed row of 8 * per_row indices
        packed = torch.arange(256, dtype=torch.uint8).reshape(32, 8)
        assert torch.equal(unpack(packed, bits, 8 * per_row), fields.reshape(32, 8 * per_row))
