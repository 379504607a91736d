"""TurboQuantizer: rotation + Lloyd-Max MSE stage, optional 1-bit QJL stage on the residual.

For x in R^dim (a row of any (..., dim) tensor), with R the seeded rotation, c the codebook:

    y    = R x / ||x||                      rotated unit vector, coordinates ~ (1 - t^2)^((dim-3)/2)
    i_j  = #{boundaries < y_j}              nearest centroid (ties go to the lower centroid)
    s    = ||x|| / ||c[i]||                 the stored scale (float32, always: fp16 norms break long
                                            generation); ||x|| itself with norm_correction=False or QJL
    x~   = s * R^T c[i]                     reconstruction: ||x~|| = ||x|| (norm correction)

Norm correction: the Lloyd-Max reconstruction c[i] is shorter than the unit vector it stands for on average
(E ||c[i]||^2 = 1 - MSE), which shrinks attention logits q.k~ towards 0 and flattens the softmax. Rescaling to
the true length changes the MSE by -1.8 % (4 bits, dim 128: the length is known information) to +11 % (1 bit),
and cut SmolLM2's perplexity loss through the cache by 30-45 % at 4 bits (benchmarks/RESULTS.md).

QJL (``qjl=True``, ``bits`` is the total budget; the MSE stage gets bits - 1): with r = y - c[i] and a
seeded Gaussian S (dim x dim), store sign(S r) (1 bit each, ``S r >= 0`` -> +1) and ||r|| in float32.
Then <q, x> ~ ||x|| (<R q, c[i]> + ||r|| sqrt(pi/2) / dim * <S R q, sign(S r)>), unbiased over S (so QJL keeps
s = ||x||).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from .lloyd_max import SUPPORTED_BITS, codebook
from .packing import field_indices, pack, packed_size, unpack
from .rotation import Rotation

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Offset between the rotation's seed and the QJL projection's seed so that the two draws differ.
_QJL_SEED_OFFSET = 0x9E3779B1


def _byte_table(centroids: torch.Tensor, bits: int, device: torch.device) -> torch.Tensor | None:
    """(256, 8 // bits) float32 on ``device``: row v = the centroids of the indices packed in byte value v, in packing
    order (``packing.py``: low bits first); None at 3 bits, whose indices straddle bytes."""
    if 8 % bits:
        return None
    return centroids[field_indices(bits, 8)].to(device)


def _indexed(device: torch.device | str) -> torch.device:
    """``device`` as the key of a per-device state: "cuda" means the current GPU now, and must not stand for
    whichever GPU was current when the state was first made (tensors always report their index: cuda:1)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


@dataclasses.dataclass
class QuantizerState:
    """A quantizer's tensors on one device (all float32).

    rotation: R; centroids (2**bits,) and boundaries (2**bits - 1,) of the fp16-rounded codebook; projection:
    the QJL matrix S (dim, dim) or None; byte_table: ``_byte_table`` for the torch reconstruction, or None;
    kernel: what the Triton kernels derive from the above (``kernels._common.KernelState``), made on first use.
    """

    rotation: Rotation
    centroids: torch.Tensor
    boundaries: torch.Tensor
    projection: torch.Tensor | None
    byte_table: torch.Tensor | None
    kernel: object | None = None

    def to(self, device: torch.device) -> "QuantizerState":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantizerState(self.rotation.to(device), move(self.centroids), move(self.boundaries),
                              move(self.projection), move(self.byte_table))

    @property
    def nbytes(self) -> int:
        tensors = (self.centroids, self.boundaries, self.projection, self.byte_table)
        held = self.rotation.nbytes + sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return held + (0 if self.kernel is None else self.kernel.nbytes)


@dataclasses.dataclass
class QuantizedTensor:
    """Compressed (..., dim) vectors. All tensors share the leading shape ``(...)``.

    packed_indices: (..., dim * mse_bits / 8) uint8; scales: (...) float32, the scale s of each vector (its norm,
    divided by its centroids' norm with norm correction);
    qjl_signs: (..., dim / 8) uint8 or None; residual_norms: (...) float32 or None.
    """

    packed_indices: torch.Tensor
    scales: torch.Tensor
    qjl_signs: torch.Tensor | None
    residual_norms: torch.Tensor | None
    dim: int
    mse_bits: int
    dtype: torch.dtype

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors held, by field name (packed_indices, scales[, qjl_signs, residual_norms])."""
        fields = {"packed_indices": self.packed_indices, "scales": self.scales, "qjl_signs": self.qjl_signs,
                  "residual_norms": self.residual_norms}
        return {name: tensor for name, tensor in fields.items() if tensor is not None}

    def tensors(self) -> list[torch.Tensor]:
        return list(self.named_tensors().values())

    @property
    def shape(self) -> torch.Size:
        """Shape of the vectors this holds, (..., dim)."""
        return torch.Size((*self.scales.shape, self.dim))

    @property
    def device(self) -> torch.device:
        return self.scales.device

    @property
    def nbytes(self) -> int:
        """Exact bytes of the tensors held."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def _map(self, fn) -> "QuantizedTensor":
        return dataclasses.replace(
            self,
            packed_indices=fn(self.packed_indices),
            scales=fn(self.scales),
            qjl_signs=None if self.qjl_signs is None else fn(self.qjl_signs),
            residual_norms=None if self.residual_norms is None else fn(self.residual_norms),
        )

    def to(self, device: torch.device | str) -> "QuantizedTensor":
        return self._map(lambda t: t.to(device))

    def __getitem__(self, key) -> "QuantizedTensor":
        """Index the leading dims (ints, slices, index tensors); the vector dim is never indexed."""
        parts = key if isinstance(key, tuple) else (key,)
        if any(part is Ellipsis or part is None for part in parts):
            raise IndexError("QuantizedTensor indexing takes leading-dim indices only (no Ellipsis/None)")
        if len(parts) > self.scales.dim():
            raise IndexError(f"too many indices for QuantizedTensor with leading shape {tuple(self.scales.shape)}")
        return self._map(lambda t: t[key])

    @staticmethod
    def cat(parts: list["QuantizedTensor"], dim: int = 0) -> "QuantizedTensor":
        """Concatenate along leading dim ``dim`` (negative counts from the last leading dim)."""
        if not parts:
            raise ValueError("parts must be a non-empty list of QuantizedTensor")
        first = parts[0]
        leading = first.scales.dim()
        axis = dim + leading if dim < 0 else dim
        if not 0 <= axis < leading:
            raise ValueError(f"dim must index a leading dim in [-{leading}, {leading}), got {dim}")
        for part in parts[1:]:
            if (part.dim, part.mse_bits, part.qjl_signs is None) != (first.dim, first.mse_bits, first.qjl_signs is None):
                raise ValueError("cannot cat QuantizedTensors of different dim, bits or qjl")

        def join(name: str) -> torch.Tensor | None:
            tensors = [getattr(p, name) for p in parts]
            return None if tensors[0] is None else torch.cat(tensors, dim=axis)

        return dataclasses.replace(
            first,
            packed_indices=join("packed_indices"),
            scales=join("scales"),
            qjl_signs=join("qjl_signs"),
            residual_norms=join("residual_norms"),
        )


class TurboQuantizer:
    """TurboQuant for (..., dim) vectors.

    Args:
        dim: vector length, a multiple of 8 (exact bit packing), >= 8.
        bits: total bits per coordinate, one of 1, 2, 3, 4, 8. With ``qjl`` the MSE stage uses bits - 1.
        qjl: add the 1-bit QJL residual stage (unbiased inner products); needs bits >= 2.
        rotation: "hadamard" (default; dense fallback for dims that are not powers of two) or "dense".
        seed: seeds the rotation and the QJL projection; same seed -> identical bytes on any device.
        device: where the rotation state is first built (it is copied to other devices on use).
        norm_correction: store ||x|| / ||c[i]|| so that reconstructions keep the input's length (default: on,
            except with ``qjl``, whose unbiased estimator needs ||x||; True with qjl raises ValueError).
    Inputs may be float16, bfloat16, float32 or float64; the math runs in float32.
    """

    def __init__(self, dim: int, bits: int, *, qjl: bool = False, rotation: str = "hadamard", seed: int = 0,
                 device: torch.device | str | None = None, norm_correction: bool | None = None):
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 8 or dim % 8 != 0:
            raise ValueError(f"dim must be a positive multiple of 8 (exact bit packing), got {dim!r}")
        if not isinstance(bits, int) or isinstance(bits, bool) or bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
        if not isinstance(qjl, bool):
            raise TypeError(f"qjl must be a bool, got {type(qjl).__name__}")
        if qjl and bits not in (2, 3, 4):
            raise ValueError(f"qjl=True needs bits in (2, 3, 4) (bits - 1 for the MSE stage), got bits={bits}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if norm_correction is not None and not isinstance(norm_correction, bool):
            raise TypeError(f"norm_correction must be a bool or None, got {type(norm_correction).__name__}")
        if norm_correction and qjl:
            raise ValueError("norm_correction=True cannot be combined with qjl=True: QJL's unbiased estimator "
                             "needs the stored norm to be ||x||")
        self.norm_correction = not qjl if norm_correction is None else norm_correction
        self.dim = dim
        self.bits = bits
        self.qjl = qjl
        self.mse_bits = bits - 1 if qjl else bits
        self.seed = seed
        self.rotation = Rotation(dim, rotation, seed, device)
        centroids, _ = codebook(dim, self.mse_bits)
        # Centroids rounded to float16 (relative change <= 2**-11; the MSE moves by < 1e-5 of itself), so that
        # the kernels' fp16 tensor-core dots read them exactly; boundaries are the midpoints of the rounded ones.
        centroids = centroids.half().float()
        projection = None
        if qjl:
            generator = torch.Generator(device="cpu").manual_seed(seed + _QJL_SEED_OFFSET)
            projection = torch.randn(dim, dim, generator=generator)
        home = _indexed("cpu" if device is None else device)
        first = QuantizerState(self.rotation.to(home), centroids.to(home),
                               ((centroids[1:] + centroids[:-1]) / 2).to(home),
                               None if projection is None else projection.to(home),
                               _byte_table(centroids, self.mse_bits, home))
        self._states: dict[torch.device, QuantizerState] = {home: first}

    def state(self, device: torch.device | str) -> QuantizerState:
        """The rotation, codebook and projection on ``device`` (copied there on first use, then kept, one per device:
        a model split over GPUs gets one state on each)."""
        found = self._states.get(device)
        if found is None:
            device = _indexed(device)
            found = self._states.get(device)
            if found is None:
                found = self._states[device] = next(iter(self._states.values())).to(device)
        return found

    @property
    def spec(self) -> tuple[int, int, bool, str, int, bool]:
        """(dim, bits, qjl, rotation, seed, norm_correction): the arguments that rebuild it (``shared_quantizer``)."""
        return self.dim, self.bits, self.qjl, self.rotation.requested, self.seed, self.norm_correction

    @property
    def bytes_per_vector(self) -> int:
        """Bytes of one compressed vector: packed indices + fp32 norm (+ signs + fp32 residual norm)."""
        size = packed_size(self.dim, self.mse_bits) + 4
        if self.qjl:
            size += self.dim // 8 + 4
        return size

    @property
    def state_nbytes(self) -> int:
        """Bytes of the per-device state (rotation, codebook, projection, lookup tables) on one device."""
        return next(iter(self._states.values())).nbytes

    def _check_input(self, x: torch.Tensor, name: str) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} dtype must be one of float16, bfloat16, float32, float64, got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"{name} last dim must be dim={self.dim}, got shape {tuple(x.shape)}")

    def quantize(self, x: torch.Tensor, *, check_finite: bool = True) -> QuantizedTensor:
        """x: (..., dim) float -> QuantizedTensor with leading shape (...).

        Zero vectors round-trip to exact zeros. With ``check_finite`` (default) NaN/Inf raise ValueError
        (one host sync); without it a non-finite vector decodes to NaN and no other vector is affected.
        Any finite x, subnormal to huge, keeps the usual relative error, as long as the fp32 scale s holds its
        norm: ||x|| / ||c[i]|| < 3.4e38 (||c[i]|| ~ 0.8 at 1 bit, ~1 at 4 bits); a larger one stores s = inf.
        """
        self._check_input(x, "x")
        if check_finite and not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or Inf; TurboQuant needs finite vectors")
        state = self.state(x.device)
        rotation, centroids, boundaries, projection = state.rotation, state.centroids, state.boundaries, state.projection
        x32 = x.float()
        # ||x|| = m ||x / m||, m = max |x_j|: the fp32 sum of squares of x itself overflows for norms above ~1.8e19
        # (NaN decodes) and loses tiny vectors to underflow; x / m has max 1, so its norm is in [1, sqrt(dim)].
        # Zero vectors: divide by 1 instead of 0; their norm of 0 makes them decode to exact zeros.
        max_abs = x32.abs().amax(dim=-1, keepdim=True)
        scaled = x32 / torch.where(max_abs > 0, max_abs, torch.ones_like(max_abs))
        scaled_norms = torch.linalg.vector_norm(scaled, dim=-1, keepdim=True)
        unit = scaled / torch.where(scaled_norms > 0, scaled_norms, torch.ones_like(scaled_norms))
        scales = (max_abs * scaled_norms).squeeze(-1)  # ||x||
        rotated = rotation.rotate(unit)
        indices = torch.bucketize(rotated, boundaries)
        packed_indices = pack(indices, self.mse_bits)
        if self.norm_correction:  # ||c[i]|| > 0: the codebooks have no zero centroid
            scales = scales / torch.linalg.vector_norm(centroids[indices], dim=-1)
        qjl_signs = residual_norms = None
        if projection is not None:
            residual = rotated - centroids[indices]
            residual_norms = torch.linalg.vector_norm(residual, dim=-1)
            # float64: a sign must not depend on how BLAS blocks the batch (quantizing parts == quantizing the whole).
            qjl_signs = pack((residual.double() @ projection.double().T >= 0).to(torch.uint8), 1)
        return QuantizedTensor(packed_indices, scales, qjl_signs, residual_norms, self.dim, self.mse_bits, x.dtype)

    def _check_quantized(self, q: QuantizedTensor) -> None:
        if not isinstance(q, QuantizedTensor):
            raise TypeError(f"q must be a QuantizedTensor, got {type(q).__name__}")
        if (q.dim, q.mse_bits, q.qjl_signs is not None) != (self.dim, self.mse_bits, self.qjl):
            raise ValueError(
                f"q was made with dim={q.dim}, mse_bits={q.mse_bits}, qjl={q.qjl_signs is not None}; this "
                f"quantizer has dim={self.dim}, mse_bits={self.mse_bits}, qjl={self.qjl}"
            )

    def rotated_reconstruction(self, q: QuantizedTensor) -> torch.Tensor:
        """The unit-norm reconstruction in the rotated domain, (..., dim) float32 (without the norm).

        MSE: c[i]. With QJL: c[i] + ||r|| sqrt(pi/2) / dim * S^T sign(S r), so that inner products with
        it are the unbiased estimate.
        """
        self._check_quantized(q)
        state = self.state(q.device)
        table, projection = state.byte_table, state.projection
        if table is None:  # 3 bits: indices straddle bytes
            rotated = state.centroids[unpack(q.packed_indices, self.mse_bits, self.dim)]
        else:  # one lookup per packed byte (3-7x faster than unpacking then indexing, on CPU)
            packed = q.packed_indices
            rotated = table.index_select(0, packed.reshape(-1).long()).reshape(*packed.shape[:-1], self.dim)
        if projection is not None:
            signs = unpack(q.qjl_signs, 1, self.dim).float() * 2 - 1
            scale = q.residual_norms * (math.sqrt(math.pi / 2) / self.dim)
            rotated = rotated + (signs @ projection) * scale.unsqueeze(-1)
        return rotated

    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """QuantizedTensor (...) -> (..., dim) in ``dtype`` (default: the dtype that was quantized)."""
        rotated = self.rotated_reconstruction(q)  # validates q first (TypeError/ValueError)
        dense = self.state(q.device).rotation.unrotate(rotated) * q.scales.unsqueeze(-1)
        dtype = dtype or q.dtype
        # A coordinate near the dtype's largest value can decode past it by the quantization error: saturate
        # instead of rounding to inf (NaN stays NaN).
        limit = min(torch.finfo(dtype).max, torch.finfo(dense.dtype).max)
        return dense.clamp(-limit, limit).to(dtype)

    def inner_product(self, query: torch.Tensor, q: QuantizedTensor) -> torch.Tensor:
        """Estimated query . key^T, broadcasting like matmul.

        query: (..., M, dim) float; q: leading shape (..., N) -> scores (..., M, N) float32.
        The query is rotated once; keys are never rotated back.
        """
        self._check_input(query, "query")
        self._check_quantized(q)
        query_rotated = self.state(query.device).rotation.rotate(query.float())
        keys_rotated = self.rotated_reconstruction(q) * q.scales.unsqueeze(-1)
        return query_rotated @ keys_rotated.transpose(-1, -2)


@functools.lru_cache(maxsize=32)  # bounded: servers that draw a seed per request must not grow it for ever
def shared_quantizer(dim: int, bits: int, qjl: bool, rotation: str, seed: int, norm_correction: bool) -> TurboQuantizer:
    """One shared quantizer (codebook + rotation state) per configuration (``TurboQuantizer.spec``), for every layer
    and every op that names it."""
    return TurboQuantizer(dim, bits, qjl=qjl, rotation=rotation, seed=seed, norm_correction=norm_correction)
