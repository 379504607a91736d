"""Decode on a model split over two GPUs: layers by accelerate's device_map, or heads by tensor parallelism.

    python benchmarks/bench_multi_gpu.py --prompt 32768 131072 --new 64 --one-gpu-reference --out multi_gpu.json
    torchrun --nproc-per-node 2 benchmarks/bench_multi_gpu.py --tp --one-gpu-reference --out multi_gpu_tp.json
    python benchmarks/bench_multi_gpu.py --smoke                            # tiny model on the CPU: the code path only
    torchrun --nproc-per-node 2 benchmarks/bench_multi_gpu.py --tp --smoke  # the same over gloo

The model is bench_generate.py's randomly initialised 8B-shaped Llama (32 layers, GQA 32/8, head_dim 128, bf16).
device_map (default): built on cuda:0, then dispatched with layers 0-15 and the embeddings on cuda:0 and layers 16-31,
the norm and lm_head on cuda:1 (``accelerate.dispatch_model``: what ``device_map="auto"`` makes of a model that
outgrows one GPU). --tp: rank 0 saves it once to --checkpoint, then every rank loads it with ``tp_plan="auto"`` (q/k/v
and the MLP column-split: each rank holds 4 of the 8 kv heads, and its cache only those).

For each prompt length and cache: a chunked prefill (8K tokens per call), 2 warm-up steps, then --new greedy steps,
each timed with every GPU of the process synchronised. Reported per run: the median ms per step; per GPU the peak
``torch.cuda.max_memory_allocated`` and the peak above what was allocated before the run (weights); the cache's bytes
(this rank's, under --tp); the greedy agreement with bf16 (share of the --new positions holding bf16's token, and the
first divergence; on random weights a check of the path, not of quality). Caches:
  bf16        DynamicCache + SDPA (the baseline)
  tq4         TurboQuantCache(bits=4) + attn_implementation="turboquant" (reads the packed cache)
  tq4-static  TurboQuantCache(bits=4, max_cache_len=prompt + new + 2) + "turboquant", eager: CUDA graphs capture one
              device, so a split model's step is not graphed
--one-gpu-reference also runs tq4 on the whole model on cuda:0 (device_map: before dispatching; --tp: rank 0 after the
runs) and reports whether the split run's tokens are the same.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache, LlamaConfig

import turboquant_hf
from turboquant_hf import TurboQuantCache
from turboquant_hf.eval.loading import forward

from bench_generate import build_model, cache_bytes, llama_8b_config  # noqa: E402  (benchmarks/ is the script's folder)

CACHES = {
    "bf16": ("sdpa", lambda prompt, new: DynamicCache()),
    "tq4": ("turboquant", lambda prompt, new: TurboQuantCache(bits=4)),
    "tq4-static": ("turboquant", lambda prompt, new: TurboQuantCache(bits=4, max_cache_len=prompt + new + _WARMUP)),
}
_WARMUP = 2
_PREFILL_CHUNK = 8192


def smoke_config() -> LlamaConfig:
    """A tiny Llama of the same structure (GQA 4/2, head_dim 32) for --smoke on the CPU."""
    return LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096)


def two_way_device_map(layers: int, devices: list[str]) -> dict[str, str]:
    """Embeddings and the first half of the layers on devices[0], the rest, the norm and lm_head on devices[1]."""
    device_map = {"model.embed_tokens": devices[0], "model.rotary_emb": devices[0]}
    device_map.update({f"model.layers.{index}": devices[index * 2 // layers] for index in range(layers)})
    device_map.update({"model.norm": devices[1], "lm_head": devices[1]})
    return device_map


def synchronize(devices: list[torch.device]) -> None:
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def allocated(devices: list[torch.device], peak: bool = False) -> list[float | None]:
    """GiB allocated now (or at the peak since the last reset) on each device; None off CUDA."""
    read = torch.cuda.max_memory_allocated if peak else torch.cuda.memory_allocated
    return [read(device) / 2**30 if device.type == "cuda" else None for device in devices]


@torch.no_grad()
def run_once(model, name: str, prompt: int, new: int, devices: list[torch.device]) -> dict:
    """Prefill ``prompt`` random tokens (the same on every rank and run), decode ``new`` greedy tokens through the
    cache ``name``: timings, memory per device in ``devices`` (the first takes the input ids), cache bytes, tokens."""
    impl, make_cache = CACHES[name]
    model.set_attn_implementation(impl)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
    ids = ids.to(devices[0])
    gc.collect()
    for device in devices:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    before = allocated(devices)
    cache = make_cache(prompt, new)
    for begin in range(0, prompt, _PREFILL_CHUNK):
        logits = forward(model, ids[:, begin:begin + _PREFILL_CHUNK], cache, logits_to_keep=1).logits
    token = logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(_WARMUP):
        token = forward(model, token, cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
    tokens, step_ms = [], []
    for _ in range(new):
        synchronize(devices)
        start = time.perf_counter()
        token = forward(model, token, cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
        synchronize(devices)
        step_ms.append(1e3 * (time.perf_counter() - start))
        tokens.append(int(token))  # the step is over (synchronised): no extra wait
    peaks = allocated(devices, peak=True)
    result = {
        "cache": name, "prompt": prompt, "new_tokens": new, "median_step_ms": statistics.median(step_ms),
        "devices": [str(device) for device in devices], "peak_gib": peaks,
        "peak_above_weights_gib": [None if p is None else p - b for p, b in zip(peaks, before)],
        "cache_gib": cache_bytes(cache) / 2**30, "tokens": tokens,
    }
    del cache, logits
    return result


def agreement(tokens: list[int], reference: list[int]) -> dict:
    same = [a == b for a, b in zip(tokens, reference, strict=True)]
    return {"match_rate": sum(same) / len(same), "first_divergence": same.index(False) if not all(same) else len(same)}


def add_agreement(rows: list[dict]) -> None:
    """Each row's greedy agreement with the bf16 row of the same prompt."""
    baseline = {row["prompt"]: row["tokens"] for row in rows if row["cache"] == "bf16"}
    for row in rows:
        if row["prompt"] in baseline and row["cache"] != "bf16":
            row["agreement_with_bf16"] = agreement(row["tokens"], baseline[row["prompt"]])


