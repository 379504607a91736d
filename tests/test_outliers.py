"""Fractional bits (outliers.py): the channel split against float64 references, its bytes, its place in the cache
(channel choice, sinks, centering, batch operations), the attention paths, and bad settings."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from turboquant_hf import (
    SplitQuantizedTensor, SplitQuantizer, TurboQuantCache, TurboQuantConfig, TurboQuantizer, backend,
)
from turboquant_hf.eval.loading import cache_kwarg
from turboquant_hf.outliers import outlier_order
from turboquant_hf.quantizer import shared_quantizer

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # tests/conftest.py


def reference_order(states: torch.Tensor, outliers: int) -> torch.Tensor:
    """outlier_order in plain Python over float64: per (b, h), channels ranked by mean square over the finite tokens
    (ties: lower channel first), the top ``outliers`` then the rest, each ascending."""
    batch, heads, _, dim = states.shape
    order = torch.empty(batch, heads, dim, dtype=torch.int64)
    for b in range(batch):
        for h in range(heads):
            tokens = [row for row in states[b, h].double() if bool(torch.isfinite(row).all())]
            energy = [sum(float(row[j]) ** 2 for row in tokens) / max(len(tokens), 1) for j in range(dim)]
            ranked = sorted(range(dim), key=lambda j: (-energy[j], j))
            order[b, h] = torch.tensor(sorted(ranked[:outliers]) + sorted(ranked[outliers:]))
    return order


def reference_part(x: torch.Tensor, quantizer: TurboQuantizer) -> torch.Tensor:
    """TurboQuant of (..., d) vectors in float64 from its definition: rotate the unit vector, nearest centroid by
    argmin, scale ||x|| / ||c[i]||, rotate back."""
    state = quantizer.state("cpu")
    rotation, centroids = state.rotation.matrix().double(), state.centroids.double()
    x = x.double()
    norms = x.norm(dim=-1, keepdim=True)
    rotated = (x / norms) @ rotation.T
    chosen = centroids[(rotated[..., None] - centroids).abs().argmin(dim=-1)]
    return chosen @ rotation * (norms / chosen.norm(dim=-1, keepdim=True))


def reference_split(x: torch.Tensor, bits: float) -> torch.Tensor:
    """A fractional-bit reconstruction of (..., D) vectors in outlier order, part by part, in float64."""
    quantizer = SplitQuantizer(x.shape[-1], bits)
    k = quantizer.outlier_channels
    return torch.cat([reference_part(x[..., :k], quantizer.outliers), reference_part(x[..., k:], quantizer.regular)],
                     dim=-1)


def assert_vectors_close(actual: torch.Tensor, expected: torch.Tensor, *, rel: float = 1e-5,
                         share: float = 0.99) -> None:
    """At least ``share`` of the vectors within ``rel`` (relative, float64): a coordinate that the fp32 rotation puts
    on the other side of a boundary than float64 does moves its vector by a whole quantization step."""
    error = (actual.double() - expected).norm(dim=-1) / expected.norm(dim=-1)
    assert (error < rel).double().mean() >= share, error.max()


# ---------------------------------------------------------------------------------------------- the split
@pytest.mark.parametrize("bits, dim", [(2.5, 64), (3.5, 128), (4.5, 64), (3.5, 80)])
def test_split_quantizer_matches_float64_reference(bits, dim):
    x = torch.randn(400, dim, generator=torch.Generator().manual_seed(int(bits * dim)))
    quantizer = SplitQuantizer(dim, bits)
    assert_vectors_close(quantizer.dequantize(quantizer.quantize(x)), reference_split(x, bits))


@pytest.mark.parametrize("bits, dim, outliers, outlier_bits, regular_bits, nbytes", [
    (2.5, 128, 64, 3, 2, 24 + 4 + 16 + 4),
    (3.5, 128, 64, 4, 3, 32 + 4 + 24 + 4),
    (3.5, 64, 32, 4, 3, 16 + 4 + 12 + 4),
    (4.5, 128, 16, 8, 4, 16 + 4 + 56 + 4),
])
def test_split_sizes_and_bytes_are_exact(bits, dim, outliers, outlier_bits, regular_bits, nbytes):
    quantizer = SplitQuantizer(dim, bits)
    assert quantizer.outlier_channels == outliers
    assert (quantizer.outliers.dim, quantizer.outliers.bits, quantizer.regular.bits) == (outliers, outlier_bits,
                                                                                          regular_bits)
    assert quantizer.bytes_per_vector == nbytes
    assert (quantizer.bytes_per_vector - 8) * 8 == bits * dim  # indices at exactly the nominal bits; 2 fp32 scales
    q = quantizer.quantize(torch.randn(3, 5, dim))
    assert isinstance(q, SplitQuantizedTensor) and q.shape == (3, 5, dim) and q.nbytes == 15 * nbytes
    assert q[1:, 2].shape == (2, dim)
    assert quantizer.outliers is shared_quantizer(outliers, outlier_bits, False, "hadamard", 0, True)


def test_outlier_order_matches_reference_with_ties_and_non_finite_tokens():
    generator = torch.Generator().manual_seed(1)
    states = torch.randn(2, 3, 9, 32, generator=generator) * torch.rand(32, generator=generator) * 4
    states[0, 1, 4, 7] = float("inf")  # that token is left out of its head's ranking
    states[1, 2] = 0.0  # all ties: the lower channels are the outliers
    states[1, 0, :, 30] = 50.0
    order = outlier_order(states, 16)
    torch.testing.assert_close(order, reference_order(states, 16), rtol=0, atol=0)
    assert order[1, 2].tolist() == list(range(32))
    assert 30 in order[1, 0, :16].tolist()


# ------------------------------------------------------------------------------------------- in the cache
@pytest.mark.parametrize("key_bits, value_bits", [(3.5, 3.5), (2.5, 4), (4, 4.5)])
def test_cache_decodes_like_the_reference_with_sinks_and_centering(key_bits, value_bits):
    """Channels chosen from the first tokens after the sinks (keys centered first), fixed for later tokens; the
    decoded past equals the float64 reference put back in the model's channel order."""
    sinks, dim = 2, 64
    generator = torch.Generator().manual_seed(2)
    scale = torch.ones(dim)
    scale[[3, 17, 40]] = 8.0
    keys = torch.randn(2, 2, 40, dim, generator=generator) * scale + 3.0
    values = torch.randn(2, 2, 40, dim, generator=generator) * scale.flip(0)
    cache = TurboQuantCache(key_bits=key_bits, value_bits=value_bits, residual_length=0, sink_tokens=sinks, first_layer_key_bits=None)
    cache.update(keys[:, :, :30], values[:, :, :30], 0)
    cache.update(keys[:, :, 30:39], values[:, :, 30:39], 0)  # later tokens use the same channels
    got_keys, got_values = cache.update(keys[:, :, 39:], values[:, :, 39:], 0)
    storage = cache.layers[0].storage

    offset = keys[:, :, sinks:30].double().mean(dim=-2, keepdim=True)
    for got, states, bits, shift, channels in ((got_keys, keys, key_bits, offset, storage.key_channels),
                                               (got_values, values, value_bits, 0.0, storage.value_channels)):
        torch.testing.assert_close(got[:, :, :sinks], states[:, :, :sinks], rtol=0, atol=0)
        torch.testing.assert_close(got[:, :, 39:], states[:, :, 39:], rtol=0, atol=0)
        encoded = states[:, :, sinks:39].double() - shift
        if isinstance(bits, int):
            assert channels is None
            continue
        quantizer = SplitQuantizer(dim, bits)
        expected_order = reference_order(encoded[:, :, :30 - sinks], quantizer.outlier_channels)
        torch.testing.assert_close(channels, expected_order, rtol=0, atol=0)
        ordered = torch.take_along_dim(encoded, expected_order[:, :, None], dim=-1)
        expected = torch.empty_like(encoded).scatter_(-1, expected_order[:, :, None].expand(encoded.shape),
                                                      reference_split(ordered, bits)) + shift
        assert_vectors_close(got[:, :, sinks:39], expected)


