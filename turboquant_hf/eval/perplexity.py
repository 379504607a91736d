"""Teacher-forced perplexity THROUGH a cache.

A plain forward over the whole text never reads a cache, so it cannot see what a cache does. Here the
first ``prefill`` tokens go in as one call that fills the cache; the rest go in chunks of ``chunk``
tokens, each attending to the cached (compressed) past. Scored are the tokens ``prefill + 1 .. n - 1``:
each is predicted by a query of a chunk call, never by the prefill call (whose queries attend to their
own uncompressed states in every cache). Within a chunk, the chunk's own states are exact in every
cache here, so a smaller ``chunk`` measures the compression of a larger share of the attention.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .loading import forward

# DynamicCache chunked and one full forward differ only by summation order; float32 keeps that under
# 1e-4 relative in perplexity, 16-bit activations do not.
SANITY_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4, torch.bfloat16: 1e-2, torch.float16: 5e-3}


def check_lengths(tokens: int, prefill: int, chunk: int) -> None:
    if prefill < 1 or chunk < 1:
        raise ValueError(f"prefill and chunk must be >= 1, got prefill={prefill}, chunk={chunk}")
    if tokens < prefill + 2:
        raise ValueError(f"the text has {tokens} tokens; prefill={prefill} needs at least {prefill + 2}")


@torch.inference_mode()
def nlls_through_cache(model, input_ids: torch.Tensor, cache, prefill: int, chunk: int,
                       progress: bool = True, observe: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """input_ids: (1, n) long -> (n - prefill - 1,) float32 NLLs of tokens prefill+1 .. n-1.

    The cache is filled in place and holds n - 1 tokens afterwards. ``observe``, if given, is called with
    each chunk's logits, (chunk positions, vocab) float32, in order: e.g. a ``divergence.DenseDistributions``
    or ``divergence.Divergence``, which read the whole next-token distribution, not only the NLL.
    """
    tokens = input_ids.shape[1]
    check_lengths(tokens, prefill, chunk)
    forward(model, input_ids[:, :prefill], cache, logits_to_keep=1)
    nlls = []
    starts = range(prefill, tokens - 1, chunk)
    for start in tqdm(starts, desc="chunks", leave=False, disable=not progress):
        stop = min(start + chunk, tokens - 1)
        logits = forward(model, input_ids[:, start:stop], cache).logits[0].float()
        if observe is not None:
            observe(logits)
        nlls.append(F.cross_entropy(logits, input_ids[0, start + 1:stop + 1], reduction="none"))
    return torch.cat(nlls).cpu()


@torch.inference_mode()
def nlls_full_forward(model, input_ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """The same NLLs as ``nlls_through_cache`` from one forward with no cache: (n - prefill - 1,) float32."""
    tokens = input_ids.shape[1]
    check_lengths(tokens, prefill, 1)
    logits = model(input_ids, use_cache=False, logits_to_keep=tokens - prefill).logits[0, :-1].float()
    return F.cross_entropy(logits, input_ids[0, prefill + 1:], reduction="none").cpu()


def perplexity(nlls: torch.Tensor) -> float:
    return math.exp(nlls.double().mean().item())


@dataclasses.dataclass
class Delta:
    """Perplexity change of ``nlls`` vs ``reference_nlls`` on the same tokens, in percent.

    ``ci95``: a normal 95% interval from the per-token NLL differences. Neighbouring tokens are
    correlated, so read it as a guide to which differences are noise, not as an exact interval.
    """

    percent: float
    ci95: tuple[float, float]

    @classmethod
    def between(cls, nlls: torch.Tensor, reference_nlls: torch.Tensor) -> "Delta":
        diff = (nlls.double() - reference_nlls.double())
        mean = diff.mean().item()
        half = 1.96 * diff.std().item() / math.sqrt(diff.numel()) if diff.numel() > 1 else 0.0
        to_percent = lambda x: (math.exp(x) - 1) * 100  # noqa: E731
        return cls(to_percent(mean), (to_percent(mean - half), to_percent(mean + half)))


def sanity_check(model, input_ids: torch.Tensor, dynamic_nlls: torch.Tensor, prefill: int) -> dict:
    """DynamicCache chunked must equal one full forward: relative perplexity difference <= tolerance."""
    full = perplexity(nlls_full_forward(model, input_ids, prefill))
    chunked = perplexity(dynamic_nlls)
    relative = abs(chunked - full) / full
    tolerance = SANITY_TOLERANCE.get(model.dtype, 1e-4)
    return {"name": "dynamic chunked == full forward", "full_forward_ppl": full, "dynamic_chunked_ppl": chunked,
            "relative_difference": relative, "tolerance": tolerance, "passed": relative <= tolerance}

