"""One safetensors file written from, and read into, the tensors' own memory, its checksum computed on the way.

``safetensors.torch.save_file`` and ``safe_open`` copy every byte twice (tensor -> ``bytes`` -> file on save; file ->
a fresh tensor -> the cache's storage on load), and a checksum over the tensors was a pass of its own. Here the bytes
go from each tensor's memory straight into the file (``write``) and from the file straight into the tensor that keeps
them (``TensorFile.read_into``: a layer's slots on the CPU; on a GPU, a pinned buffer and one asynchronous copy),
while a worker thread takes each tensor's CRC-32 (zlib, like file I/O, releases the GIL: the checksum overlaps the
disk) and, while writing, another fsyncs what is written so far. The file stays a plain safetensors file, laid out as safetensors lays it out: any safetensors reader opens it.

Checksum (the metadata entry ``checksum``): the sha256 of the lines ``{name}|{dtype}|{shape}|{crc32:08x}``, one per
tensor in name order, each CRC-32 taken over that tensor's bytes. A CRC-32 catches every burst of up to 32 flipped
bits and misses random damage with probability 2^-32 (an integrity check, not a signature); a truncated file or one
whose tensors do not tile its data is refused before any tensor is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import torch

_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}
_TORCH_DTYPES = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}
_HEADER_LIMIT = 100 * 2**20  # safetensors' own limit on the JSON header
_WRITE_BEHIND = 64 * 2**20  # bytes written between two background fsyncs of a file being written
_STAGED_IN_FLIGHT = 4  # host buffers (pinned for a GPU: slow to allocate) read but not yet hashed, at the most


class TensorSpec(NamedTuple):
    """Where one tensor's bytes lie in the file's data section, and what they are."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


