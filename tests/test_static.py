"""The static layout (TurboQuantCache(max_cache_len=...)): compiled whole, equal to its eager self and to the
dynamic layout, cache operations inside fixed buffers, clear errors (tiny random models and SmolLM2, CPU)."""

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from turboquant_hf import TurboQuantCache
from turboquant_hf.cache import StaticTurboQuantLayer
from turboquant_hf.eval.loading import cache_kwarg, forward

MAX_LEN = 64
# The dynamic layout's settings that the static layout has none of: with them off the two encode the same tokens.
STATIC_SETTINGS = dict(sink_tokens=0, center_keys=False)


def tiny_llama(dtype=torch.float32):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return LlamaForCausalLM(config).to(dtype).eval()


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def prompt(batch=2, length=30, seed=0):
    return torch.randint(1, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def decode(model, cache, ids, steps=6, step_forward=None, implementation="turboquant"):
    """Prefill ``ids`` in one eager forward, then ``steps`` greedy single-token steps through ``step_forward``
    (default: the eager forward); the last position's logits of every call, stacked."""
    model.set_attn_implementation(implementation)
    step_forward = step_forward or model.forward
    with torch.no_grad():
        logits = [forward(model, ids, cache).logits[:, -1]]
        for _ in range(steps):
            token = logits[-1].argmax(-1, keepdim=True)
            logits.append(step_forward(token, use_cache=True, **{cache_kwarg(model): cache}).logits[:, -1])
    return torch.stack(logits)


@pytest.mark.parametrize("implementation", ["turboquant", "sdpa"])
@pytest.mark.parametrize("residual_length", [0, 5])
def test_compiled_decode_is_one_graph_equal_to_eager(llama, implementation, residual_length):
    """fullgraph=True: no graph break. One compile for the whole generation (the lengths are device tensors), and
    the compiled steps' logits equal the eager static layout's."""
    make = lambda: TurboQuantCache(bits=4, residual_length=residual_length, max_cache_len=MAX_LEN)  # noqa: E731
    eager = decode(llama, make(), prompt(), implementation=implementation)
    counter = CompileCounterWithBackend("inductor")
    compiled_forward = torch.compile(llama.forward, backend=counter, fullgraph=True)
    compiled = decode(llama, make(), prompt(), step_forward=compiled_forward, implementation=implementation)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert counter.frame_count == 1


@pytest.mark.parametrize("residual_length", [0, 1000])
def test_static_equals_dynamic_layout(llama, residual_length):
    """Every token compressed, or none: the two layouts hold the same values, so the logits agree."""
    ids = prompt(seed=1)
    dynamic = decode(llama, TurboQuantCache(bits=3, residual_length=residual_length, **STATIC_SETTINGS), ids)
    static = decode(llama, TurboQuantCache(bits=3, residual_length=residual_length, max_cache_len=MAX_LEN), ids)
    torch.testing.assert_close(static, dynamic, rtol=1e-4, atol=1e-5)


def test_generate_with_beams_left_padding_and_reset_inside_fixed_buffers(llama):
    """generate on the static layout: greedy and beam search (reordered in place), a left-padded batch, then reset()
    and the same again: the buffers keep their addresses and the tokens equal the dynamic layout's."""
    ids = prompt(seed=2)
    mask = torch.ones_like(ids)
    ids[0, :7], mask[0, :7] = 0, 0
    llama.set_attn_implementation("turboquant")

    def generate(cache, **kwargs):
        return llama.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                              **{cache_kwarg(llama): cache}, **kwargs)

    for kwargs in ({}, {"num_beams": 3}):
        batch = ids.shape[0] * kwargs.get("num_beams", 1)
        static = TurboQuantCache(bits=4, residual_length=0, max_cache_len=MAX_LEN, max_batch_size=batch)
        expected = generate(TurboQuantCache(bits=4, residual_length=0, **STATIC_SETTINGS), **kwargs)
        assert torch.equal(generate(static, **kwargs), expected)
        addresses = [tensor.data_ptr() for tensor in static.layers[0].storage.tensors()]
        static.reset()
        assert static.get_seq_length() == 0
        assert torch.equal(generate(static, **kwargs), expected)
        assert [tensor.data_ptr() for tensor in static.layers[0].storage.tensors()] == addresses


def test_crop_keeps_what_the_ring_still_holds(llama):
    """Assisted decoding crops rejected tokens: the static layout gives the dynamic layout's tokens (window 4)."""
    ids = prompt(batch=1, seed=3)
    assistant = tiny_llama()
    torch.nn.init.normal_(assistant.lm_head.weight, std=0.5)  # other weights: it drafts tokens that get rejected
    llama.set_attn_implementation("sdpa")
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, assistant_model=assistant)
    expected = llama.generate(ids, **{cache_kwarg(llama): DynamicCache()}, **kwargs)
    got = llama.generate(ids, **{cache_kwarg(llama): TurboQuantCache(bits=8, residual_length=4, max_cache_len=MAX_LEN)},
                         **kwargs)
    assert torch.equal(got, expected)


