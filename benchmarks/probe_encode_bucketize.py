"""Encode's boundary count, three ways, timed on one CUDA GPU (how ``encode._bucketize`` was chosen).

    VARIANT=shipped python benchmarks/probe_encode_bucketize.py     # as shipped: half the compares at 4 bits
    VARIANT=symmetric python benchmarks/probe_encode_bucketize.py   # half the compares at 1-4 bits
    VARIANT=all python benchmarks/probe_encode_bucketize.py         # every boundary at 1-4 bits (the kernel
                                                                     # before 1d4a1c6)

Swaps ``_bucketize`` of ``turboquant_hf.kernels.encode`` for one that always uses its ``_count_symmetric`` or
``_count_all`` before the kernel compiles (one variant per process), then
times ``encode_into_triton`` (CUDA-graph replay, median of 30) on 8 heads x 64K bf16 vectors of head_dim 128 at
4, 3 and 2 bits, as the codec rows of bench_attention.py do, and checks the packed indices against the torch
twin's (equal except within 1e-5 / sqrt(D) of a boundary, as the tests require). Prints one JSON line per bits.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_attention import median_us, random_quantized  # noqa: E402
from turboquant_hf import TurboQuantizer, unpack  # noqa: E402

encode = importlib.import_module("turboquant_hf.kernels.encode")


@triton.jit
def _bucketize_symmetric(y, boundaries_ptr, BITS: tl.constexpr):
    return tl.where(y != y, (1 << BITS) - 1, encode._count_symmetric(y, boundaries_ptr, BITS))


@triton.jit
def _bucketize_all(y, boundaries_ptr, BITS: tl.constexpr):
    return tl.where(y != y, (1 << BITS) - 1, encode._count_all(y, boundaries_ptr, BITS))


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("probe_encode_bucketize.py needs a CUDA GPU")
    variant = os.environ.get("VARIANT", "shipped")
    if variant != "shipped":
        encode._bucketize = {"symmetric": _bucketize_symmetric, "all": _bucketize_all}[variant]
    torch.manual_seed(0)
    x = torch.randn(1, 8, 65536, 128, device="cuda", dtype=torch.bfloat16)
    for bits in (4, 3, 2):
        quantizer = TurboQuantizer(128, bits, device="cuda")
        storage = random_quantized(quantizer, 1, 65536)
        encode.encode_into_triton(x, quantizer, storage, 0)
        got = unpack(storage.packed_indices, bits, 128)
        want = unpack(quantizer.quantize(x).packed_indices, bits, 128)
        us = median_us(lambda: encode.encode_into_triton(x, quantizer, storage, 0), calls=30, graph=True)
        print(json.dumps({"variant": variant, "bits": bits, "graph_us": round(us, 1),
                          "indices_differing_from_torch": int((got != want).sum()), "indices": got.numel(),
                          "gpu": torch.cuda.get_device_name(), "triton": triton.__version__}), flush=True)


if __name__ == "__main__":
    main()
