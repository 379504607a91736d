"""Extra memory and time of dense causal attention for a chunk of M queries over L keys, four ways (CUDA).

    python benchmarks/probe_dense_attention.py

bf16, Hq=32, Hkv=8, D=128; the chunk's queries are the last M of the L positions (bottom-right causal), as in
chunked prefill over a cache. Ways: SDPA(enable_gqa=True) with an explicit (M, L) bool mask; the query heads of
each kv head folded into the query axis with the mask repeated; K/V repeated per query head (what transformers'
sdpa path does when there is a mask); SDPA(enable_gqa=True) with ``causal_lower_right(M, L)``, the bias object
that ``turboquant_hf.attention.dense_attention`` uses. Peak = torch.cuda.max_memory_allocated beyond the inputs;
time = mean of 3 calls after one warm-up. One JSON line per shape.
"""

from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
GROUP = Q_HEADS // KV_HEADS
SHAPES = [(1, 512, 1 << 20), (1, 64, 1 << 20), (1, 8192, 32768), (8, 8192, 8192)]  # (B, M, L)


def measure(fn) -> dict:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        return {"ms": (time.perf_counter() - start) / 3 * 1e3,
                "peak_extra_gib": (torch.cuda.max_memory_allocated() - base) / 2**30}
    except torch.OutOfMemoryError as error:
        return {"error": f"OutOfMemoryError: {str(error)[:100]}"}


def main() -> None:
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}))
    for batch, m, length in SHAPES:
        q = torch.randn(batch, Q_HEADS, m, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(batch, KV_HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        positions = torch.arange(length, device="cuda")
        mask = positions <= (length - m + torch.arange(m, device="cuda"))[:, None]

        def repeated(t):
            return t[:, :, None].expand(batch, KV_HEADS, GROUP, length, HEAD_DIM).reshape(batch, Q_HEADS, length, -1)

        ways = {
            "gqa + (M, L) mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
            "heads folded into M + mask": lambda: F.scaled_dot_product_attention(
                q.reshape(batch, KV_HEADS, GROUP * m, HEAD_DIM), k, v, attn_mask=mask.repeat(GROUP, 1)),
            "K/V repeated + mask": lambda: F.scaled_dot_product_attention(q, repeated(k), repeated(v), attn_mask=mask),
            "gqa + causal_lower_right": lambda: F.scaled_dot_product_attention(
                q, k, v, attn_mask=causal_lower_right(m, length), enable_gqa=True),
        }
        rows = {name: measure(fn) for name, fn in ways.items()}
        print(json.dumps({"B": batch, "M": m, "L": length, "rows": rows}), flush=True)
        del q, k, v, mask


if __name__ == "__main__":
    main()