def one_gpu_reference(model, prompts: list[int], new: int, device: torch.device) -> dict[int, list[int]]:
    """tq4 tokens of the whole model on one device, per prompt."""
    return {prompt: run_once(model, "tq4", prompt, new, [device])["tokens"] for prompt in prompts}


def compare_to_reference(rows: list[dict], reference: dict[int, list[int]]) -> None:
    for row in rows:
        if row["cache"] == "tq4" and row["prompt"] in reference:
            row["same_tokens_as_one_gpu"] = row["tokens"] == reference[row["prompt"]]
            row["agreement_with_one_gpu"] = agreement(row["tokens"], reference[row["prompt"]])


def report(rows: list[dict], machine: dict, out: str | None) -> None:
    print("\n| mode | cache | prompt | median ms/step | peak GiB per GPU | above weights GiB | cache GiB | agreement "
          "with bf16 | tokens = one GPU |")
    print("|---|---|---|---|---|---|---|---|---|")
    gib = lambda values: " / ".join("-" if v is None else f"{v:.2f}" for v in values)  # noqa: E731
    for row in rows:
        agreed = row.get("agreement_with_bf16")
        agreed = "-" if agreed is None else f"{agreed['match_rate']:.3f} (first diff {agreed['first_divergence']})"
        print(f"| {machine['mode']} | {row['cache']} | {row['prompt']} | {row['median_step_ms']:.2f} | "
              f"{gib(row['peak_gib'])} | {gib(row['peak_above_weights_gib'])} | {row['cache_gib']:.3f} | {agreed} | "
              f"{row.get('same_tokens_as_one_gpu', '-')} |")
    if out:
        Path(out).write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))


def machine_info(args, mode: str) -> dict:
    cuda = torch.cuda.is_available()
    return {"mode": mode, "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda
            else [], "torch": torch.__version__, "transformers": transformers.__version__,
            "turboquant_hf": turboquant_hf.__version__, "python": platform.python_version(),
            "command": " ".join(sys.argv)}


