"""A question about a long document, answered by SmolLM2-135M-Instruct with and without TurboQuantCache.

The document is the essay shipped with the evaluation texts
(``turboquant_hf/eval/texts/prose_harbour_almanac.txt``), cut at a paragraph boundary to at most
``--doc-tokens`` tokens; the question asks about its first paragraph, the farthest text from the
question. Offline, CPU: about 2 minutes on 2 cores at the default 2048 tokens.

    python examples/long_context.py [--bits 4] [--doc-tokens 2048] [--max-new-tokens 32]

Printed for each cache: the answer, the prefill time (the prompt's forward pass, which fills the
cache), the decode speed after it, and the bytes the cache holds at the end. On CPU the compressed
cache buys memory (it is several times smaller), not speed; speed gains are on GPU, with
``attn_implementation="turboquant"``.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never reach for the hub

import torch  # noqa: E402
from transformers import DynamicCache, StoppingCriteria  # noqa: E402

from turboquant_hf import TurboQuantCache  # noqa: E402
from turboquant_hf.eval.loading import cache_kwarg, prose_document  # noqa: E402
from turboquant_hf.testing import load_smollm2  # noqa: E402

QUESTION = "Who kept the light on Gannet Point, and for how many years?"


class TokenClock(StoppingCriteria):
    """Never stops generation; records when each new token is ready (the first one ends the prefill)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def answer(model, tokenizer, inputs, cache, max_new_tokens: int) -> dict:
    clock = TokenClock()
    start = time.perf_counter()
    # cache_kwarg: "cache" on transformers >= 5.23, "past_key_values" before.
    output = model.generate(**inputs, **{cache_kwarg(model): cache}, max_new_tokens=max_new_tokens, do_sample=False,
                            stopping_criteria=[clock])
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    prefill = clock.times[0] - start
    decode = (len(clock.times) - 1) / (clock.times[-1] - clock.times[0]) if len(clock.times) > 1 else float("nan")
    return {"answer": tokenizer.decode(new_tokens, skip_special_tokens=True).strip(),
            "prefill_s": prefill, "decode_tokens_per_s": decode}


def held_bytes(cache) -> int:
    """Bytes of the tensors a cache holds: TurboQuant's own report, or a DynamicCache's keys and values."""
    if isinstance(cache, TurboQuantCache):
        return cache.memory_report()["compressed_bytes"]
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--doc-tokens", type=int, default=2048, help="document length cap, in tokens")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    model, tokenizer = load_smollm2()
    document = prose_document(tokenizer, args.doc_tokens)
    messages = [{"role": "user", "content": f"{document}\n\nQuestion: {QUESTION}"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    print(f"prompt: {inputs['input_ids'].shape[1]} tokens; question: {QUESTION}\n")

    results = {}
    for name, cache in (("DynamicCache (fp32)", DynamicCache(config=model.config)),
                        (f"TurboQuantCache({args.bits}-bit)", TurboQuantCache(bits=args.bits, config=model.config))):
        result = answer(model, tokenizer, inputs, cache, args.max_new_tokens)
        result["cache_bytes"] = held_bytes(cache)
        result["cached_tokens"] = cache.get_seq_length()
        results[name] = result
        print(f"{name}: prefill {result['prefill_s']:.1f} s, decode {result['decode_tokens_per_s']:.1f} tokens/s, "
              f"cache {result['cache_bytes'] / 2**20:.2f} MiB for {result['cached_tokens']} tokens")
        print(f"  {result['answer']}\n")

    dense, compressed = results.values()
    ratio = dense["cache_bytes"] / compressed["cache_bytes"]
    saved = f"{(dense['cache_bytes'] - compressed['cache_bytes']) / 2**20:.2f} MiB saved"
    print(f"On CPU, TurboQuant buys memory: the cache is {ratio:.2f}x smaller ({saved}). It is not faster here "
          '(it dequantizes the past at every step); speed gains are on GPU, with attn_implementation="turboquant".')
    return {"prompt_tokens": inputs["input_ids"].shape[1], "results": results}


if __name__ == "__main__":
    main()
