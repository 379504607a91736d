"""Evaluation of KV caches: perplexity through the cache, needle retrieval, greedy agreement, speed.

Command line: ``python -m turboquant_hf.eval {ppl,needle,generate,speed,report} --help`` (also installed
as ``turboquant-eval``). The pieces are plain functions over a model, token ids and a cache:

    perplexity.nlls_through_cache   teacher-forced NLLs with the past read from the cache
    divergence.DenseDistributions   the dense next-token distributions; divergence.Divergence: KLD, top-1
    agreement.greedy_decode         greedy tokens through a cache; agreement.compare
    needle.build_trials / run_trial needle in a haystack
    speed.measure                   prefill / decode tokens/s, memory
    footprint.held_bytes            bytes a cache object holds, measured
    specs.parse_cache_spec          "tq3:residual=128" -> CacheSpec; specs.make_cache(spec, config)
"""

from .specs import CacheSpec, make_cache, parse_cache_spec, parse_cache_specs

__all__ = ["CacheSpec", "make_cache", "parse_cache_spec", "parse_cache_specs"]