def test_memory_report_counts_the_split_bytes():
    cache = TurboQuantCache(bits=3.5, residual_length=0, sink_tokens=0, first_layer_key_bits=None)
    cache.update(torch.randn(1, 2, 64, 128), torch.randn(1, 2, 64, 128), 0)
    layer = cache.memory_report()["layers"][0]
    storage = cache.layers[0].storage
    slots = storage.capacity * 2 * 2 * 64  # (K + V) x heads x 64 bytes per vector at 3.5 bits, head_dim 128
    channels = 2 * 2 * 128 * 8  # the two channel orders, int64
    offset = 2 * 128 * 4
    assert layer["compressed_bytes"] == slots + channels + offset
    assert cache.layers[0].key_quantizer.bytes_per_vector == 64


def test_batch_operations_and_crop_carry_the_channel_order():
    cache = TurboQuantCache(bits=2.5, residual_length=0, sink_tokens=0, first_layer_key_bits=None)
    keys = torch.randn(3, 1, 12, 32, generator=torch.Generator().manual_seed(4))
    keys[1, :, :, 5] *= 20
    cache.update(keys, keys, 0)
    before, _ = cache.update(keys[:, :, :1], keys[:, :, :1], 0)
    order = cache.layers[0].storage.key_channels.clone()
    cache.reorder_cache(torch.tensor([1, 1, 0]))
    torch.testing.assert_close(cache.layers[0].storage.key_channels, order[[1, 1, 0]], rtol=0, atol=0)
    cache.crop(12)
    after, _ = cache.update(keys[[1, 1, 0], :, :1], keys[[1, 1, 0], :, :1], 0)
    torch.testing.assert_close(after, before[[1, 1, 0]], rtol=0, atol=0)


