"""Needle in a haystack: hide one sentence with a random number in filler text, ask for the number.

For each context length L and depth d, the filler text (repeated as needed) is cut so that the whole
prompt is about L tokens, and "The secret number is NNNNN." goes after the first sentence end at or
past d * (filler length). The question follows the haystack (in the chat template when the tokenizer
has one); the answer is decoded greedily. Score = exact match rate: the share of (length, depth)
trials whose answer contains the number (not inside a longer number). Numbers are drawn from a
seeded generator, so every cache sees the same trials.
"""

from __future__ import annotations

import dataclasses
import random
import re

import torch

from .agreement import greedy_decode

QUESTION = "What is the secret number mentioned in the text above? Answer with the number only."


@dataclasses.dataclass
class Trial:
    length: int
    depth: float
    answer: str
    prompt_ids: torch.Tensor  # (1, ~length) long


def _encode_prompt(tokenizer, haystack: str) -> torch.Tensor:
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": f"{haystack}\n\n{QUESTION}"}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    else:
        ids = tokenizer(f"{haystack}\n\nQuestion: {QUESTION}\nAnswer:")["input_ids"]
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)


def _sentence_end(filler_ids: list[int], start: int, tokenizer, search: int = 64) -> int:
    """The first index >= start just after a token that ends a sentence, or ``start`` if none is near."""
    for index in range(start, min(start + search, len(filler_ids))):
        if tokenizer.decode([filler_ids[index]]).rstrip().endswith((".", "!", "?")):
            return index + 1
    return start


def build_trials(tokenizer, filler_text: str, lengths: list[int], depths: list[float], seed: int = 0) -> list[Trial]:
    rng = random.Random(seed)
    filler_ids = tokenizer(filler_text, add_special_tokens=False)["input_ids"]
    overhead = _encode_prompt(tokenizer, "The secret number is 00000.").shape[1]
    trials = []
    for length in lengths:
        budget = length - overhead
        if budget < 16:
            raise ValueError(f"context length {length} leaves no room for filler (prompt overhead {overhead} tokens)")
        repeated = (filler_ids * (budget // len(filler_ids) + 1))[:budget]
        for depth in depths:
            answer = str(rng.randrange(10000, 100000))
            cut = _sentence_end(repeated, int(depth * budget), tokenizer) if depth > 0 else 0
            haystack = " ".join(part for part in (
                tokenizer.decode(repeated[:cut]).strip(),
                f"The secret number is {answer}.",
                tokenizer.decode(repeated[cut:]).strip(),
            ) if part)
            trials.append(Trial(length, depth, answer, _encode_prompt(tokenizer, haystack)))
    return trials


def run_trial(model, tokenizer, trial: Trial, cache, new_tokens: int, device: torch.device) -> dict:
    generated = greedy_decode(model, trial.prompt_ids.to(device), cache, new_tokens)[0]
    text = tokenizer.decode(generated, skip_special_tokens=True)
    hit = re.search(rf"(?<!\d){trial.answer}(?!\d)", text) is not None
    return {"length": trial.length, "prompt_tokens": trial.prompt_ids.shape[1], "depth": trial.depth,
            "answer": trial.answer, "output": text, "hit": hit}
