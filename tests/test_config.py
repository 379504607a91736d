"""TurboQuantConfig: validation once, per-layer overrides, JSON round trip, the cache's two constructor forms."""

import json

import pytest
import torch

from turboquant_hf import TurboQuantCache, TurboQuantConfig
from turboquant_hf.config import LAYER_SETTINGS


def test_defaults_fill_key_and_value_bits():
    config = TurboQuantConfig(bits=3)
    assert (config.key_bits, config.value_bits) == (3, 3)
    assert TurboQuantConfig(bits=3, value_bits=2).for_layer(5).value_bits == 2


def test_frozen():
    with pytest.raises(AttributeError):
        TurboQuantConfig().bits = 2


def test_json_round_trip_keeps_every_setting():
    config = TurboQuantConfig(bits=3, key_bits=4, qjl=True, residual_length=16, rotation="dense", seed=9,
                              norm_correction=False, layer_overrides={0: {"key_bits": 8, "value_bits": 8, "qjl": False}, 3: {"residual_length": 0}})
    restored = TurboQuantConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert restored.for_layer(0).key_bits == 8 and restored.for_layer(3).residual_length == 0
    assert restored.for_layer(1) == config.for_layer(None)


@pytest.mark.parametrize("overrides, error, match", [
    ({0: {"bits": 2}}, ValueError, "unknown settings \\['bits'\\]"),
    ({-1: {"key_bits": 2}}, ValueError, "layer indices >= 0"),
    ({0: {"key_bits": 5}}, ValueError, r"key_bits \(layer_overrides\[0\]\) must be one of"),
    ({0: {"key_bits": 1, "qjl": True}}, ValueError, r"qjl=True needs key_bits .* \(layer_overrides\[0\]\)"),
    ({0: 8}, TypeError, "layer_overrides\\[0\\] must be a mapping"),
    ([(0, {})], TypeError, "layer_overrides must be a mapping"),
    ({1.5: {}}, TypeError, "layer_overrides key must be an int"),
])
def test_bad_overrides_are_refused_at_construction(overrides, error, match):
    with pytest.raises(error, match=match):
        TurboQuantConfig(layer_overrides=overrides)


def test_from_dict_refuses_unknown_fields():
    with pytest.raises(ValueError, match="unknown TurboQuantConfig fields \\['window'\\]"):
        TurboQuantConfig.from_dict({"window": 3})


def test_layer_settings_are_the_documented_ones():
    assert set(LAYER_SETTINGS) == {"key_bits", "value_bits", "qjl", "residual_length", "sink_tokens", "norm_correction"}


def test_cache_long_form_applies_overrides_per_layer_and_reports_the_config():
    config = TurboQuantConfig(bits=2, residual_length=0, layer_overrides={1: {"key_bits": 8, "value_bits": 4}})
    cache = TurboQuantCache(config=config)
    states = torch.randn(1, 2, 5, 64, generator=torch.Generator().manual_seed(0))
    for index in range(3):
        cache.update(states, states, index)
    bits = [(layer.key_quantizer.bits, layer.value_quantizer.bits) for layer in cache.layers]
    assert bits == [(8, 2), (8, 4), (2, 2)]  # layer 0's keys: first_layer_key_bits
    report = cache.memory_report()
    assert report["config"] == config.to_dict()
    assert report["layers"][1]["compressed_bytes"] > report["layers"][0]["compressed_bytes"]


def test_first_layer_keys_take_8_bits_by_default():
    config = TurboQuantConfig(bits=3, qjl=True)
    first = config.for_layer(0)
    assert (first.key_bits, first.value_bits, first.qjl) == (8, 3, False)  # no QJL on 8-bit keys
    assert config.for_layer(1) == config.for_layer(None) and config.for_layer(None).key_bits == 3
    uniform = TurboQuantConfig(bits=3, first_layer_key_bits=None)
    assert uniform.for_layer(0) == uniform.for_layer(None)
    assert TurboQuantConfig(bits=4, first_layer_key_bits=3.5).for_layer(0).key_bits == 3.5
    assert TurboQuantConfig(layer_overrides={0: {"key_bits": 2}}).for_layer(0).key_bits == 2  # the override wins
    saved_before = config.to_dict()
    del saved_before["first_layer_key_bits"]  # a config saved before the setting existed: layer 0 as the others
    assert TurboQuantConfig.from_dict(saved_before).first_layer_key_bits is None
    with pytest.raises(ValueError, match="first_layer_key_bits must be one of"):
        TurboQuantConfig(first_layer_key_bits=5)
    with pytest.raises(TypeError, match="first_layer_key_bits must be an int"):
        TurboQuantConfig(first_layer_key_bits="8")


def test_cache_short_form_equals_long_form():
    assert TurboQuantCache(bits=3, residual_length=7, seed=2).config == TurboQuantConfig(bits=3, residual_length=7, seed=2)
