"""Fractional bits (2.5, 3.5, 4.5): an outlier-channel split, each part quantized by its own TurboQuantizer.

The TurboQuant paper reaches 2.5 and 3.5 bits by splitting the channels of each vector into a fixed "outlier" set
and the rest, and running two independent TurboQuant instances on them, the outliers at one more bit. Here:

    bits   outlier channels        outlier bits   the other channels   effective bits per coordinate
    2.5    dim / 2                 3              2                    (3 + 2) / 2 = 2.5
    3.5    dim / 2                 4              3                    (4 + 3) / 2 = 3.5
    4.5    dim / 8                 8              4                    (8 + 4 * 7) / 8 = 4.5 (there is no 5-bit code)

The paper's 2.5-bit example (by our reading: 32 outlier channels at 3 bits and 96 at 2, of 128) averages 2.25 bits
as written; a half split is the one whose bits are the nominal value exactly. Each part has its own rotation (of
its size), Lloyd-Max codebook and fp32 scale, and its own exact packing: for head_dim 128 at 3.5 bits a vector
takes 32 + 4 + 24 + 4 = 64 bytes (TQ3: 52, TQ4: 68). The second scale costs 32 bits per vector: at head_dim 64,
3.5 bits take TQ4's 36 bytes and 2.5 bits TQ3's 28 (benchmarks/RESULTS.md, "Fractional bits", measures both).

Which channels are outliers is layer state, not quantizer state (``outlier_order``): the storage chooses them per
sequence and kv head from the first tokens it compresses after the sinks and keeps them from then on; the quantizer
here sees vectors already in that order (outlier channels first).
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from .quantizer import QuantizedTensor, TurboQuantizer, shared_quantizer

# bits -> (d, outlier bits, the other channels' bits): head_dim / d channels are outliers.
SPLITS = {2.5: (2, 3, 2), 3.5: (2, 4, 3), 4.5: (8, 8, 4)}
FRACTIONAL_BITS = tuple(SPLITS)


def outlier_channels(name: str, bits: float, dim: int) -> int:
    """How many of ``dim`` channels are outliers at ``bits``; ValueError (naming ``name``) unless both parts pack
    exactly (each a multiple of 8 channels)."""
    divisor, outlier_bits, regular_bits = SPLITS[bits]
    if dim < 8 * divisor or dim % (8 * divisor):
        raise ValueError(f"{name}={bits} keeps 1/{divisor} of the head_dim channels at {outlier_bits} bits and the "
                         f"rest at {regular_bits}, each part packed exactly: it needs head_dim a multiple of "
                         f"{8 * divisor}, got {dim}; use integer bits (1, 2, 3, 4, 8) for this model")
    return dim // divisor


@dataclasses.dataclass
class SplitQuantizedTensor:
    """Compressed (..., dim) vectors in outlier order: ``outliers`` holds coordinates [0, k), ``regular`` [k, dim),
    each a QuantizedTensor with the same leading shape (...)."""

    outliers: QuantizedTensor
    regular: QuantizedTensor

    def tensors(self) -> list[torch.Tensor]:
        return [*self.outliers.tensors(), *self.regular.tensors()]

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """{"outliers.packed_indices": ..., "regular.scales": ...}: the tensors held, by field."""
        return {f"{part}.{name}": tensor for part in ("outliers", "regular")
                for name, tensor in getattr(self, part).named_tensors().items()}

    @property
    def shape(self) -> torch.Size:
        """Shape of the vectors this holds, (..., dim)."""
        return torch.Size((*self.outliers.scales.shape, self.outliers.dim + self.regular.dim))

    @property
    def device(self) -> torch.device:
        return self.outliers.device

    @property
    def nbytes(self) -> int:
        return self.outliers.nbytes + self.regular.nbytes

    def _map(self, fn) -> SplitQuantizedTensor:
        return SplitQuantizedTensor(self.outliers._map(fn), self.regular._map(fn))

    def to(self, device: torch.device | str) -> SplitQuantizedTensor:
        return self._map(lambda t: t.to(device))

    def __getitem__(self, key) -> SplitQuantizedTensor:
        """Index the leading dims, as ``QuantizedTensor``."""
        return SplitQuantizedTensor(self.outliers[key], self.regular[key])


class SplitQuantizer:
    """TurboQuant at fractional ``bits`` (``SPLITS``) for (..., dim) vectors whose first ``outlier_channels``
    coordinates are the outlier channels: two ``TurboQuantizer`` parts (``outliers``, ``regular``), shared with every
    user of the same settings (``shared_quantizer``). No QJL.

    Args:
        dim: vector length; the split must pack exactly (``outlier_channels``).
        bits: one of ``FRACTIONAL_BITS``.
        rotation, seed, norm_correction: as ``TurboQuantizer`` (each part gets a rotation of its own size).
    """

    qjl = False

    def __init__(self, dim: int, bits: float, *, rotation: str = "hadamard", seed: int = 0,
                 norm_correction: bool = True):
        if bits not in SPLITS:
            raise ValueError(f"bits must be one of {FRACTIONAL_BITS}, got {bits!r}")
        self.dim, self.bits, self.norm_correction = dim, bits, norm_correction
        self.outlier_channels = outlier_channels("bits", bits, dim)
        _, outlier_bits, regular_bits = SPLITS[bits]
        self.outliers = shared_quantizer(self.outlier_channels, outlier_bits, False, rotation, seed, norm_correction)
        self.regular = shared_quantizer(dim - self.outlier_channels, regular_bits, False, rotation, seed,
                                        norm_correction)
        self.seed = seed

    @property
    def parts(self) -> tuple[TurboQuantizer, TurboQuantizer]:
        return self.outliers, self.regular

    @property
    def spec(self) -> tuple[int, float, bool, str, int, bool]:
        """(dim, bits, qjl, rotation, seed, norm_correction), as ``TurboQuantizer.spec``."""
        return self.dim, self.bits, False, self.outliers.rotation.requested, self.seed, self.norm_correction

    @property
    def bytes_per_vector(self) -> int:
        """Bytes of one compressed vector: both parts' packed indices and fp32 scales."""
        return self.outliers.bytes_per_vector + self.regular.bytes_per_vector

    @property
    def state_nbytes(self) -> int:
        """Bytes of both parts' per-device state on one device."""
        return self.outliers.state_nbytes + self.regular.state_nbytes

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., dim) in outlier order -> its outlier coordinates (..., k) and the others (..., dim - k) (views)."""
        return x[..., :self.outlier_channels], x[..., self.outlier_channels:]

    def quantize(self, x: torch.Tensor, *, check_finite: bool = True) -> SplitQuantizedTensor:
        """x: (..., dim) float, outlier channels first -> SplitQuantizedTensor with leading shape (...)."""
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be a (..., dim={self.dim}) tensor, got {getattr(x, 'shape', type(x).__name__)}")
        outliers, regular = self.split(x)
        return SplitQuantizedTensor(self.outliers.quantize(outliers, check_finite=check_finite),
                                    self.regular.quantize(regular, check_finite=check_finite))

    def _check_quantized(self, q: SplitQuantizedTensor) -> None:
        if not isinstance(q, SplitQuantizedTensor):
            raise TypeError(f"q must be a SplitQuantizedTensor, got {type(q).__name__}")
        self.outliers._check_quantized(q.outliers)
        self.regular._check_quantized(q.regular)

    def dequantize(self, q: SplitQuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """SplitQuantizedTensor (...) -> (..., dim) in ``dtype`` (default: the dtype quantized), outlier order."""
        self._check_quantized(q)
        return torch.cat([self.outliers.dequantize(q.outliers, dtype), self.regular.dequantize(q.regular, dtype)],
                         dim=-1)


@functools.lru_cache(maxsize=32)
def shared_split_quantizer(dim: int, bits: float, rotation: str, seed: int, norm_correction: bool) -> SplitQuantizer:
    """One shared ``SplitQuantizer`` per configuration."""
    return SplitQuantizer(dim, bits, rotation=rotation, seed=seed, norm_correction=norm_correction)


def outlier_order(states: torch.Tensor, outlier_channels: int) -> torch.Tensor:
    """The channel order of a split: states (B, H, n, D) float -> (B, H, D) int64, per (b, h) the ``outlier_channels``
    channels of largest mean square over the vectors whose coordinates are all finite (summed in float64; ties go to
    the lower channel), then the others, each set in ascending channel order. Calibration-free: a layer calls it once,
    on the first tokens it compresses."""
    finite = torch.isfinite(states).all(dim=-1, keepdim=True)
    energy = torch.where(finite, states.double().square(), 0.0).sum(dim=-2)
    ranked = energy.argsort(dim=-1, descending=True, stable=True)
    return torch.cat([ranked[..., :outlier_channels].sort(dim=-1).values,
                      ranked[..., outlier_channels:].sort(dim=-1).values], dim=-1)
