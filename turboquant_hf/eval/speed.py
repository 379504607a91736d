"""Prefill and decode throughput through a cache, and the memory it takes.

Prefill: one forward of the prompt into an empty cache. Decode: ``new_tokens`` greedy steps of one
token each (compressing and reading the cache every step). On CUDA the peak of
``torch.cuda.max_memory_allocated`` over the run (weights included) is reported, on every device the
bytes the cache holds at the end.
"""

from __future__ import annotations

import time

import torch

from .footprint import bytes_per_token
from .loading import forward


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure(model, prompt_ids: torch.Tensor, cache, new_tokens: int) -> dict:
    """prompt_ids: (batch, prompt_len) long on the model's device -> timings and memory."""
    device = prompt_ids.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    logits = forward(model, prompt_ids, cache, logits_to_keep=1).logits[:, -1]
    _sync(device)
    prefill_seconds = time.perf_counter() - start
    next_ids = logits.argmax(-1)[:, None]
    start = time.perf_counter()
    for _ in range(new_tokens):
        next_ids = forward(model, next_ids, cache).logits[:, -1].argmax(-1)[:, None]
    _sync(device)
    decode_seconds = time.perf_counter() - start
    batch, prompt_len = prompt_ids.shape
    result = {
        "prefill_tokens_per_s": batch * prompt_len / prefill_seconds,
        "decode_tokens_per_s": batch * new_tokens / decode_seconds,
        "prefill_seconds": prefill_seconds,
        "decode_seconds": decode_seconds,
        "max_memory_allocated": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        **bytes_per_token(cache, model.config, batch),
    }
    return result
