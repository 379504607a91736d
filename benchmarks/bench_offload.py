"""Offloaded KV caches on an 8B-shaped Llama: decode step time and GPU memory, TurboQuant vs transformers (issue 19).

    python benchmarks/bench_offload.py --prompt 32768 131072 --out offload.json           # H200: about 3 min
    python benchmarks/bench_offload.py --device cpu --layers 2 --hidden 256 --prompt 64 256 --steps 4   # CPU smoke

Batch 1, a randomly initialised bf16 model (bench_generate.py's, --layers / --hidden shrink it as in
bench_decode.py). Each row is bench_decode.py's ``run_config``: the prompt prefilled in --prefill-chunk pieces, then
--steps greedy decode steps, each timed alone between two synchronizes (median), after 2 warm-up steps; peak is
max_memory_allocated over cache creation + prefill + decode, less the weights. Configs:
  tq4-fused        TurboQuantCache(bits=4) on the GPU + "turboquant" attention (the on-GPU twin of tq4-offload)
  tq4-offload      TurboQuantCache(bits=4, offloading=True) + "turboquant" attention
  dynamic          DynamicCache + SDPA (the on-GPU twin of dynamic-offload)
  dynamic-offload  DynamicCache(offloading=True) + SDPA: transformers' offloaded bf16 cache
Then, per row: its step time over its on-GPU twin's and over the on-GPU DynamicCache's (issue 19's goal for tq4 at
128K: at most 1.3x "the on-GPU cache"), and for offloaded rows the host-link floor, the cache's bytes (packed or bf16) over the pinned host-to-device bandwidth measured at start:
a step that moves the cache over the link once cannot be faster. The longest B=1 context is extrapolated, not
searched: GPU memory as a straight line through the peaks of the two longest prompts, and for offloaded caches host
memory at the cache's bytes per token against all of RAM (pinned memory cannot be swapped out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from transformers import DynamicCache

from bench_decode import CONFIGS as DECODE_CONFIGS
from bench_decode import HEADER, Unavailable, measured_row, prepared_model, synchronize, table_line
from turboquant_hf import TurboQuantCache


def offloaded_dynamic_cache(config) -> DynamicCache:
    if not torch.cuda.is_available():
        raise Unavailable("transformers' offloaded DynamicCache needs CUDA")
    return DynamicCache(config=config, offloading=True)


# name -> bench_decode.CONFIGS' tuple (attention implementation, compiled, cache bytes a step reads, factory).
CONFIGS = {
    "tq4-fused": DECODE_CONFIGS["tq4-fused"],
    "tq4-offload": ("turboquant", False, "turboquant",
                    lambda config, batch, length: TurboQuantCache(bits=4, config=config, offloading=True)),
    "dynamic": DECODE_CONFIGS["dynamic"],
    "dynamic-offload": ("sdpa", False, "dense", lambda config, batch, length: offloaded_dynamic_cache(config)),
}
ON_GPU_TWIN = {"tq4-offload": "tq4-fused", "dynamic-offload": "dynamic"}


def host_to_device_bandwidth(device: torch.device) -> float:
    """Bytes/s of a 1 GiB non-blocking copy from pinned host memory to ``device``."""
    source = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    target = torch.empty_like(source, device=device)
    target.copy_(source, non_blocking=True)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(5):
        target.copy_(source, non_blocking=True)
    synchronize(device)
    seconds = time.perf_counter() - start
    del source, target
    return 5 * (1 << 30) / seconds


def longest_context(rows: list[dict], name: str, gpu_bytes: int, host_bytes: int, weights_bytes: int) -> dict | None:
    """Extrapolated longest B=1 context of config ``name`` (module docstring), or None without two measured rows."""
    done = sorted((row for row in rows if row["config"] == name and row.get("peak_beyond_weights_bytes")),
                  key=lambda row: row["cached_tokens"])
    if len(done) < 2:
        return None
    low, high = done[-2], done[-1]
    per_token = ((high["peak_beyond_weights_bytes"] - low["peak_beyond_weights_bytes"])
                 / (high["cached_tokens"] - low["cached_tokens"]))
    fixed = high["peak_beyond_weights_bytes"] - per_token * high["cached_tokens"]
    result = {"gpu_bytes_per_token": per_token,
              "gpu_tokens": int((gpu_bytes - weights_bytes - fixed) / per_token) if per_token > 0 else None}
    if name in ON_GPU_TWIN:
        result["host_bytes_per_token"] = high["cache_read_bytes"] / high["cached_tokens"]
        result["host_tokens"] = int(host_bytes / result["host_bytes_per_token"])
    result["tokens"] = min(tokens for key, tokens in result.items() if key.endswith("_tokens") and tokens)
    return result


def summary(rows: list[dict], link_bandwidth: float | None) -> list[str]:
    """Markdown lines: each measured row against its on-GPU twin and the host-link floor."""
    steps = {(row["config"], row["prompt"]): row["step_ms_median"] for row in rows if "step_ms_median" in row}
    lines = ["| config | prompt | step ms | on-GPU twin ms | x twin | x dynamic | host-link floor ms | "
             "peak beyond weights GiB | cache GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "step_ms_median" not in row:
            continue
        twin = steps.get((ON_GPU_TWIN.get(row["config"]), row["prompt"]))
        dynamic = steps.get(("dynamic", row["prompt"]))
        floor = (1e3 * row["cache_read_bytes"] / link_bandwidth
                 if link_bandwidth and row["config"] in ON_GPU_TWIN else None)
        row.update(twin_step_ms=twin, over_twin=twin and row["step_ms_median"] / twin,
                   over_dynamic=dynamic and row["step_ms_median"] / dynamic, host_link_floor_ms=floor)
        peak = row["peak_beyond_weights_bytes"]
        cells = [row["config"], str(row["prompt"]), f"{row['step_ms_median']:.2f}",
                 "-" if twin is None else f"{twin:.2f}", "-" if twin is None else f"{row['over_twin']:.2f}",
                 "-" if dynamic is None else f"{row['over_dynamic']:.2f}",
                 "-" if floor is None else f"{floor:.2f}", "-" if peak is None else f"{peak / 2**30:.2f}",
                 f"{row['cache_bytes'] / 2**30:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--prompt", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps per row")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--prefill-chunk", type=int, default=8192, help="prefill in pieces of this many tokens")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096, help="hidden size (4096: the 8B shape)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None, help="JSON file, rewritten after every row")
    args = parser.parse_args()
    args.max_cache_len = None  # run_config reads it (static caches only)
    args.profile = 0  # and this (bench_decode.py --profile)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_offload.py: no CUDA GPU here (use --device cpu for a smoke test)")

    model, machine = prepared_model(args, device)
    link = host_to_device_bandwidth(device) if device.type == "cuda" else None
    gpu_bytes = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    host_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    machine.update(host_to_device_gb_s=link and link / 1e9, gpu_bytes=gpu_bytes, host_bytes=host_bytes)
    if link:
        print(f"pinned host-to-device bandwidth: {link / 1e9:.1f} GB/s; GPU {gpu_bytes / 2**30:.0f} GiB, "
              f"host RAM {host_bytes / 2**30:.0f} GiB", flush=True)

    rows, contexts = [], {}
    print("\n" + HEADER, flush=True)
    for prompt in args.prompt:
        for name in args.configs:
            rows.append(measured_row(model, name, 1, prompt, args, None, CONFIGS))
            print(table_line(rows[-1], CONFIGS), flush=True)
            if args.out:
                with open(args.out, "w") as handle:
                    json.dump({"machine": machine, "rows": rows}, handle, indent=1)
    print("\n" + "\n".join(summary(rows, link)))
    if gpu_bytes:
        for name in args.configs:
            contexts[name] = longest_context(rows, name, gpu_bytes, host_bytes, args.weights_bytes)
            if contexts[name]:
                print(f"longest B=1 context, extrapolated, {name}: {contexts[name]['tokens']} tokens "
                      f"({json.dumps(contexts[name])})")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"machine": machine, "rows": rows, "longest_context_b1": contexts}, handle, indent=1)


if __name__ == "__main__":
    main()
