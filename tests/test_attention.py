"""attn_implementation="turboquant": same results as the default (dequantize + SDPA) path."""

import threading

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from turboquant_hf import TurboQuantCache
from turboquant_hf.attention import MAX_FUSED_QUERIES, dense_attention
from turboquant_hf.eval.loading import forward


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return LlamaForCausalLM(config).eval()


def tiny_gemma2():
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=16,
                          attn_logit_softcapping=30.0, final_logit_softcapping=20.0, max_position_embeddings=1024)
    return Gemma2ForCausalLM(config).eval()


def run(model, impl, ids, cache, **kwargs):
    model.set_attn_implementation(impl)
    out = model.generate(ids, max_new_tokens=10, do_sample=False, past_key_values=cache, pad_token_id=0,
                         output_scores=True, return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gemma2])
@pytest.mark.parametrize("residual_length", [0, 8])
def test_fused_path_matches_default_path(builder, residual_length):
    model = builder()
    ids = torch.randint(1, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    make = lambda: TurboQuantCache(bits=3, residual_length=residual_length, config=model.config)  # noqa: E731
    default_tokens, default_scores = run(model, "sdpa" if builder is tiny_llama else "eager", ids, make())
    fused_cache = make()
    fused_tokens, fused_scores = run(model, "turboquant", ids, fused_cache)
    assert torch.equal(fused_tokens, default_tokens)
    torch.testing.assert_close(fused_scores, default_scores, rtol=1e-4, atol=1e-4)
    assert any(getattr(layer, "serves_packed", False) for layer in fused_cache.layers)


def test_fused_update_returns_no_dense_past():
    model = tiny_llama()
    cache = TurboQuantCache(bits=4, residual_length=4)
    run(model, "turboquant", torch.randint(1, 128, (1, 30)), cache)
    layer = cache.layers[0]
    window, past = layer.storage.window_length, layer.storage.length
    attention_kwargs = {}  # what the model hands to update (transformers >= 5.23)
    keys, _ = layer.update(torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32), kwargs=attention_kwargs)
    handed = attention_kwargs["turboquant_past"]
    # the sinks, the window and the new token only; the rest is read packed
    assert layer.serves_packed and handed.sink_length == 4 and keys.shape[2] == handed.sink_length + window + 1
    assert attention_kwargs["turboquant_layer"] is layer
    assert handed.length + handed.sink_length == past
    keys, _ = layer.update(torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32))  # no kwargs: full dense states
    assert keys.shape[2] == layer.get_seq_length()


def decode_logits(model, cache, ids, implementations):
    """Prefill ids[:, :-n] then feed the last n tokens one by one (n = len(implementations) - 1), switching the
    model's attention implementation before each call; the stacked logits of every call's last position."""
    prompt, steps = ids[:, : ids.shape[1] - len(implementations) + 1], ids[:, ids.shape[1] - len(implementations) + 1:]
    logits = []
    for index, implementation in enumerate(implementations):
        model.set_attn_implementation(implementation)
        chunk = prompt if index == 0 else steps[:, index - 1:index]
        with torch.no_grad():
            logits.append(forward(model, chunk, cache).logits[:, -1])
    return torch.stack(logits)


SWITCHES = ["turboquant", "turboquant", "turboquant", "sdpa", "sdpa", "turboquant", "sdpa", "turboquant"]


@pytest.mark.parametrize("residual_length", [0, 4])
def test_switching_implementations_mid_generation_gives_clean_logits(residual_length):
    """The same live cache read by "turboquant", then "sdpa", then back: every step's logits are those of a clean
    run with one implementation throughout (the old hand-off gave sdpa one token of 33 after a fused step)."""
    model = tiny_llama()
    ids = torch.randint(1, 128, (2, 40), generator=torch.Generator().manual_seed(5))
    clean = decode_logits(model, TurboQuantCache(bits=4, residual_length=residual_length), ids, ["sdpa"] * 8)
    switched_cache = TurboQuantCache(bits=4, residual_length=residual_length)
    switched = decode_logits(model, switched_cache, ids, SWITCHES)
    torch.testing.assert_close(switched, clean, rtol=1e-4, atol=1e-4)
    assert switched_cache.layers[0].serves_packed  # the last step read the past packed


def test_reset_after_a_fused_run_answers_like_a_new_cache():
    model = tiny_llama()
    ids = torch.randint(1, 128, (2, 40), generator=torch.Generator().manual_seed(6))
    cache = TurboQuantCache(bits=4, residual_length=0)
    decode_logits(model, cache, ids, ["turboquant"] * 6)
    cache.reset()
    assert not cache.layers[0].serves_packed
    again = decode_logits(model, cache, ids, ["sdpa"] * 6)
    clean = decode_logits(model, TurboQuantCache(bits=4, residual_length=0), ids, ["sdpa"] * 6)
    torch.testing.assert_close(again, clean, rtol=1e-4, atol=1e-4)