def test_crop_reads_overwritten_ring_rows_from_the_slots():
    """12 tokens into a ring of 5 rows (window 4), crop 3: tokens 7 and 8 are still exact in the ring, but the rows
    of 5 and 6 now hold the cropped 10 and 11, so those two must come back from their packed slots."""
    cache = TurboQuantCache(bits=4, residual_length=4, max_cache_len=32)
    generator = torch.Generator().manual_seed(4)
    states = torch.randn(1, 1, 12, 32, generator=generator)
    cache.update(states, states, 0)
    cache.crop(-3)
    new = torch.randn(1, 1, 1, 32, generator=generator)
    keys, _ = cache.update(new, new, 0)
    assert keys.shape[2] == 10 and torch.equal(keys[:, :, 9:], new)
    assert torch.equal(keys[:, :, 7:9], states[:, :, 7:9])  # exact: from the ring
    relative = (keys[:, :, 5:7] - states[:, :, 5:7]).norm() / states[:, :, 5:7].norm()
    assert relative < 0.2  # 4-bit reconstructions of tokens 5 and 6, not the ring's copies of 10 and 11


def test_smollm2_compiled_greedy_tokens_equal_eager():
    """32 greedy tokens of SmolLM2-135M with the compiled static layout are the eager static layout's."""
    testing = pytest.importorskip("turboquant_hf.testing")
    try:
        model, tokenizer = testing.load_smollm2(torch.float32)
    except FileNotFoundError as error:
        pytest.skip(str(error))
    ids = tokenizer("The harbour master counted the boats twice, because", return_tensors="pt").input_ids
    make = lambda: TurboQuantCache(bits=4, max_cache_len=ids.shape[1] + 40)  # noqa: E731
    eager = decode(model, make(), ids, steps=32)
    compiled = decode(model, make(), ids, steps=32, step_forward=torch.compile(model.forward, fullgraph=True))
    assert torch.equal(compiled.argmax(-1), eager.argmax(-1))
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ errors
def test_prompt_longer_than_max_cache_len_is_refused_and_nothing_is_lost(llama):
    cache = TurboQuantCache(bits=4, max_cache_len=40)
    forward(llama, prompt(length=30), cache)
    with pytest.raises(ValueError, match="30 cached \\+ 20 new tokens exceed this TurboQuantCache's max_cache_len=40"):
        forward(llama, prompt(length=20), cache)
    assert cache.get_seq_length() == 30
    reference = TurboQuantCache(bits=4, max_cache_len=40)
    forward(llama, prompt(length=30), reference)
    torch.testing.assert_close(forward(llama, prompt(length=5, seed=9), cache).logits,
                               forward(llama, prompt(length=5, seed=9), reference).logits)


def test_batch_and_dtype_limits():
    layer_batch = TurboQuantCache(bits=4, max_cache_len=16, max_batch_size=2)
    states = torch.randn(3, 2, 4, 32)
    with pytest.raises(ValueError, match="batch size 3 exceeds this TurboQuantCache's max_batch_size=2"):
        layer_batch.update(states, states, 0)
    cache = TurboQuantCache(bits=4, max_cache_len=16)
    cache.update(states, states, 0)
    with pytest.raises(ValueError, match="this static layer holds torch.float32"):
        cache.update(states[:, :, :1].half(), states[:, :, :1].half(), 0)
    assert isinstance(cache.layers[0], StaticTurboQuantLayer) and cache.get_seq_length() == 4


@pytest.mark.parametrize("kwargs, error, match", [
    ({"max_cache_len": 0}, ValueError, "max_cache_len must be an int >= 1"),
    ({"max_cache_len": 8.5}, TypeError, "max_cache_len must be an int"),
    ({"max_batch_size": 2}, ValueError, "max_batch_size goes with max_cache_len"),
    ({"max_cache_len": 8, "max_batch_size": 0}, ValueError, "max_batch_size must be an int >= 1"),
    ({"max_cache_len": 8, "qjl": True}, ValueError, "static layout .* does not support qjl"),
])
def test_bad_static_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        TurboQuantCache(**kwargs)


def test_compileable_before_the_first_forward_and_dynamic_is_not():
    assert TurboQuantCache(bits=4, max_cache_len=8).is_compileable
    assert not TurboQuantCache(bits=4).is_compileable
    assert copy.deepcopy(TurboQuantCache(bits=4, max_cache_len=8)).is_compileable