def run_device_map(args) -> None:
    devices = [torch.device("cpu")] * 2 if args.smoke else [torch.device("cuda", 0), torch.device("cuda", 1)]
    model = build_model(args.layers, str(devices[0]), smoke_config() if args.smoke else None)
    reference = one_gpu_reference(model, args.prompt, args.new, devices[0]) if args.one_gpu_reference else {}
    from accelerate import dispatch_model

    layers = model.config.num_hidden_layers
    model = dispatch_model(model, device_map=two_way_device_map(layers, [str(device) for device in devices]))
    machine = machine_info(args, "device_map")
    print(json.dumps(machine), flush=True)
    rows = []
    for prompt in args.prompt:
        for name in args.caches:
            rows.append(run_once(model, name, prompt, args.new, devices))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "tokens"}), flush=True)
    add_agreement(rows)
    compare_to_reference(rows, reference)
    report(rows, machine, args.out)


def run_tensor_parallel(args) -> None:
    import torch.distributed as dist

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if args.smoke:
        device, backend = torch.device("cpu"), "gloo"
    else:
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    dist.init_process_group(backend)  # transformers uses the group it finds
    # One folder per shape: a checkpoint of another --layers must not be reused under this run's label.
    checkpoint = Path(args.checkpoint or ("/tmp/bench-multi-gpu-smoke" if args.smoke
                                          else f"/tmp/bench-multi-gpu-8b-{args.layers}-layers"))
    if rank == 0 and not (checkpoint / "config.json").is_file():
        config = smoke_config() if args.smoke else llama_8b_config(args.layers)
        build_model(args.layers, str(device), config).save_pretrained(checkpoint)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    dist.barrier()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=torch.bfloat16, **({"distributed_config": transformers.DistributedConfig(tp_plan="auto")}
                                             if hasattr(transformers, "DistributedConfig") else {"tp_plan": "auto"}))
    model.eval()
    machine = {**machine_info(args, f"tp{world_size}"), "rank_device": str(device), "backend": backend}
    rows = []
    for prompt in args.prompt:
        for name in args.caches:
            rows.append(run_once(model, name, prompt, args.new, [device]))
    every_rank = [None] * world_size
    dist.all_gather_object(every_rank, rows)
    del model
    gc.collect()
    if rank == 0:
        # One row per run: rank 0's timing and tokens, the peaks of every rank (one GPU each), the tokens checked equal.
        for index, row in enumerate(rows):
            others = [rank_rows[index] for rank_rows in every_rank]
            row["devices"] = [device for other in others for device in other["devices"]]
            row["peak_gib"] = [peak for other in others for peak in other["peak_gib"]]
            row["peak_above_weights_gib"] = [peak for other in others for peak in other["peak_above_weights_gib"]]
            row["same_tokens_on_every_rank"] = all(other["tokens"] == row["tokens"] for other in others)
        add_agreement(rows)
        if args.one_gpu_reference:
            whole = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).to(device)
            compare_to_reference(rows, one_gpu_reference(whole.eval(), args.prompt, args.new, device))
            del whole
        print(json.dumps(machine), flush=True)
        for row in rows:
            print(json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)
        report(rows, machine, args.out)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", action="store_true", help="tensor parallel (run under torchrun --nproc-per-node 2)")
    parser.add_argument("--prompt", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--new", type=int, default=64, help="timed greedy steps (and tokens compared)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--caches", nargs="+", default=list(CACHES), choices=list(CACHES))
    parser.add_argument("--one-gpu-reference", action="store_true",
                        help="also run tq4 on the whole model on one GPU and compare the tokens")
    parser.add_argument("--checkpoint", default=None, help="--tp: where the random model is saved once "
                        "(default /tmp/bench-multi-gpu-8b-<layers>-layers, ~16 GB at 32 layers)")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny model on the CPU (gloo under --tp), prompts of 256 and 512, 8 steps")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.smoke:
        args.prompt, args.new = [256, 512], 8
    elif not torch.cuda.is_available() or torch.cuda.device_count() < (1 if args.tp else 2):
        sys.exit("bench_multi_gpu.py needs two CUDA GPUs (--smoke runs on the CPU)")
    if args.tp and "RANK" not in os.environ:
        sys.exit("--tp runs under torchrun: torchrun --nproc-per-node 2 benchmarks/bench_multi_gpu.py --tp ...")
    run_tensor_parallel(args) if args.tp else run_device_map(args)


if __name__ == "__main__":
    main()
