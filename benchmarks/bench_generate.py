"""End-to-end decode speed and memory on a randomly initialised 8B-shaped Llama (CUDA, bf16).

    python benchmarks/bench_generate.py --prompt 32768 --new 128 --batch 1 8 --out results.json

For each batch size: prefill the prompt, then greedily decode --new tokens, with
  dynamic  DynamicCache + SDPA (the baseline)
  tq-default  TurboQuantCache(bits=4) + SDPA (past dequantized per layer into a transient tensor)
  tq-fused  TurboQuantCache(bits=4) + attn_implementation="turboquant" (reads the packed cache)
and reports decode tokens/s (batch * tokens / seconds), torch.cuda.max_memory_allocated during prefill+decode,
the cache's own bytes, and (with --max-context) the largest B=1 context that fits, found by doubling then
bisection: each probe writes random K/V for all but the last --max-context-chunk tokens straight into the cache
(a million-token prefill's O(N^2) attention would not fit in a 10-minute device call), prefills that last chunk
through the model, and decodes 2 tokens.
Random weights are fine for speed; the model is 32 layers, hidden 4096, 32/8 heads, head_dim 128.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time

import torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import turboquant_hf
from turboquant_hf import TurboQuantCache
from turboquant_hf.eval.loading import forward

CONFIGS = {
    "dynamic": ("sdpa", lambda: DynamicCache()),
    "tq4-default": ("sdpa", lambda: TurboQuantCache(bits=4, residual_length=128)),
    "tq4-fused": ("turboquant", lambda: TurboQuantCache(bits=4, residual_length=128)),
}


def llama_8b_config(layers: int = 32) -> LlamaConfig:
    """Llama-3-8B's shape (hidden 4096, GQA 32/8, head_dim 128, MLP 14336) with ``layers`` layers."""
    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       max_position_embeddings=1 << 20, rope_theta=500000.0)


def build_model(layers: int, device: str = "cuda", config: LlamaConfig | None = None) -> LlamaForCausalLM:
    """A randomly initialised bf16 Llama on ``device``: ``config``, or the 8B shape with ``layers`` layers."""
    config = config or llama_8b_config(layers)
    torch.manual_seed(0)
    with torch.device(device):
        torch.set_default_dtype(torch.bfloat16)
        model = LlamaForCausalLM(config)
        torch.set_default_dtype(torch.float32)
    return model.eval()


def cache_bytes(cache) -> int:
    if isinstance(cache, TurboQuantCache):
        return cache.memory_report()["compressed_bytes"]
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


@torch.no_grad()
def run_once(model, impl: str, make_cache, batch: int, prompt: int, new: int, profile: bool = False) -> dict:
    model.set_attn_implementation(impl)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device="cuda")
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    cache = make_cache()
    torch.cuda.synchronize()
    start = time.perf_counter()
    # Prefill in chunks of 8K tokens so that the MLP activations of a long prompt do not dominate memory.
    for begin in range(0, prompt, 8192):
        logits = forward(model, ids[:, begin:begin + 8192], cache, logits_to_keep=1).logits
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - start
    token = logits[:, -1].argmax(-1, keepdim=True)
    # Two warm-up steps (Triton compilation, allocator), then the timed decode.
    for _ in range(2):
        token = forward(model, token, cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(new):
        token = forward(model, token, cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    decode_s = time.perf_counter() - start
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                token = forward(model, token, cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
        print(f"--- profile: {impl} B={batch}, 3 decode steps", flush=True)
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25), flush=True)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15), flush=True)
    result = {
        "batch": batch, "prompt": prompt, "new_tokens": new,
        "prefill_s": prefill_s, "decode_tokens_per_s": batch * new / decode_s, "decode_ms_per_step": 1e3 * decode_s / new,
        "peak_allocated_gib": (torch.cuda.max_memory_allocated() - base) / 2**30,
        "cache_gib": cache_bytes(cache) / 2**30,
    }
    del cache, logits
    return result


