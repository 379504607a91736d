"""Greedy agreement: does a cache make the model write the same tokens as DynamicCache?

Prompts are windows of a text (same length, so they run as one batch without padding). The prompt
forward runs once (``prefill``) and its K/V are replayed into each cache (``replay``). Each prompt is
decoded greedily for a fixed number of tokens (no stop at EOS, so every run has the same length).
Per prompt: the first position where the tokens differ from DynamicCache's (``new_tokens`` if none)
and the match rate, the share of positions with the same token. After the first divergence the two
continuations have different prefixes, so the first divergence is the stricter figure.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .loading import forward


@torch.inference_mode()
def greedy_decode(model, prompt_ids: torch.Tensor, cache, new_tokens: int) -> torch.Tensor:
    """prompt_ids: (batch, prompt_len) long -> (batch, new_tokens) long, greedy, through ``cache``."""
    first_tokens = forward(model, prompt_ids, cache, logits_to_keep=1).logits[:, -1].argmax(-1)
    return greedy_continue(model, first_tokens, cache, new_tokens)


@torch.inference_mode()
def greedy_continue(model, first_tokens: torch.Tensor, cache, new_tokens: int) -> torch.Tensor:
    """first_tokens: (batch,) long, the prompt already in ``cache`` -> (batch, new_tokens) long."""
    generated = [first_tokens]
    for _ in range(new_tokens - 1):
        logits = forward(model, generated[-1][:, None], cache).logits[:, -1]
        generated.append(logits.argmax(-1))
    return torch.stack(generated, dim=1)


@torch.inference_mode()
def prefill(model, prompt_ids: torch.Tensor) -> tuple[torch.Tensor, DynamicCache]:
    """One prompt forward for every cache: (first greedy tokens (batch,) long, the prompt's DynamicCache).

    The prompt call's outputs do not depend on the cache (every cache here returns the new states
    exactly on its first update), so one forward serves all caches; ``replay`` then fills each cache.
    """
    prompt_cache = DynamicCache(config=model.config)
    first_tokens = forward(model, prompt_ids, prompt_cache, logits_to_keep=1).logits[:, -1].argmax(-1)
    return first_tokens, prompt_cache


class NotReplayable(ValueError):
    """The prompt cache does not hold every prompt token in every layer (sliding windows)."""


def replay(prompt_cache: DynamicCache, cache, prompt_length: int):
    """Give ``cache`` each layer's prompt K/V in one ``update`` per layer, exactly as the prompt forward
    would (a layer's prompt K/V depend only on the prompt). Returns ``cache``.

    NotReplayable if a layer of ``prompt_cache`` does not hold the whole prompt (a sliding window).
    """
    for index, layer in enumerate(prompt_cache.layers):
        if type(layer) is not DynamicLayer or layer.keys.shape[-2] != prompt_length:
            raise NotReplayable(f"layer {index} ({type(layer).__name__}) does not hold the whole prompt; prefill "
                             "through each cache instead")
        cache.update(layer.keys.clone(), layer.values.clone(), index)
    return cache


def prompt_windows(token_ids: torch.Tensor, prompts: int, prompt_tokens: int) -> torch.Tensor:
    """token_ids: (n,) long -> (prompts, prompt_tokens) long, windows spread evenly over the text."""
    tokens = token_ids.numel()
    if tokens < prompt_tokens:
        raise ValueError(f"the text has {tokens} tokens, fewer than prompt_tokens={prompt_tokens}")
    last_start = tokens - prompt_tokens
    starts = [round(i * last_start / max(prompts - 1, 1)) for i in range(prompts)]
    return torch.stack([token_ids[s:s + prompt_tokens] for s in starts])


def compare(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    """reference, candidate: (batch, new_tokens) long -> per-prompt and mean agreement figures."""
    same = reference == candidate
    new_tokens = same.shape[1]
    first_divergence = [int(row.logical_not().nonzero()[0]) if not bool(row.all()) else new_tokens for row in same]
    match_rates = same.double().mean(dim=1).tolist()
    return {
        "match_rate": sum(match_rates) / len(match_rates),
        "first_divergence_mean": sum(first_divergence) / len(first_divergence),
        "identical": sum(d == new_tokens for d in first_divergence),
        "per_prompt": [{"first_divergence": d, "match_rate": m} for d, m in zip(first_divergence, match_rates)],
    }
