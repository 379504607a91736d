"""Seeded random rotations of R^dim, identical on every device.

``hadamard`` (default): R = H D / sqrt(dim), with D a diagonal of random signs and H the Sylvester
Hadamard matrix, applied with a fast Walsh-Hadamard transform in O(dim log dim) time and O(dim)
memory. It needs dim to be a power of two. For other head dims (80, 96, 112, ...) a single Hadamard
block cannot mix every coordinate, and block-diagonal Hadamards leave the blocks independent, so
``hadamard`` falls back to the dense Haar rotation for them (dim^2 floats: 25 KiB at dim=80).

``dense``: R = Q from the QR decomposition of a seeded Gaussian matrix, with the signs of diag(R_qr)
folded in so that Q is Haar-distributed.

Random draws use a CPU ``torch.Generator`` so the same seed gives the same rotation on any device.

Applying R: the Hadamard rotation is defined by its dim signs, but ``rotate``/``unrotate`` multiply by the
dim x dim matrix (built once from the signs with the fast transform, 64 KiB at dim=128, counted in
``nbytes``): one matmul is 20-30x faster in PyTorch than log2(dim) butterfly passes over the data.
"""

from __future__ import annotations

import math

import torch

ROTATIONS = ("hadamard", "dense")


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Walsh-Hadamard transform along the last dim: x @ H, H the Sylvester matrix.

    x: (..., dim) float, dim a power of two. Returns a new tensor of the same shape and dtype.
    """
    dim = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < dim:
        pairs = x.reshape(*lead, dim // (2 * h), 2, h)
        x = torch.stack((pairs[..., 0, :] + pairs[..., 1, :], pairs[..., 0, :] - pairs[..., 1, :]), dim=-2)
        h *= 2
    return x.reshape(*lead, dim)


class Rotation:
    """An orthogonal map R of R^dim: ``rotate(x) = x @ R.T``, ``unrotate(y) = y @ R``.

    Holds fp32 state on ``device``: the dim random signs (Hadamard) or the dim x dim matrix (dense).
    """

    def __init__(self, dim: int, kind: str = "hadamard", seed: int = 0, device: torch.device | str | None = None):
        if kind not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}, got {kind!r}")
        self.dim = dim
        self.requested = kind
        self.kind = "hadamard" if kind == "hadamard" and is_power_of_two(dim) else "dense"
        self.seed = seed
        generator = torch.Generator(device="cpu").manual_seed(seed)
        if self.kind == "hadamard":
            signs = torch.randint(0, 2, (dim,), generator=generator).float() * 2 - 1
            self.signs: torch.Tensor | None = signs.to(device)
            self.dense: torch.Tensor | None = None
            self._matrix: torch.Tensor | None = None
        else:
            gaussian = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
            q, r = torch.linalg.qr(gaussian)
            q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
            self.signs = None
            self.dense = q.float().to(device)
            self._matrix = self.dense

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., dim) float32 -> R x, (..., dim) float32."""
        return x @ self.matrix().T

    def unrotate(self, y: torch.Tensor) -> torch.Tensor:
        """y: (..., dim) float32 -> R^T y, (..., dim) float32."""
        return y @ self.matrix()

    def matrix(self) -> torch.Tensor:
        """R as a (dim, dim) float32 contiguous tensor; for Hadamard, R = H diag(signs) / sqrt(dim), built
        once with the fast Walsh-Hadamard transform."""
        if self._matrix is None:
            eye = torch.eye(self.dim, device=self.signs.device)
            # Row i of fwht(diag(signs)) is signs_i * H_i, i.e. (H D)^T; H is symmetric.
            self._matrix = (fwht(eye * self.signs.unsqueeze(-1)) * (1.0 / math.sqrt(self.dim))).T.contiguous()
        return self._matrix

    def to(self, device: torch.device | str) -> "Rotation":
        moved = object.__new__(Rotation)
        moved.__dict__.update(self.__dict__)
        moved.signs = None if self.signs is None else self.signs.to(device)
        moved.dense = None if self.dense is None else self.dense.to(device)
        moved._matrix = None if self._matrix is None else self._matrix.to(device)
        if moved.dense is not None:
            moved._matrix = moved.dense
        return moved

    @property
    def nbytes(self) -> int:
        """Bytes held: the signs or the dense matrix, plus the Hadamard matrix once built."""
        held = [self.signs, self._matrix] if self.signs is not None else [self.dense]
        return sum(t.numel() * t.element_size() for t in held if t is not None)