def test_copy_keeps_its_own_channel_order():
    cache = TurboQuantCache(bits=3.5, residual_length=0, sink_tokens=1, first_layer_key_bits=None)
    cache.update(torch.randn(1, 1, 10, 32), torch.randn(1, 1, 10, 32), 0)
    copied = cache.copy()
    assert torch.equal(copied.layers[0].storage.key_channels, cache.layers[0].storage.key_channels)
    assert copied.layers[0].storage.key_channels.data_ptr() != cache.layers[0].storage.key_channels.data_ptr()


# ------------------------------------------------------------------------------------------- bad settings
@pytest.mark.parametrize("kwargs, error, match", [
    ({"bits": 2.7}, ValueError, r"bits must be one of \(1, 2, 3, 4, 8, 2\.5, 3\.5, 4\.5\), got 2\.7"),
    ({"key_bits": 1.5}, ValueError, r"key_bits must be one of .*got 1\.5"),
    ({"value_bits": 5.5}, ValueError, r"value_bits must be one of .*got 5\.5"),
    ({"layer_overrides": {0: {"value_bits": 2.25}}}, ValueError, r"value_bits \(layer_overrides\[0\]\) must be one of"),
    ({"bits": 3.5, "qjl": True}, ValueError, r"qjl=True needs key_bits in \(2, 3, 4\).*got 3\.5"),
    ({"bits": 4.0}, TypeError, "bits must be an int, got 4.0"),
    ({"bits": float("nan")}, ValueError, "bits must be one of .*got nan"),
    ({"value_bits": float("inf")}, ValueError, "value_bits must be one of .*got inf"),
])
def test_bad_bits_are_refused_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        TurboQuantConfig(**kwargs)


@pytest.mark.parametrize("kwargs, head_dim, match", [
    ({"bits": 2.5}, 8, r"key_bits=2\.5 keeps 1/2 .* head_dim a multiple of 16, got 8"),
    ({"bits": 4, "value_bits": 3.5}, 40, r"value_bits=3\.5 .* multiple of 16, got 40"),
    ({"bits": 4.5}, 32, r"key_bits=4\.5 keeps 1/8 of the head_dim channels at 8 bits .* multiple of 64, got 32"),
])
def test_head_dim_that_cannot_split_is_refused_at_the_first_update(kwargs, head_dim, match):
    cache = TurboQuantCache(**kwargs, first_layer_key_bits=None)
    with pytest.raises(ValueError, match=match):
        cache.update(torch.randn(1, 1, 3, head_dim), torch.randn(1, 1, 3, head_dim), 0)


@pytest.mark.parametrize("kwargs", [{"bits": 3.5},
                                    {"config": TurboQuantConfig(layer_overrides={2: {"key_bits": 2.5}})}])
def test_static_layout_refuses_fractional_bits(kwargs):
    with pytest.raises(ValueError, match=r"static layout \(max_cache_len=\) does not support fractional bits"):
        TurboQuantCache(max_cache_len=64, **kwargs)


def test_split_quantizer_refuses_plain_quantized_tensors():
    quantizer = SplitQuantizer(64, 3.5)
    with pytest.raises(TypeError, match="SplitQuantizedTensor"):
        quantizer.dequantize(TurboQuantizer(64, 4).quantize(torch.randn(2, 64)))
    with pytest.raises(ValueError, match="bits must be one of"):
        SplitQuantizer(64, 3)


# ------------------------------------------------------------------------------------------- attention
def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                         eos_token_id=None, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):  # seeded weights without moving the other tests' global RNG
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    return model


@pytest.mark.parametrize("settings", [
    {"bits": 3.5, "residual_length": 0}, {"key_bits": 2.5, "value_bits": 4, "residual_length": 0},
    {"config": TurboQuantConfig(bits=4, residual_length=0, layer_overrides={1: {"key_bits": 4.5}})},
])
@pytest.mark.parametrize("search", [{}, {"num_beams": 2}])
def test_turboquant_attention_equals_sdpa_and_warns_once(settings, search, monkeypatch, caplog):
    """The fused attention does not read splits: it reads their dequantized past, as the sdpa path does, after one
    warning; tokens equal and scores within 1e-6, greedy and with beam search (which reorders the channel orders)."""
    model = tiny_llama()
    ids = torch.randint(2, 256, (2, 40), generator=torch.Generator().manual_seed(5))
    monkeypatch.setattr(backend, "_warned", set())
    results = {}
    for attention in ("sdpa", "turboquant"):
        model.set_attn_implementation(attention)
        cache = TurboQuantCache(model_config=model.config, **settings)
        with caplog.at_level(logging.WARNING, logger=backend.logger.name):
            output = model.generate(ids, **{cache_kwarg(model): cache}, max_new_tokens=5, do_sample=False,
                                    output_scores=True, return_dict_in_generate=True, **search)
        results[attention] = output.sequences, torch.stack(output.scores)
        assert cache.layers[0].serves_packed == (attention == "turboquant")
    assert torch.equal(results["sdpa"][0], results["turboquant"][0])
    torch.testing.assert_close(results["turboquant"][1], results["sdpa"][1], atol=1e-6, rtol=0)
    warnings = [record for record in caplog.records if "fractional bits" in record.getMessage()]
    assert len(warnings) == 1
