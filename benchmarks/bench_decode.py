"""Decode step time against the memory-bandwidth floor, static (compiled, CUDA-graphed) and dynamic caches (issue 21).

    python benchmarks/bench_decode.py --batch 1 --out b1.json       # the default set, B=1
    python benchmarks/bench_decode.py --batch 8 16 --out b8.json    # the rest of the default set
    python benchmarks/bench_decode.py --batch 1 --prompt 32768 --configs static-compile tq4-static-compile
    python benchmarks/bench_decode.py --device cpu --layers 2 --hidden 256 --no-compile --batch 1 2 \\
        --prompt 64 256 --steps 4                                               # CPU smoke test, < 1 min

A randomly initialised 8B-shaped Llama (bench_generate.py's, bf16; --layers/--hidden shrink it). For each
batch x prompt x config: one prompt prefilled in one forward (in --prefill-chunk pieces if given), then --steps
greedy decode steps, each timed alone between two synchronizes (median and p90), after warm-up steps (compile,
CUDA-graph recording, Triton autotuning) whose first is reported as "1st step s". Configs:
  static-compile      transformers' StaticCache + SDPA, forward compiled with mode="reduce-overhead", fullgraph=True
  tq4-static-compile  TurboQuantCache(bits=4, max_cache_len, max_batch_size) + "turboquant" attention, compiled
  tq4-fused           TurboQuantCache(bits=4) (dynamic layout) + "turboquant" attention, eager
  dynamic             DynamicCache + SDPA, eager
  quanto-int4, fp8    transformers' QuantizedCache (optimum-quanto int4; per-tensor float8), eager
One compiled forward serves every compiled row, compiled with dynamic=True (--compile-dynamic): one graph for B=1
(size-1 dims are always specialized) and one for B > 1 per cache type; generate's default (dynamic=None,
--compile-dynamic auto) compiles static shapes, then recompiles for the first length change and for a batch change;
--compile-dynamic false with one --max-cache-len for every row compiles once per cache type. Each compile of the
32-layer model takes about a minute (the "1st step s" column: benchmarks/results/h200_bench_decode_b1*.log), so the
whole default set does not fit one 10-minute device call: run B=1 and B=8,16 as two processes (gpu_check.sh steps
decode and decode-batch).

The floor is the time to read, once per step, what a decode step must read: the weights (less the embedding table,
of which a step reads one row per sequence) and the cache (bf16: 2 * layers * kv_heads * head_dim * 2 bytes per
cached token; TurboQuant: memory_report()'s compressed bytes; quantized caches: the bytes they hold), at the
bandwidth of a large device-to-device copy measured at start ((read + written bytes) / time). Peak is
max_memory_allocated over cache creation + prefill + decode, less the weights' bytes; cache GiB is what the cache
object holds after decoding. A row is OOM when torch.OutOfMemoryError was raised (memory is freed and the run goes
on); a config this machine cannot build is skipped with its reason.

--profile N runs N more steps without synchronizing between them (the host's time to issue a step), N under cProfile
and N under torch.profiler (kernels inside CUDA graphs included) and prints, per row, the GPU time per step (the sum
of its kernels' times: against the step time, how much of the step the GPU is busy), the GPU's idle time between
kernels and the kernel pairs around most of it, the CUDA graph launches per step (one when the whole step is one
graph), the host ms per step, the kernels that take most of the GPU time and the Python functions that take most of
the host's; the JSON keeps the top 25 kernels ("profile").
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
import traceback

import torch
import transformers
from transformers import DynamicCache, StaticCache

import turboquant_hf
from bench_generate import build_model, llama_8b_config
from turboquant_hf import TurboQuantCache
from turboquant_hf.eval import specs
from turboquant_hf.eval.footprint import held_bytes
from turboquant_hf.eval.loading import cache_kwarg

WARMUP_EAGER = 2  # Triton JIT and autotuning, allocator
WARMUP_COMPILED = 3  # compile (or recompile), CUDA-graph warm-up run, recording
MARGIN = 16  # spare static slots past prompt + warm-up + steps


class Unavailable(Exception):
    """This machine cannot build the config (missing package, older library): the row is skipped, with the reason."""


def tq_static_cache(model_config, bits: int, max_cache_len: int, max_batch_size: int) -> TurboQuantCache:
    """TurboQuantCache's static, compileable layout (issue 21), or Unavailable on a turboquant_hf without it."""
    try:
        return TurboQuantCache(bits=bits, max_cache_len=max_cache_len, max_batch_size=max_batch_size,
                               config=model_config)
    except TypeError as error:
        if "max_cache_len" in str(error) or "max_batch_size" in str(error):
            raise Unavailable(f"this turboquant_hf has no static TurboQuantCache (TypeError: {error})") from None
        raise


