"""What every kernel module shares: the Triton import, the choice between a kernel and its torch twin, launch
arithmetic, the device a launch runs on (``launch_device``), and the per-device operands the kernels read
(``KernelState``)."""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton (macOS, Windows): the torch twins still work and use_triton picks them
    from types import SimpleNamespace

    triton, tl = SimpleNamespace(jit=lambda fn=None, **_: fn or (lambda f: f)), None

from ..backend import backend_for, warn_once
from ..packing import field_indices
from ..quantizer import TurboQuantizer

# bits -> packed bits per centroid-table index (an entry holds the centroids of index_bits / bits coordinates).
_TABLE_INDEX_BITS = {1: 4, 2: 8, 3: 6, 4: 8, 8: 8}
_ENTRY_DTYPE = {1: torch.float16, 2: torch.int32, 4: torch.int64}  # by coordinates per entry


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch grids (``triton.cdiv`` is a jit function: calling it from Python costs microseconds)."""
    return -(-a // b)


def triton_unsupported(quantizer: TurboQuantizer) -> str | None:
    """Why the Triton kernels cannot handle this quantizer (None when they can)."""
    if quantizer.qjl:
        return "QJL quantizers"
    dim = quantizer.dim
    if dim < 16 or dim & (dim - 1):
        return f"head_dim={dim} (Triton tiles need a power of two >= 16)"
    return None


def use_triton(device: torch.device, what: str, *quantizers: TurboQuantizer) -> bool:
    """The one dispatch between a kernel and its torch twin: True when ``what`` runs as a Triton kernel for tensors
    on ``device`` (``backend_for``) and every quantizer is supported; an unsupported one is logged once."""
    if backend_for(device) != "triton":
        return False
    for quantizer in quantizers:
        reason = triton_unsupported(quantizer)
        if reason is not None:
            warn_once(f"turboquant_hf: Triton {what} does not support {reason}; using the torch path")
            return False
    return True


def check_supported(what: str, *quantizers: TurboQuantizer) -> None:
    """ValueError when a ``*_triton`` entry point is called with a quantizer the kernels cannot handle."""
    for quantizer in quantizers:
        reason = triton_unsupported(quantizer)
        if reason is not None:
            raise ValueError(f"Triton {what} does not support {reason}; call the dispatching function instead")


_SAME_DEVICE = contextlib.nullcontext()  # reusable: entering it does nothing


def launch_device(device: torch.device) -> contextlib.AbstractContextManager:
    """The context a Triton launch for tensors on ``device`` runs in.

    Triton launches on the *current* CUDA device and its current stream, not on the device of the pointers it is
    given. A model split over GPUs (accelerate's ``device_map``) runs its later layers on cuda:1 while cuda:0 is
    current: launched there, a kernel would read cuda:1 memory from cuda:0 (a fault without peer access) on a
    stream unordered with the cuda:1 work around it. So: ``torch.cuda.device(index)`` when ``device`` is a CUDA
    device other than the current one. Otherwise (one GPU, CPU tensors under the interpreter, a CUDA graph
    capture, which makes its own device current) a shared no-op context: the hot path pays one current-device
    query, no device switch.
    """
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return _SAME_DEVICE
    return torch.cuda.device(device.index)


def check_same_device(what: str, device: torch.device, **tensors: torch.Tensor | None) -> None:
    """ValueError naming the first of ``tensors`` not on ``device``. A Triton kernel given a pointer of another GPU
    would not fail cleanly (unified addressing makes it look valid) but fault or read the wrong memory."""
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != device:
            raise ValueError(f"{what}: {name} is on {tensor.device}, expected {device} (every operand on one device)")


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 2 under the interpreter (a few splits, enough to test merges)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def row_launch(launch: dict, device: torch.device, dim: int, rows: int) -> tuple[int, int]:
    """(BLOCK_M, num_warps) for a kernel over ``rows`` rows (per batch and head) of ``dim`` coordinates, from its
    per-device-type launch table ({"cuda": {"elements", "num_warps"}, "cpu": ...}): elements / dim vectors per
    program, fewer when there are fewer rows (a decode step's one token: a 64-row tile took 9.5 us per encode on an
    H200, ``bench_decode.py --profile``), at least 16 (tensor-core dots)."""
    chosen = launch["cuda" if device.type == "cuda" else "cpu"]
    return max(16, min(chosen["elements"] // dim, 1 << max(rows - 1, 0).bit_length())), chosen["num_warps"]


@triton.jit
def row_block(heads, n_tokens, BLOCK_M: tl.constexpr):
    """The program's (batch, head) as int64 and its BLOCK_M rows of n_tokens, for a grid (row blocks, B * heads)."""
    pid_bh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    return (pid_bh // heads).to(tl.int64), (pid_bh % heads).to(tl.int64), rows, rows < n_tokens


def rotation_pieces(matrix: torch.Tensor, hadamard: bool) -> tuple[torch.Tensor, float]:
    """A rotation (D, D) as (pieces, scale) for ``rotate.rotate_columns``: pieces (P, D, D) fp16 contiguous with
    scale * pieces.sum(0) = matrix to ~2^-22 relative. sqrt(D) R = H diag(signs) of a Hadamard rotation is one exact
    piece of +-1 (scale 1/sqrt(D)); a dense rotation is fp16 hi + lo (scale 1)."""
    matrix = matrix.double()
    if hadamard:
        return matrix.sign()[None].to(torch.float16).contiguous(), 1 / math.sqrt(matrix.shape[0])
    hi = matrix.to(torch.float16)
    return torch.stack((hi, (matrix - hi.double()).to(torch.float16))).contiguous(), 1.0


def centroid_table(centroids: torch.Tensor, bits: int) -> torch.Tensor:
    """Lookup table of ``dequant.decode_packed``: entry e (one per value of a field of ``index_bits`` packed bits,
    which holds indices i_0, i_1, ... at bit offsets 0, bits, ...) packs the fp16 bit patterns of c[i_0], c[i_1], ...
    at bit offsets 0, 16, ...: (2**index_bits,) float16 at 8 bits, int32 at 3 and 4 bits, int64 at 1 and 2 bits."""
    fields = centroids.cpu().half()[field_indices(bits, _TABLE_INDEX_BITS[bits])]
    # (entries, per_entry) fp16 viewed as one integer per row: little-endian, so c[i_0] lands in bits 0..15.
    return fields.view(_ENTRY_DTYPE[fields.shape[1]]).squeeze(1).to(centroids.device)


@dataclasses.dataclass(frozen=True)
class KernelState:
    """The operands the Triton kernels read for one quantizer on one device.

    table: ``centroid_table``; rotate / rotate_scale: pieces of R^T (x @ R^T rotates); unrotate / unrotate_scale:
    pieces of R (y @ R rotates back).
    """

    table: torch.Tensor
    rotate: torch.Tensor
    rotate_scale: float
    unrotate: torch.Tensor
    unrotate_scale: float

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.table, self.rotate, self.unrotate))


def kernel_state(quantizer: TurboQuantizer, device: torch.device) -> KernelState:
    """The quantizer's ``KernelState`` on ``device``, made once and kept in its per-device state."""
    state = quantizer.state(device)
    if state.kernel is None:
        matrix = state.rotation.matrix()
        hadamard = state.rotation.kind == "hadamard"
        rotate, rotate_scale = rotation_pieces(matrix.T, hadamard)
        unrotate, unrotate_scale = rotation_pieces(matrix, hadamard)
        state.kernel = KernelState(centroid_table(state.centroids, quantizer.mse_bits), rotate.to(device),
                                   rotate_scale, unrotate.to(device), unrotate_scale)
    return state.kernel