# ------------------------------------------------------------------------------------------------------ write
def write(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``tensors`` (any device, any strides) and ``metadata`` plus its ``checksum`` to ``path`` as safetensors,
    then fsync it. The tensors are laid out as safetensors does (widest elements first, then by name: each tensor's
    bytes aligned to its element size); one at a time is copied to the host when it lives elsewhere."""
    names = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header, offset = {}, 0
    for name in names:
        tensor = tensors[name]
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size

    def header_bytes(checksum: str) -> bytes:
        return _encode_header({"__metadata__": {**metadata, "checksum": checksum}, **header})

    crcs: dict[str, Future] = {}
    # Two workers: the CRC-32s, and an fsync of what is written so far while the rest is written (write-behind: the
    # last fsync then waits for the tail only; 1.13 -> 0.86 s for 1 GiB on a 2-core VM, benchmarks/RESULTS.md).
    with open(path, "wb") as file, ThreadPoolExecutor(2, thread_name_prefix="tensor_file") as workers:
        file.write(header_bytes("0" * 64))  # the checksum is known once the data is written: same length
        unsynced, syncing = 0, None
        for name in names:
            host = tensors[name].detach().to("cpu")
            runs = _byte_runs(host)
            for run in runs:
                file.write(run)
                unsynced += len(run)
            crcs[name] = workers.submit(_crc32, runs)
            if unsynced >= _WRITE_BEHIND and (syncing is None or syncing.done()):
                file.flush()
                syncing, unsynced = workers.submit(os.fsync, file.fileno()), 0
        lines = {name: _checksum_line(name, tensors[name].dtype, tensors[name].shape, crc.result())
                 for name, crc in crcs.items()}
        file.seek(0)
        file.write(header_bytes(_combine(lines)))
        file.flush()
        os.fsync(file.fileno())


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """The checksum ``write`` stores for ``tensors`` (CPU tensors), computed in one pass over them."""
    return _combine({name: _checksum_line(name, tensor.dtype, tensor.shape, _crc32(_byte_runs(tensor)))
                     for name, tensor in tensors.items()})


def _encode_header(header: dict) -> bytes:
    """safetensors' header: its length (u64, little endian), then JSON padded with spaces to a multiple of 8."""
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _byte_runs(tensor: torch.Tensor) -> list[memoryview]:
    """The bytes of a CPU tensor in row-major order, as views of its memory: one per contiguous block (a slice of a
    layer's slots, (B, H, length, n) of a (B, H, capacity, n) tensor, gives B * H of them)."""
    if tensor.is_contiguous():
        return [memoryview(tensor.reshape(-1).view(torch.uint8).numpy())] if tensor.numel() else []
    return [run for row in tensor.unbind(0) for run in _byte_runs(row)]


def _crc32(runs: list[memoryview]) -> int:
    crc = 0
    for run in runs:
        crc = zlib.crc32(run, crc)
    return crc


def _checksum_line(name: str, dtype: torch.dtype, shape: torch.Size | tuple[int, ...], crc: int) -> str:
    return f"{name}|{dtype}|{tuple(shape)}|{crc:08x}"


def _combine(lines: dict[str, str]) -> str:
    return hashlib.sha256("\n".join(lines[name] for name in sorted(lines)).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------------- read
class TensorFile:
    """A safetensors file open for reading its tensors into memory the caller chooses; ``verify`` compares the
    checksum ``write`` stored with the CRC-32s taken while reading. Opening checks the header only: a file that is
    not safetensors, is truncated or whose tensors do not tile its data is a ValueError. A context manager."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = open(self.path, "rb", buffering=0)
        try:
            self.metadata, self.specs, self._data_start = _read_header(self._file, self.path)
        except BaseException:
            self._file.close()
            raise
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="tensor_file_crc")
        self._crcs: dict[str, Future] = {}
        self._staged: deque[Future] = deque()

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc_info) -> None:
        self._hasher.shutdown(wait=True, cancel_futures=True)
        self._file.close()

    def __contains__(self, name: str) -> bool:
        return name in self.specs

    def read(self, name: str, device: torch.device) -> torch.Tensor:
        """Tensor ``name`` (KeyError if the file lacks it), a fresh one on ``device``."""
        spec = self.specs[name]
        target = torch.empty(spec.shape, dtype=spec.dtype, device=device)
        self.read_into(name, target)
        return target

    def read_into(self, name: str, target: torch.Tensor) -> None:
        """Fill ``target`` (same dtype and shape as tensor ``name``; any device, any strides) with the tensor's bytes:
        read straight into its memory when it is a contiguous CPU tensor, else into a host buffer (pinned for CUDA)
        copied over (asynchronously from pinned memory). ValueError naming both when dtype or shape differ."""
        spec = self.specs[name]
        if tuple(target.shape) != spec.shape or target.dtype != spec.dtype:
            raise ValueError(f"{name} is {spec.dtype} of shape {spec.shape}, expected {target.dtype} of shape "
                             f"{tuple(target.shape)}")
        direct = target.device.type == "cpu" and target.is_contiguous()
        host = target if direct else torch.empty(spec.shape, dtype=spec.dtype,
                                                 pin_memory=target.device.type == "cuda")
        runs = _byte_runs(host)
        self._file.seek(self._data_start + spec.begin)
        for run in runs:
            filled = 0
            while filled < len(run):  # a read may return fewer bytes than asked (2 GiB per call on Linux)
                count = self._file.readinto(run[filled:])
                if not count:
                    raise ValueError(f"{self.path}: truncated while reading {name}")
                filled += count
        self._crcs[name] = self._hasher.submit(_crc32, runs)  # the runs keep ``host`` alive until hashed
        if not direct:
            target.copy_(host, non_blocking=True)
            self._staged.append(self._crcs[name])
            if len(self._staged) > _STAGED_IN_FLIGHT:  # the caching host allocator then reuses a few buffers
                self._staged.popleft().result()

    def verify(self) -> None:
        """ValueError unless the file's checksum matches its bytes (tensors nobody read are read for it now)."""
        for name in self.specs.keys() - self._crcs.keys():
            self.read(name, torch.device("cpu"))
        lines = {name: _checksum_line(name, spec.dtype, spec.shape, self._crcs[name].result())
                 for name, spec in self.specs.items()}
        if self.metadata.get("checksum") != _combine(lines):
            raise ValueError(f"{self.path}: checksum mismatch: the file is corrupt")


def _read_header(file, path: Path) -> tuple[dict[str, str], dict[str, TensorSpec], int]:
    """(metadata, tensor specs, where the data section starts) of an open safetensors file, checked against its size."""
    def refuse(detail: str) -> ValueError:
        return ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {detail}")

    size = os.fstat(file.fileno()).st_size
    if size < 8:
        raise refuse(f"{size} bytes")
    (length,) = struct.unpack("<Q", file.read(8))
    if length > min(size - 8, _HEADER_LIMIT):
        raise refuse(f"a header of {length} bytes in a file of {size}")
    try:
        header = json.loads(file.read(length))
        metadata = header.pop("__metadata__", {})
        specs = {}
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            specs[name] = TensorSpec(_TORCH_DTYPES[entry["dtype"]], tuple(entry["shape"]), begin, end)
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # bad JSON or UTF-8, a malformed entry
        raise refuse(f"bad header ({type(error).__name__}: {error})") from error
    if not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values()):
        raise refuse("its metadata is not str -> str")
    offset = 0
    for name, spec in sorted(specs.items(), key=lambda item: item[1].begin):
        elements = 1
        for extent in spec.shape:
            elements *= extent
        if spec.begin != offset or spec.end - spec.begin != elements * spec.dtype.itemsize:
            raise refuse(f"tensor {name} at bytes {spec.begin}..{spec.end} of the data, expected {offset}.."
                         f"{offset + elements * spec.dtype.itemsize}")
        offset = spec.end
    if 8 + length + offset != size:
        raise refuse(f"{size} bytes, the header describes {8 + length + offset}")
    return metadata, specs, 8 + length