@torch.no_grad()
def fill(model, cache, context: int, chunk: int = 1 << 18) -> None:
    """Write ``context`` tokens of random K/V (B=1, the model's dtype) into every layer of ``cache`` through ``cache.update``,
    in ``chunk``-token pieces: the calls a chunked prefill makes, without the model's O(N^2) compute."""
    config = model.config
    shape = (1, config.num_key_value_heads, 0, config.head_dim)
    for layer in range(config.num_hidden_layers):
        for begin in range(0, context, chunk):
            n = min(chunk, context - begin)
            states = torch.randn(*shape[:2], 2 * n, shape[-1], device=model.device, dtype=model.dtype)
            cache.update(states[:, :, :n], states[:, :, n:], layer)
            del states


@torch.no_grad()
def fits(model, impl, make_cache, context: int, last_chunk: int) -> bool:
    """Whether a B=1 context of ``context`` tokens fits: 16 prompt tokens prefilled through the model (so the
    cache and attention are in the state a real prefill leaves), the next ``context - last_chunk - 16`` written
    into the cache by :func:`fill`, the last ``last_chunk`` prompt tokens prefilled through the model (the peak
    of a chunked prefill at the full context), then 2 greedy decode steps."""
    model.set_attn_implementation(impl)
    cache = None
    try:
        cache = make_cache()
        ids = torch.randint(0, model.config.vocab_size, (1, last_chunk), device=model.device)
        forward(model, ids[:, :16], cache, logits_to_keep=1)
        fill(model, cache, context - last_chunk - 16)
        token = forward(model, ids, cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(2):
            token = forward(model, token, cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        del cache
        gc.collect()
        torch.cuda.empty_cache()


def max_context(model, impl, make_cache, start: int, limit: int, last_chunk: int) -> int:
    """Largest B=1 context that fits (see :func:`fits`), by doubling from ``start`` then bisection to 1/64 of it."""
    low, high = 0, start
    while high <= limit and fits(model, impl, make_cache, high, last_chunk):
        print(f"  {high} fits", flush=True)
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > max(low // 64, 4096):
        middle = (low + high) // 2 // 4096 * 4096
        ok = fits(model, impl, make_cache, middle, last_chunk)
        print(f"  {middle} {'fits' if ok else 'does not fit'}", flush=True)
        low, high = (middle, high) if ok else (low, middle)
    return low


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=32768, help="prompt tokens of the speed runs (0: skip them)")
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--max-context", action="store_true",
                        help="also search the largest B=1 context that fits (cache filled directly, see fits())")
    parser.add_argument("--max-context-start", type=int, default=1 << 18)
    parser.add_argument("--max-context-limit", type=int, default=1 << 23)
    parser.add_argument("--max-context-chunk", type=int, default=512, help="prompt tokens prefilled through the model")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of 3 decode steps")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_generate.py needs a CUDA GPU")
    machine = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
               "turboquant_hf": turboquant_hf.__version__, "python": platform.python_version(),
               "command": " ".join(sys.argv), "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
    print(json.dumps(machine))
    model = build_model(args.layers)
    rows = []
    for batch in args.batch if args.prompt else []:
        for name in args.configs:
            impl, make_cache = CONFIGS[name]
            row = {"config": name, **run_once(model, impl, make_cache, batch, args.prompt, args.new, args.profile)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| config | B | prompt | decode tok/s | ms/step | peak alloc GiB | cache GiB |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['config']} | {row['batch']} | {row['prompt']} | {row['decode_tokens_per_s']:.1f} | "
              f"{row['decode_ms_per_step']:.2f} | {row['peak_allocated_gib']:.2f} | {row['cache_gib']:.3f} |")
    contexts = {}
    if args.max_context:
        for name in args.configs:
            impl, make_cache = CONFIGS[name]
            contexts[name] = max_context(model, impl, make_cache, args.max_context_start, args.max_context_limit,
                                         args.max_context_chunk)
            print(f"max context (B=1) {name}: {contexts[name]}", flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"machine": machine, "rows": rows, "max_context_b1": contexts}, handle, indent=1)


if __name__ == "__main__":
    main()