def quantized_cache(spec_name: str, model_config):
    """transformers' QuantizedCache as the quality runs build it (turboquant_hf.eval.specs), or Unavailable."""
    spec = specs.parse_cache_spec(spec_name)
    missing = specs.missing_backend(spec)
    if missing:
        raise Unavailable(missing)
    return specs.make_cache(spec, model_config)


# name -> (attention implementation, compiled, what the floor counts as cache bytes read, cache factory).
# A factory takes (model config, batch, max_cache_len).
CONFIGS = {
    "static-compile": ("sdpa", True, "dense",
                       lambda config, batch, length: StaticCache(config=config, max_cache_len=length)),
    "tq4-static-compile": ("turboquant", True, "turboquant",
                           lambda config, batch, length: tq_static_cache(config, 4, length, batch)),
    "tq4-fused": ("turboquant", False, "turboquant",
                  lambda config, batch, length: TurboQuantCache(bits=4, config=config)),
    "dynamic": ("sdpa", False, "dense", lambda config, batch, length: DynamicCache(config=config)),
    "quanto-int4": ("sdpa", False, "held", lambda config, batch, length: quantized_cache("quanto-int4", config)),
    "fp8": ("sdpa", False, "held", lambda config, batch, length: quantized_cache("fp8", config)),
}