def test_two_caches_driven_from_two_threads_give_clean_logits():
    """Two generations served concurrently, their steps interleaved by a barrier, one reading packed and one dense:
    each gets the logits it gets alone."""
    model = tiny_llama()
    model.set_attn_implementation("turboquant")
    inputs = [torch.randint(1, 128, (1, 36), generator=torch.Generator().manual_seed(seed)) for seed in (7, 8)]

    def steps(ids, cache, barrier=None):
        logits = []
        for index in range(6):
            chunk = ids[:, :31] if index == 0 else ids[:, 30 + index:31 + index]
            if barrier is not None:
                barrier.wait()
            with torch.no_grad():
                logits.append(forward(model, chunk, cache).logits[:, -1])
        return torch.stack(logits)

    alone = [steps(ids, TurboQuantCache(bits=3, residual_length=2)) for ids in inputs]
    barrier, results = threading.Barrier(2), [None, None]

    def worker(index):
        results[index] = steps(inputs[index], TurboQuantCache(bits=3, residual_length=2), barrier)

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for got, expected in zip(results, alone):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_left_padding_and_chunked_prefill_over_compressed_past():
    model = tiny_llama()
    ids = torch.randint(1, 128, (2, 20), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    results = []
    for impl in ("sdpa", "turboquant"):
        model.set_attn_implementation(impl)
        cache = TurboQuantCache(bits=4, residual_length=0)
        with torch.no_grad():
            model(ids, attention_mask=mask, past_key_values=cache)
            more = torch.randint(1, 128, (2, MAX_FUSED_QUERIES + 3), generator=torch.Generator().manual_seed(4))
            long_mask = torch.cat([mask, torch.ones_like(more)], dim=-1)
            chunk = model(more, attention_mask=long_mask, past_key_values=cache).logits  # > MAX_FUSED_QUERIES
            step = model(more[:, :2], attention_mask=torch.cat([long_mask, torch.ones(2, 2, dtype=mask.dtype)], -1),
                         past_key_values=cache).logits
        results.append((chunk, step))
    for default, fused in zip(*results):
        torch.testing.assert_close(fused, default, rtol=1e-4, atol=1e-4)


def reference_attention(query, keys, values, allowed, scale, softcap):
    """float64 softmax attention with GQA by repetition; rows with nothing allowed give zeros."""
    group = query.shape[1] // keys.shape[1]
    k64, v64 = keys.double().repeat_interleave(group, 1), values.double().repeat_interleave(group, 1)
    scores = query.double() @ k64.transpose(-1, -2) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(scores, -1).nan_to_num(0.0) @ v64)


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("case", ["causal", "mask", "bidirectional"])
def test_dense_attention_matches_float64_reference(softcap, case):
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 3, 16, generator=generator)
    keys, values = torch.randn(2, 2, 7, 16, generator=generator), torch.randn(2, 2, 7, 16, generator=generator)
    causal = torch.arange(7) <= (4 + torch.arange(3))[:, None]  # queries are the last 3 of 7 positions
    if case == "mask":  # a given mask is used as is (here: causal plus padding of batch row 1)
        mask = causal.expand(2, 1, 3, 7).clone()
        mask[1, :, :, :2] = False
        allowed, out = mask, dense_attention(query, keys, values, mask, scale=0.25, softcap=softcap, causal=True)
    elif case == "causal":
        allowed, out = causal, dense_attention(query, keys, values, None, scale=0.25, softcap=softcap, causal=True)
    else:
        allowed = torch.ones(3, 7, dtype=torch.bool)
        out = dense_attention(query, keys, values, None, scale=0.25, softcap=softcap, causal=False)
    torch.testing.assert_close(out.double(), reference_attention(query, keys, values, allowed, 0.25, softcap),
                               rtol=1e-5, atol=1e-5)


def test_softcap_fully_masked_row_gives_zeros_not_nan():
    query, keys, values = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16)
    mask = torch.tensor([False, True, True]).view(1, 1, 1, 3).expand(1, 1, 3, 3).clone()
    mask[..., 0, :] = False
    out = dense_attention(query, keys, values, mask, scale=0.25, softcap=50.0, causal=True)
    assert torch.isfinite(out).all() and torch.equal(out[0, :, 0], torch.zeros(2, 16))


def test_non_causal_modules_stay_non_causal():
    """A vision tower run with attn_implementation="turboquant" keeps its bidirectional attention."""
    from turboquant_hf.attention import turboquant_attention

    module = torch.nn.Module()
    module.is_causal = False
    query, keys, values = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    out, _ = turboquant_attention(module, query, keys, values, None, scaling=0.25, is_causal=False)
    expected = torch.nn.functional.scaled_dot_product_attention(query, keys, values, scale=0.25).transpose(1, 2)
    torch.testing.assert_close(out, expected)
