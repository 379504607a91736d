"""Generation modes through TurboQuantCache on a tiny random Llama (CPU, no downloads).

tests/test_cache.py already covers: greedy == DynamicCache when the residual window covers everything, beam
search and num_return_sequences, assisted decoding with an identical assistant (every draft accepted), a
left-padded batch, and a second generate call continuing the cache. This file adds what those leave open:

- seeded sampling: the same tokens as DynamicCache when the window covers everything;
- return_dict_in_generate=True hands back our cache object (``cache=`` and ``past_key_values=``);
- assisted and prompt-lookup decoding whose drafts get rejected, so ``crop`` removes compressed tokens;
- a three-turn chat reusing one compressed cache, and two generate calls == one long call;
- beam search over compressed storage: each beam's score matches its tokens' log-probabilities;
- a left-padded batch with everything compressed at 8 bits keeps DynamicCache's tokens.

"8 bits, everything compressed" (residual_length=0) is the lossy setting that must keep greedy tokens: its
relative K/V error D_8 ~ 4e-5 moves these logits by ~1e-3 at a logit std of ~0.2.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from turboquant_hf import TurboQuantCache, TurboQuantLayer

pytestmark = [pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning"),
              pytest.mark.usefixtures("one_cpu_thread")]  # tests/conftest.py

VOCAB = 256
NEW_TOKENS = 8
COVERS_EVERYTHING = 256


def tiny_llama(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, bos_token_id=1, eos_token_id=None, pad_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


# transformers >= 5.23 names generate's cache argument `cache` (and its output field); 5.17 knows only
# `past_key_values`.
CACHE_KEYWORDS = ["cache", "past_key_values"] if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters \
    else ["past_key_values"]




@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(1, VOCAB, (1, 20), generator=torch.Generator().manual_seed(1))


def generate(model, input_ids: torch.Tensor, cache, max_new_tokens: int = NEW_TOKENS, **kwargs) -> torch.Tensor:
    kwargs.setdefault("do_sample", False)
    return model.generate(input_ids, past_key_values=cache, max_new_tokens=max_new_tokens, **kwargs)


def compressed_lengths(cache: TurboQuantCache) -> list[int]:
    return [layer.storage.length for layer in cache.layers if isinstance(layer, TurboQuantLayer)]


# ------------------------------------------------------------------------------------------ sampling
def test_seeded_sampling_equals_dynamic_cache(llama, prompt):
    def sample(cache) -> torch.Tensor:
        torch.manual_seed(5)
        return generate(llama, prompt, cache, do_sample=True, top_k=0, temperature=1.0, num_return_sequences=2)

    expected = sample(DynamicCache())
    assert not torch.equal(expected[0], expected[1])  # the two samples differ: the seed, not argmax, decides
    assert torch.equal(sample(TurboQuantCache(residual_length=COVERS_EVERYTHING)), expected)

    compressed = TurboQuantCache(bits=4, residual_length=0)
    sequences = sample(compressed)
    assert sequences.shape == expected.shape
    assert compressed_lengths(compressed) == [20 + NEW_TOKENS - 1] * 2


# ------------------------------------------------------------------------------------ returned cache
@pytest.mark.parametrize("keyword", CACHE_KEYWORDS)
def test_return_dict_in_generate_returns_our_cache(llama, prompt, keyword):
    cache = TurboQuantCache(bits=4, residual_length=4)
    output = llama.generate(prompt, **{keyword: cache}, max_new_tokens=NEW_TOKENS, do_sample=False,
                            return_dict_in_generate=True)
    returned = output["cache"] if "cache" in output.keys() else output["past_key_values"]
    assert returned is cache
    assert cache.get_seq_length() == 20 + NEW_TOKENS - 1
    assert all(length > 0 for length in compressed_lengths(cache))


# ----------------------------------------------------------------------------- assisted decoding
@pytest.mark.parametrize("drafts", ["assistant_model", "prompt_lookup"])
def test_rejected_drafts_crop_compressed_tokens(llama, prompt, drafts, monkeypatch):
    """A 1-layer assistant of other weights (or n-gram lookup in the prompt) drafts tokens the model mostly
    rejects; each rejection crops the cache, here into compressed storage (residual_length=0). The accepted
    tokens are the model's greedy ones, so the output is DynamicCache's greedy output."""
    draft_kwargs = {"assistant_model": tiny_llama(seed=1, layers=1)} if drafts == "assistant_model" \
        else {"prompt_lookup_num_tokens": 3}
    # Repeat a stretch of the prompt so prompt lookup finds n-grams to draft from.
    input_ids = torch.cat([prompt, prompt[:, :6]], dim=-1)
    expected = generate(llama, input_ids, DynamicCache(), max_new_tokens=12)

    crops = []
    crop = TurboQuantLayer.crop

    def recording_crop(layer, tokens_to_remove):
        before = layer.storage.length
        crop(layer, tokens_to_remove)
        crops.append(before - layer.storage.length)

    monkeypatch.setattr(TurboQuantLayer, "crop", recording_crop)
    cache = TurboQuantCache(bits=8, residual_length=0)
    sequences = generate(llama, input_ids, cache, max_new_tokens=12, **draft_kwargs)

    assert torch.equal(sequences, expected)
    assert any(removed > 0 for removed in crops), crops
    assert cache.get_seq_length() == input_ids.shape[-1] + 12 - 1


# --------------------------------------------------------------------------------- reusing a cache
def test_three_turn_chat_reuses_one_compressed_cache(llama, prompt):
    """Each turn appends a user message to the whole conversation so far and generates from the same cache."""
    user_turns = torch.randint(1, VOCAB, (2, 1, 5), generator=torch.Generator().manual_seed(4))

    def chat(cache) -> tuple[torch.Tensor, list[int]]:
        conversation, cached = prompt, []
        for turn in range(3):
            if turn:
                conversation = torch.cat([conversation, user_turns[turn - 1]], dim=-1)
            conversation = generate(llama, conversation, cache, max_new_tokens=4)
            cached.append(cache.get_seq_length())
        return conversation, cached

    expected, expected_cached = chat(DynamicCache())
    conversation, cached = chat(TurboQuantCache(residual_length=COVERS_EVERYTHING))
    assert torch.equal(conversation, expected) and cached == expected_cached

    compressed = TurboQuantCache(bits=8, residual_length=0)
    conversation, cached = chat(compressed)
    assert torch.equal(conversation, expected)
    assert cached == expected_cached == [20 + 3, 20 + 4 + 5 + 3, 20 + 2 * (4 + 5) + 3]
    assert compressed_lengths(compressed) == [cached[-1]] * 2


@pytest.mark.parametrize("keyword", CACHE_KEYWORDS)
def test_two_generate_calls_equal_one_long_call(llama, prompt, keyword):
    """The second call feeds only the token the first call generated last: the cache sees the same updates as
    in one call of twice the length, so the output is bitwise the same (4 bits, window 4: flushes included)."""
    once = llama.generate(prompt, **{keyword: TurboQuantCache(bits=4, residual_length=4)},
                          max_new_tokens=2 * NEW_TOKENS, do_sample=False)
    cache = TurboQuantCache(bits=4, residual_length=4)
    first = llama.generate(prompt, **{keyword: cache}, max_new_tokens=NEW_TOKENS, do_sample=False)
    twice = llama.generate(first, **{keyword: cache}, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(twice, once)
    assert cache.get_seq_length() == 20 + 2 * NEW_TOKENS - 1


# ---------------------------------------------------------------------------- 8 bits, all compressed
def test_beam_search_reorders_compressed_storage(llama, prompt):
    """Everything compressed at 8 bits: each returned beam's score (its mean log-probability) matches the
    log-probabilities a plain forward pass gives its tokens, so every beam read its own compressed past.

    The random model's next-token distributions are near uniform, where any mix-up scores alike (and beams tie,
    so comparing tokens with DynamicCache's is meaningless); a copy with lm_head x20 is peaked: measured
    |score - recomputed| 7e-4 at 8 bits vs 0.09 with reorder_cache a no-op (DynamicCache: 7e-7)."""
    peaked = copy.deepcopy(llama)
    with torch.no_grad():
        peaked.lm_head.weight.mul_(20.0)
    cache = TurboQuantCache(bits=8, residual_length=0)
    output = peaked.generate(prompt, past_key_values=cache, max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=3,
                             num_return_sequences=3, output_scores=True, return_dict_in_generate=True)
    assert compressed_lengths(cache) == [20 + NEW_TOKENS - 1] * 2
    with torch.no_grad():
        log_probs = torch.log_softmax(peaked(output.sequences).logits[:, 19:-1], dim=-1)
    recomputed = log_probs.gather(-1, output.sequences[:, 20:, None]).squeeze(-1).mean(-1)
    torch.testing.assert_close(output.sequences_scores, recomputed, rtol=0, atol=0.03)


def test_left_padded_batch_8bit_everything_compressed_keeps_tokens(llama):
    input_ids = torch.randint(1, VOCAB, (2, 20), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, :7], attention_mask[1, :7] = 0, 0
    expected = generate(llama, input_ids, DynamicCache(), attention_mask=attention_mask)
    cache = TurboQuantCache(bits=8, residual_length=0)
    assert torch.equal(generate(llama, input_ids, cache, attention_mask=attention_mask), expected)
    assert compressed_lengths(cache) == [20 + NEW_TOKENS - 1] * 2