def model_config(layers: int, hidden: int):
    """The 8B shape with ``layers`` layers; with a smaller ``hidden``, heads of 64 and 4 query heads per kv head."""
    config = llama_8b_config(layers)
    if hidden != config.hidden_size:
        heads = max(hidden // 64, 1)
        config.hidden_size, config.intermediate_size, config.head_dim = hidden, hidden * 7 // 2, 64
        config.num_attention_heads, config.num_key_value_heads = heads, max(heads // 4, 1)
    return config


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written."""
    size = (1 << 30) if device.type == "cuda" else (64 << 20)
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    repeats = 20 if device.type == "cuda" else 5
    target.copy_(source)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    synchronize(device)
    seconds = time.perf_counter() - start
    del source, target
    return 2 * size * repeats / seconds


def weight_bytes(model) -> tuple[int, int]:
    """(bytes of all parameters and buffers, bytes one decode step reads: all but the input embedding table,
    unless it is tied to the output head)."""
    held = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    read = held - (0 if embedding is head else embedding.nbytes)
    return held, read


def cache_read_bytes(kind: str, cache, config, batch: int, tokens: int) -> int:
    """Bytes of cache one decode step must read at ``tokens`` cached tokens (see the module docstring)."""
    if kind == "dense":
        return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2 * batch * tokens
    if kind == "turboquant":
        return cache.memory_report()["compressed_bytes"]
    return held_bytes(cache)


GAP_PAIRS = 8  # kernel pairs with the most GPU idle time between them, kept per profile


def host_profile(step, token: torch.Tensor, steps: int, device: torch.device) -> tuple[float, list[dict]]:
    """Run ``steps`` decode steps without a synchronize between them: (host ms per step: how long the host takes to
    issue one when the GPU does not hold it back; then the same under cProfile: the 12 Python functions with the most
    own time per step, ms)."""
    import cProfile
    import pstats

    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        token = step(token)
    host_ms = 1e3 * (time.perf_counter() - start) / steps
    synchronize(device)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        token = step(token)
    profiler.disable()
    synchronize(device)
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, primitive calls, own s, cumulative s, ...)
    ranked = sorted(stats.items(), key=lambda item: -item[1][2])[:12]
    return host_ms, [{"function": f"{name} ({file.rsplit('/', 2)[-1]}:{line})", "calls_per_step": calls / steps,
                      "own_ms_per_step": 1e3 * own / steps, "cumulative_ms_per_step": 1e3 * cumulative / steps}
                     for (file, line, name), (_, calls, own, cumulative, _) in ranked]


def idle_gaps(kernel_events, steps: int) -> tuple[float, list[dict]]:
    """GPU idle time between consecutive kernels (by start time) shorter than 1 ms (inside a step, not the host's
    turn between steps), ms per step, and the kernel pairs with the most of it."""
    ordered = sorted(kernel_events, key=lambda event: event.time_range.start)
    pairs: dict[tuple[str, str], list[float]] = {}
    total = 0.0
    for before, after in zip(ordered, ordered[1:]):
        gap = (after.time_range.start - before.time_range.end) / 1e3  # us -> ms
        if 0 < gap < 1.0:
            total += gap
            pairs.setdefault((before.name[:60], after.name[:60]), []).append(gap)
    top = sorted(pairs.items(), key=lambda item: -sum(item[1]))[:GAP_PAIRS]
    return total / steps, [{"before": a, "after": b, "ms_per_step": sum(g) / steps, "count_per_step": len(g) / steps}
                           for (a, b), g in top]


def profile_steps(step, token: torch.Tensor, steps: int, device: torch.device) -> dict:
    """Host time to issue a step and its Python hot spots (``host_profile``), then ``steps`` steps under
    torch.profiler: GPU ms per step, idle time between kernels (``idle_gaps``), CUDA graph launches per step, and the
    top kernels (ms and launches per step)."""
    from torch.profiler import ProfilerActivity, profile

    host_ms, host_top = host_profile(step, token, steps, device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        for _ in range(steps):
            token = step(token)
        synchronize(device)
    events = profiler.key_averages()
    kernels = [(event.key, getattr(event, "device_time_total", 0.0) / 1e3 / steps, event.count / steps)
               for event in events if event.device_type == torch.autograd.DeviceType.CUDA]
    kernels = sorted((kernel for kernel in kernels if kernel[1] > 0), key=lambda kernel: -kernel[1])
    graph_launches = sum(event.count for event in events if event.key == "cudaGraphLaunch") / steps
    kernel_events = [event for event in profiler.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    idle_ms, gap_pairs = idle_gaps(kernel_events, steps)
    return {"gpu_ms_per_step": sum(kernel[1] for kernel in kernels), "host_ms_per_step": host_ms,
            "idle_ms_per_step": idle_ms, "graph_launches_per_step": graph_launches,
            "launches_per_step": sum(kernel[2] for kernel in kernels),
            "top": [{"kernel": name[:160], "ms_per_step": ms, "launches_per_step": count}
                    for name, ms, count in kernels[:25]],
            "idle_pairs": gap_pairs, "host_top": host_top}


def print_profile(row: dict) -> None:
    profile = row["profile"]
    print(f"  profile {row['config']} B={row['batch']} prompt={row['prompt']}: GPU busy {profile['gpu_ms_per_step']:.2f} "
          f"ms of a {row['step_ms_median']:.2f} ms step, {profile['launches_per_step']:.0f} kernels and "
          f"{profile['graph_launches_per_step']:.0f} CUDA graph launches per step; the host issues a step in "
          f"{profile['host_ms_per_step']:.2f} ms")
    for kernel in profile["top"][:12]:
        print(f"    {kernel['ms_per_step']:7.3f} ms  x{kernel['launches_per_step']:<5.0f} {kernel['kernel'][:110]}")
    print(f"    GPU idle between kernels (gaps < 1 ms): {profile['idle_ms_per_step']:.2f} ms per step; most of it:")
    for pair in profile["idle_pairs"]:
        print(f"    {pair['ms_per_step']:7.3f} ms  x{pair['count_per_step']:<5.0f} {pair['before'][:50]} -> "
              f"{pair['after'][:50]}")
    print("    host, Python functions with the most own time (cProfile, ms per step, own / cumulative):")
    for function in profile["host_top"]:
        print(f"    {function['own_ms_per_step']:7.3f} / {function['cumulative_ms_per_step']:7.3f}  "
              f"x{function['calls_per_step']:<6.0f} {function['function'][:100]}")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[max(math.ceil(fraction * len(ordered)) - 1, 0)]


@torch.no_grad()
def run_config(model, name: str, batch: int, prompt: int, args, compiled_forward, configs: dict = CONFIGS) -> dict:
    """One row: prefill a random prompt, decode, time each step (``configs[name]``, see CONFIGS). Raises
    OutOfMemoryError, Unavailable."""
    impl, compiled, read_kind, make_cache = configs[name]
    compiled = compiled and compiled_forward is not None
    device = model.device
    warmup = WARMUP_COMPILED if compiled else WARMUP_EAGER
    # The profiled steps (2 * --profile) need slots too: StaticCache's SDPA reads every slot, so --profile makes its
    # timed steps read 2 * N more (a fraction of a percent at 8K tokens and more).
    max_cache_len = max(args.max_cache_len or 0, prompt + warmup + args.steps + 2 * args.profile + MARGIN)
    model.set_attn_implementation(impl)
    cache_argument = cache_kwarg(model)
    step_forward = compiled_forward if compiled else model
    generator = torch.Generator(device=device).manual_seed(prompt * 1000 + batch)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=device, generator=generator)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cache = make_cache(model.config, batch, max_cache_len)

    def step(tokens: torch.Tensor) -> torch.Tensor:
        """tokens (batch, n) long -> the greedy next token (batch, 1) long."""
        logits = step_forward(tokens, **{cache_argument: cache}, use_cache=True, logits_to_keep=1).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    synchronize(device)
    start = time.perf_counter()
    chunk = args.prefill_chunk or prompt
    for begin in range(0, prompt, chunk):
        logits = model(ids[:, begin:begin + chunk], **{cache_argument: cache}, use_cache=True, logits_to_keep=1).logits
    token = logits[:, -1].argmax(-1, keepdim=True)
    del logits
    synchronize(device)
    prefill_s = time.perf_counter() - start

    first_step_s = None
    for index in range(warmup):
        start = time.perf_counter()
        token = step(token)
        synchronize(device)
        if index == 0:
            first_step_s = time.perf_counter() - start
    step_ms = []
    for _ in range(args.steps):
        start = time.perf_counter()
        token = step(token)
        synchronize(device)
        step_ms.append(1e3 * (time.perf_counter() - start))

    tokens = int(cache.get_seq_length())
    read = cache_read_bytes(read_kind, cache, model.config, batch, tokens)
    row = {
        "compiled": compiled, "attn_implementation": impl, "max_cache_len": max_cache_len if "static" in name else None,
        "cached_tokens": tokens, "prefill_s": prefill_s, "first_step_s": first_step_s,
        "step_ms_median": statistics.median(step_ms), "step_ms_p90": percentile(step_ms, 0.9), "step_ms": step_ms,
        "cache_bytes": held_bytes(cache), "cache_read_bytes": read,
        "peak_beyond_weights_bytes": (torch.cuda.max_memory_allocated(device) - args.weights_bytes
                                      if device.type == "cuda" else None),
    }
    bytes_per_step = args.weights_read_bytes + read
    if args.profile and device.type == "cuda":  # after the row's figures: its steps lengthen the cache
        row["profile"] = profile_steps(step, token, args.profile, device)
    row.update(bytes_read_per_step=bytes_per_step, floor_ms=1e3 * bytes_per_step / args.bandwidth)
    row["measured_over_floor"] = row["step_ms_median"] / row["floor_ms"]
    del cache, ids, token
    return row


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measured_row(model, name: str, batch: int, prompt: int, args, compiled_forward, configs: dict = CONFIGS) -> dict:
    """``run_config``'s row, or the row marked skipped / oom / error (one config's failure must not cost the other
    rows); memory is freed after each."""
    row = {"config": name, "batch": batch, "prompt": prompt}
    try:
        row.update(run_config(model, name, batch, prompt, args, compiled_forward, configs))
    except Unavailable as error:
        row["skipped"] = str(error)
    except torch.OutOfMemoryError:
        row["oom"] = True
    except Exception as error:
        if "out of memory" in str(error).lower():  # an OOM that compiled code wrapped in its own error
            row["oom"] = True
        else:
            traceback.print_exc()
            row["error"] = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
    free(model.device)
    return row


HEADER = ("| config | B | prompt | step ms median | p90 | floor ms | measured/floor | read GiB/step | "
          "peak beyond weights GiB | cache GiB | prefill s | 1st step s | note |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def table_line(row: dict, configs: dict = CONFIGS) -> str:
    cells = [row["config"], str(row["batch"]), str(row["prompt"])]
    if "step_ms_median" not in row:
        note = "OOM" if row.get("oom") else row.get("skipped") or row.get("error", "")
        return "| " + " | ".join(cells + ["-"] * 9 + [note.replace("|", "/")]) + " |"
    peak = row["peak_beyond_weights_bytes"]
    cells += [f"{row['step_ms_median']:.2f}", f"{row['step_ms_p90']:.2f}", f"{row['floor_ms']:.2f}",
              f"{row['measured_over_floor']:.2f}", f"{row['bytes_read_per_step'] / 2**30:.4g}",
              "-" if peak is None else f"{peak / 2**30:.2f}", f"{row['cache_bytes'] / 2**30:.4g}",
              f"{row['prefill_s']:.2f}", f"{row['first_step_s']:.2f}", "" if row["compiled"] or
              not configs[row["config"]][1] else "not compiled (--no-compile)"]
    return "| " + " | ".join(cells) + " |"


def machine_info(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"command": " ".join([sys.executable.split("/")[-1]] + sys.argv),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
            "transformers": transformers.__version__, "turboquant_hf": turboquant_hf.__version__,
            "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
            "cudnn_sdpa": torch.backends.cuda.cudnn_sdp_enabled()}


def prepared_model(args, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """(the random model of --layers / --hidden on ``device``, the machine's description), printed; sets
    args.weights_bytes, args.weights_read_bytes and args.bandwidth, which ``run_config`` reads."""
    machine = machine_info(device)
    model = build_model(args.layers, device.type, model_config(args.layers, args.hidden))
    args.weights_bytes, args.weights_read_bytes = weight_bytes(model)
    args.bandwidth = copy_bandwidth(device)
    machine.update(copy_bandwidth_gb_s=args.bandwidth / 1e9, weights_bytes=args.weights_bytes,
                   weights_read_bytes=args.weights_read_bytes, layers=args.layers, hidden=args.hidden)
    for key in ("command", "device", "torch", "cuda", "triton", "transformers", "turboquant_hf", "python", "cudnn_sdpa"):
        print(f"{key}: {machine[key]}")
    print(f"copy bandwidth: {args.bandwidth / 1e9:.0f} GB/s; weights {args.weights_bytes / 2**30:.2f} GiB, "
          f"read per step {args.weights_read_bytes / 2**30:.2f} GiB", flush=True)
    return model, machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--prompt", type=int, nargs="+", default=[256, 8192, 32768, 131072])
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per row")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--prefill-chunk", type=int, default=None, help="prefill in pieces of this many tokens")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096, help="hidden size (4096: the 8B shape); see model_config")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-compile", action="store_true", help="run the *-compile configs eagerly")
    parser.add_argument("--max-cache-len", type=int, default=None,
                        help="static caches' length for every row (one shape: one compile per cache type with "
                             "--compile-dynamic false); default: each row's prompt + steps + a margin")
    parser.add_argument("--compile-dynamic", choices=("true", "auto", "false"), default="true",
                        help="torch.compile's dynamic: true (fewest compiles) or auto (None, generate's default)")
    parser.add_argument("--no-cudnn-sdpa", action="store_true",
                        help="keep SDPA off its cuDNN backend, which builds a new plan on the host for each new KV "
                             "length (eager decode steps)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile N more steps per row on CUDA: GPU time per step and the top kernels")
    parser.add_argument("--out", default=None, help="JSON file, rewritten after every row")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_decode.py: no CUDA GPU here (use --device cpu for a smoke test)")

    if args.no_cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)
    model, machine = prepared_model(args, device)

    compiled_forward = None
    if not args.no_compile and any(CONFIGS[name][1] for name in args.configs):
        # Every (cache type, batch, length) seen adds an entry; the default limit (8) would fall back to eager.
        for option in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, option):
                setattr(torch._dynamo.config, option, 64)
        compiled_forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True,
                                         dynamic={"true": True, "auto": None, "false": False}[args.compile_dynamic])

    rows = []
    print("\n" + HEADER, flush=True)
    for batch in args.batch:
        for prompt in args.prompt:
            for name in args.configs:
                row = measured_row(model, name, batch, prompt, args, compiled_forward)
                rows.append(row)
                print(table_line(row), flush=True)
                if "profile" in row:
                    print_profile(row)
                if args.out:
                    with open(args.out, "w") as handle:
                        json.dump({"machine": machine, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
