"""Where the fused kernel's time goes: its codebook-table lookups, three ways (one CUDA GPU).

    VARIANT=smem python benchmarks/probe_table_gather.py      # as shipped: tl.gather, table in shared memory
    VARIANT=l1 python benchmarks/probe_table_gather.py        # the previous lookup: tl.load gathers through L1
    VARIANT=alu python benchmarks/probe_table_gather.py       # no lookup: entries made up from the bytes (wrong
                                                              # values; a lower bound on what lookups cost)
    BITS=2 VARIANT=... (default 4)

Swaps ``_gather`` of ``turboquant_hf.kernels.decode_attention`` before the kernel compiles, then times the
fused attention (CUDA-graph replay, median of 200) at B=8, N=32K, Hq=32, Hkv=8, D=128, one query token, next to
bf16 SDPA with enable_gqa=True measured in the same run; smem and l1 are also checked against the torch twin.
Prints one JSON line.
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
from bench_attention import median_us  # noqa: E402
from turboquant_hf import TurboQuantizer  # noqa: E402
from turboquant_hf.kernels.dequant import decode_packed  # noqa: E402

attention = importlib.import_module("turboquant_hf.kernels.decode_attention")


@triton.jit
def _gather_l1(words, table_ptr, BITS: tl.constexpr, PHASES: tl.constexpr):
    if PHASES == 1:
        gathered = decode_packed(words, table_ptr, BITS)
    else:
        gathered = tl.load(table_ptr + words.to(tl.int32))
    return gathered


@triton.jit
def _gather_alu(words, table_ptr, BITS: tl.constexpr, PHASES: tl.constexpr):
    w = words.to(tl.int32)
    if PHASES == 1:
        gathered = (((w & 15) << 2) | 0x3C00).to(tl.int16).to(tl.float16, bitcast=True)
    else:  # two fp16 in [1, 2) per int32, from the byte's nibbles: a few integer ops, no memory access
        gathered = ((w & 15) << 2) | 0x3C00 | ((w >> 4) << 18) | 0x3C000000
    return gathered


def main() -> None:
    variant, bits = os.environ.get("VARIANT", "smem"), int(os.environ.get("BITS", "4"))
    if variant not in ("smem", "l1", "alu"):
        sys.exit(f"VARIANT must be smem, l1 or alu, got {variant!r}")
    if not torch.cuda.is_available():
        sys.exit("probe_table_gather.py needs a CUDA GPU")
    attention._gather = {"smem": attention._gather, "l1": _gather_l1, "alu": _gather_alu}[variant]
    batch, length, q_heads, kv_heads, dim = 8, 32768, 32, 8, 128
    quantizer = TurboQuantizer(dim, bits)
    torch.manual_seed(0)
    keys = quantizer.quantize(torch.randn(batch, kv_heads, length, dim, device="cuda"))
    values = quantizer.quantize(torch.randn(batch, kv_heads, length, dim, device="cuda"))
    query = torch.randn(batch, q_heads, 1, dim, device="cuda", dtype=torch.bfloat16)
    fused = lambda: attention.decode_attention_triton(query, keys, values, quantizer, quantizer, None, None,
                                                      scale=dim**-0.5)
    error = float("nan")
    if variant != "alu":
        twin = attention.decode_attention_torch(query[:1], keys[:1], values[:1], quantizer, quantizer, None, None,
                                                scale=dim**-0.5)
        error = (fused()[:1].float() - twin.float()).abs().max().item()
    dense_k = torch.randn(batch, kv_heads, length, dim, device="cuda", dtype=torch.bfloat16)
    dense_v = torch.randn_like(dense_k)
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(query, dense_k, dense_v, enable_gqa=True)
    print(json.dumps({"variant": variant, "bits": bits, "us": median_us(fused, calls=200, graph=True),
                      "sdpa_us": median_us(sdpa, calls=200, graph=True), "max_err_vs_twin": error,
                      "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}))


if __name__ == "__main__":
    main()
