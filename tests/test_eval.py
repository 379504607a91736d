"""turboquant_hf.eval on a tiny random Llama built here (CPU, no downloads)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from turboquant_hf.eval import agreement, commands, divergence, footprint, perplexity, report, specs
from turboquant_hf.eval.__main__ import build_parser, main
from turboquant_hf.eval.loading import PROSE_TEXT, forward, read_text, scale_rope
from turboquant_hf.eval.specs import CacheSpec, make_cache, parse_cache_spec, parse_cache_specs

ROOT = Path(__file__).resolve().parent.parent
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 16
HAS_FP8 = specs.missing_backend(parse_cache_spec("fp8")) is None  # not on transformers 5.17
# The second cache of the CLI runs: transformers' fp8 where it exists, else TQ4.
BASELINE = "fp8" if HAS_FP8 else "tq4"


def tiny_config(vocab_size: int = 320) -> LlamaConfig:
    # A large init makes the random model's predictions sharp, so a broken cache moves the perplexity.
    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                       num_attention_heads=4, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                       max_position_embeddings=1024, initializer_range=0.2, tie_word_embeddings=False)


def tiny_model(vocab_size: int = 320) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(vocab_size)).eval()


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(0, 320, (1, 64), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def model(input_ids):
    """The tiny model, trained to memorise ``input_ids``: a random model's perplexity barely depends on its
    attention, so no cache could move it; this one's does (a few seconds of CPU)."""
    model = tiny_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(25):
        loss = model(input_ids, labels=input_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved tiny model + a byte-level BPE tokenizer trained here on the shipped prose text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("tiny-llama")
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([read_text(PROSE_TEXT)], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    tiny_model(len(tokenizer)).save_pretrained(folder)
    return folder


class NoisyCache(DynamicCache):
    """A DynamicCache that corrupts the values it returns: the metric must catch it."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        noise = torch.randn(values.shape, generator=torch.Generator().manual_seed(layer_idx), dtype=values.dtype)
        return keys, values + 2.0 * values.std() * noise


# ------------------------------------------------------------------------------------ perplexity
@pytest.mark.parametrize("prefill, chunk", [(8, 1), (16, 7), (1, 32), (40, 200)])
def test_dynamic_chunked_equals_full_forward(model, input_ids, prefill, chunk):
    chunked = perplexity.nlls_through_cache(model, input_ids, DynamicCache(config=model.config), prefill, chunk,
                                            progress=False)
    full = perplexity.nlls_full_forward(model, input_ids, prefill)
    assert chunked.shape == full.shape == (input_ids.shape[1] - prefill - 1,)
    torch.testing.assert_close(chunked, full, rtol=1e-4, atol=1e-4)
    check = perplexity.sanity_check(model, input_ids, chunked, prefill)
    assert check["passed"] and check["relative_difference"] < 1e-4


def test_cache_that_corrupts_values_shows_large_delta(model, input_ids):
    reference = perplexity.nlls_through_cache(model, input_ids, DynamicCache(config=model.config), 16, 8, False)
    noisy = perplexity.nlls_through_cache(model, input_ids, NoisyCache(config=model.config), 16, 8, False)
    delta = perplexity.Delta.between(noisy, reference)
    assert delta.percent > 100.0, delta
    assert delta.ci95[0] > 0.0  # not noise: the whole interval is above zero
    same = perplexity.Delta.between(reference, reference)
    assert same.percent == 0.0 and same.ci95 == (0.0, 0.0)


def test_turboquant_8bit_is_near_lossless_and_2bit_is_not(model, input_ids):
    pytest.importorskip("turboquant_hf.cache")
    reference = perplexity.nlls_through_cache(model, input_ids, DynamicCache(config=model.config), 16, 8, False)

    def delta(text):
        cache = make_cache(parse_cache_spec(text), model.config)
        nlls = perplexity.nlls_through_cache(model, input_ids, cache, 16, 8, False)
        return abs(perplexity.Delta.between(nlls, reference).percent)

    assert delta("tq8") < 0.5
    assert delta("tq2") > delta("tq8")


# ------------------------------------------------------------------------- KL divergence, top-1 agreement
def _scored(model, input_ids, cache, prefill, chunk, observer):
    return perplexity.nlls_through_cache(model, input_ids, cache, prefill, chunk, False, observe=observer)


def _divergence(model, input_ids, cache, budget_bytes=divergence.DENSE_BUDGET_BYTES, prefill=16, chunk=8):
    dense = divergence.DenseDistributions(input_ids.shape[1] - prefill - 1, budget_bytes)
    _scored(model, input_ids, DynamicCache(config=model.config), prefill, chunk, dense)
    meter = divergence.Divergence(dense)
    _scored(model, input_ids, cache, prefill, chunk, meter)
    return meter.result()


# 320 tokens x 47 positions x 4 bytes fit 60,160 bytes; 60,000 do not: the top 159 tokens are kept.
@pytest.mark.parametrize("budget_bytes, exact", [(divergence.DENSE_BUDGET_BYTES, True), (60_000, False)])
def test_cache_equal_to_dense_has_kld_0_and_agreement_1(model, input_ids, budget_bytes, exact):
    result = _divergence(model, input_ids, DynamicCache(config=model.config), budget_bytes)
    assert result["kld"] == 0.0 and result["kld_max"] == 0.0 and result["top1_agreement"] == 1.0
    assert result["kld_exact"] is exact
    assert result["kld_kept_tokens"] == (320 if exact else 60_000 // (47 * 8))
    assert (result["dense_tail_mass_mean"] == 0.0) is exact


def test_kld_of_a_corrupting_cache_is_large_and_8_bits_beat_2(model, input_ids):
    noisy = _divergence(model, input_ids, NoisyCache(config=model.config))
    assert noisy["kld"] > 0.1 and noisy["top1_agreement"] < 0.9
    pytest.importorskip("turboquant_hf.cache")
    eight = _divergence(model, input_ids, make_cache(parse_cache_spec("tq8"), model.config))
    two = _divergence(model, input_ids, make_cache(parse_cache_spec("tq2"), model.config))
    assert 0.0 < eight["kld"] < 1e-3 < two["kld"]
    assert eight["top1_agreement"] >= two["top1_agreement"]


def _closed_form_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """sum_v p log(p / q) per row, with p and q softmaxes taken in float64: (positions,) float64."""
    p = p_logits.double().exp() / p_logits.double().exp().sum(-1, keepdim=True)
    q = q_logits.double().exp() / q_logits.double().exp().sum(-1, keepdim=True)
    return (p * (p / q).log()).sum(-1)


def test_kl_per_position_matches_the_float64_closed_form():
    generator = torch.Generator().manual_seed(0)
    dense_logits = 3 * torch.randn(6, 7, generator=generator)
    cache_logits = dense_logits + 0.5 * torch.randn(6, 7, generator=generator)
    # A hand-checked row: p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 log 2 + 1/2 log(2/3).
    two_dense, two_cache = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, math.log(3.0)]])
    for dense, cache in ((dense_logits, cache_logits), (two_dense, two_cache)):
        recorder = divergence.DenseDistributions(positions=dense.shape[0])
        recorder(dense)
        log_probs, token_ids, tail, _ = recorder.chunks[0]
        kl = divergence.kl_per_position(log_probs, tail, token_ids, cache)
        torch.testing.assert_close(kl, _closed_form_kl(dense, cache), rtol=1e-5, atol=1e-7)
    assert math.isclose(kl.item(), 0.5 * math.log(2) + 0.5 * math.log(2 / 3), rel_tol=1e-6)


def test_kl_over_the_dense_top_k_is_the_coarse_grained_kl_a_lower_bound():
    generator = torch.Generator().manual_seed(1)
    dense_logits = 2 * torch.randn(5, 50, generator=generator)
    cache_logits = dense_logits + 0.3 * torch.randn(5, 50, generator=generator)
    keep = 10
    recorder = divergence.DenseDistributions(positions=5, budget_bytes=5 * keep * 8)
    recorder(dense_logits)
    assert recorder.keep == keep and not recorder.exact
    log_probs, token_ids, tail, _ = recorder.chunks[0]
    kl = divergence.kl_per_position(log_probs, tail, token_ids, cache_logits)
    # Independent reference: fold each distribution to its dense top-10 tokens plus one bucket, in float64.
    top = dense_logits.double().topk(keep, dim=-1).indices
    p = torch.softmax(dense_logits.double(), -1)
    q = torch.softmax(cache_logits.double(), -1)
    p_folded = torch.cat([p.gather(1, top), 1 - p.gather(1, top).sum(1, keepdim=True)], 1)
    q_folded = torch.cat([q.gather(1, top), 1 - q.gather(1, top).sum(1, keepdim=True)], 1)
    folded = (p_folded * (p_folded / q_folded).log()).sum(1)
    torch.testing.assert_close(kl, folded, rtol=1e-5, atol=1e-7)
    assert (kl <= _closed_form_kl(dense_logits, cache_logits) + 1e-7).all()


def test_divergence_needs_the_dense_chunking(model, input_ids):
    dense = divergence.DenseDistributions(input_ids.shape[1] - 16 - 1)
    _scored(model, input_ids, DynamicCache(config=model.config), 16, 8, dense)
    with pytest.raises(ValueError, match="positions, the dense one"):
        _scored(model, input_ids, DynamicCache(config=model.config), 16, 4, divergence.Divergence(dense))
    short = divergence.Divergence(dense)
    _scored(model, input_ids[:, :-7], DynamicCache(config=model.config), 16, 8, short)
    with pytest.raises(ValueError, match="scored 5 of the dense run's 6 chunks"):
        short.result()
    whole = divergence.Divergence(dense)
    _scored(model, input_ids, DynamicCache(config=model.config), 16, 8, whole)
    with pytest.raises(ValueError, match="no dense counterpart"):
        whole(torch.zeros(8, 320))


def test_lengths_are_checked(model, input_ids):
    with pytest.raises(ValueError, match="prefill"):
        perplexity.nlls_through_cache(model, input_ids[:, :10], DynamicCache(), 9, 4, False)


# ------------------------------------------------------------------------------------------ specs
@pytest.mark.parametrize("text, expected", [
    ("dynamic", CacheSpec("dynamic")),
    ("tq4", CacheSpec("turboquant", 4, 4)),
    ("TQ3-QJL", CacheSpec("turboquant", 3, 3, qjl=True)),
    ("k4v2", CacheSpec("turboquant", 4, 2)),
    ("k3v4-qjl:residual=32", CacheSpec("turboquant", 3, 4, qjl=True, residual=32)),
    ("tq2:residual=128:seed=3:rotation=dense", CacheSpec("turboquant", 2, 2, residual=128, seed=3, rotation="dense")),
    ("tq4:norms=raw", CacheSpec("turboquant", 4, 4, norms="raw")),
    ("fp8", CacheSpec("fp8")),
    ("quanto-int2", CacheSpec("quanto", 2, 2)),
    ("hqq-int4:residual=64", CacheSpec("hqq", 4, 4, residual=64)),
    ("tq3:edges=8", CacheSpec("turboquant", 3, 3, edges=8)),
    ("tq4:first=none", CacheSpec("turboquant", 4, 4, first=None)),
    ("tq4:first=3.5", CacheSpec("turboquant", 4, 4, first=3.5)),
    ("k4v3-qjl:edges=4.5", CacheSpec("turboquant", 4, 3, qjl=True, edges=4.5)),
])
def test_spec_parsing(text, expected):
    spec = parse_cache_spec(text)
    assert spec == expected
    assert parse_cache_spec(spec.label) == spec  # the label is a spec string for the same cache


def test_spec_labels():
    assert parse_cache_spec("tq3").label == "tq3"
    assert parse_cache_spec("tq3:residual=0").label == "tq3"  # residual 0 is the default
    assert parse_cache_spec("k3v3").label == "tq3"
    assert parse_cache_spec("tq3:residual=128").label == "tq3:residual=128"
    assert parse_cache_spec("tq3:norms=corrected").label == "tq3"  # the default
    assert parse_cache_spec("tq3:norms=raw").label == "tq3:norms=raw"
    assert [s.label for s in parse_cache_specs("tq4, dynamic,tq4")] == ["tq4", "dynamic"]
    assert (parse_cache_spec("tq3.5").key_bits, parse_cache_spec("k4v2.5").label) == (3.5, "k4v2.5")
    assert parse_cache_spec("k4.0v3").label == "k4v3"  # integral bits stay ints


@pytest.mark.parametrize("text, message", [
    ("tq5", "one of (1, 2, 3, 4, 8, 2.5, 3.5, 4.5)"),
    ("tq2.7", "bits must be one of (1, 2, 3, 4, 8, 2.5, 3.5, 4.5), got 2.7"),
    ("k4v1.5", "value bits must be one of"),
    ("tq3.5-qjl", "-qjl needs key bits in (2, 3, 4)"),
    ("tq1-qjl", "-qjl needs key bits in (2, 3, 4)"),
    ("k9v2", "key bits must be one of"),
    ("quanto-int3", "one of (2, 4)"),
    ("int4", "allowed: dynamic, tq"),
    ("tq3:residual=-1", "residual must be an int >= 0"),
    ("tq3:window=4", "unknown option 'window'"),
    ("tq3:residual", "not key=value"),
    ("fp8:residual=4", "no residual window"),
    ("quanto-int4:seed=1", "TurboQuant specs only"),
    ("tq3:rotation=random", "rotation must be one of"),
    ("tq3:norms=exact", "norms must be one of"),
    ("hqq-int4:norms=raw", "TurboQuant specs only"),
    ("tq3:edges=5", "edges must be one of (1, 2, 3, 4, 8, 2.5, 3.5, 4.5), got '5'"),
    ("tq3:first=all", "first must be one of (1, 2, 3, 4, 8, 2.5, 3.5, 4.5, 'none'), got 'all'"),
    ("fp8:first=none", "TurboQuant specs only"),
    ("tq3:edges=x", "edges must be one of"),
    ("tq3:edges=8:edges=4", "option 'edges' given twice"),
    ("quanto-int4:edges=8", "TurboQuant specs only"),
])
def test_spec_errors_name_the_allowed_values(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_cache_spec(text)


def test_make_cache_builds_each_family(model):
    from transformers import QuantizedCache

    assert type(make_cache(parse_cache_spec("dynamic"), model.config)) is DynamicCache
    if HAS_FP8:
        assert isinstance(make_cache(parse_cache_spec("fp8"), model.config), QuantizedCache)
    if specs.missing_backend(parse_cache_spec("hqq-int4")) is None:
        layer = make_cache(parse_cache_spec("hqq-int4:residual=8"), model.config).layers[0]
        assert (layer.nbits, layer.axis_key, layer.axis_value, layer.residual_length) == (4, 1, 1, 8)
    pytest.importorskip("turboquant_hf.cache")
    cache = make_cache(parse_cache_spec("k4v2-qjl:residual=16"), model.config)
    assert (cache.config.key_bits, cache.config.value_bits, cache.config.qjl, cache.config.residual_length) == (4, 2, True, 16)
    # edges=b: the first and last decoder layer at b bits (QJL off there), the others as the spec says.
    three_layers = tiny_config()
    three_layers.num_hidden_layers = 3
    cache = make_cache(parse_cache_spec("tq3-qjl:edges=8"), three_layers)
    layers = range(3)
    edge = [index in (0, len(layers) - 1) for index in layers]
    assert [cache.config.for_layer(i).key_bits for i in layers] == [8 if e else 3 for e in edge]
    assert [cache.config.for_layer(i).qjl for i in layers] == [not e for e in edge]
    assert parse_cache_spec("tq3-qjl:edges=8").label == "tq3-qjl:edges=8"
    assert parse_cache_spec("tq3:first=8").label == "tq3" and parse_cache_spec("tq3:first=none").label == "tq3:first=none"
    assert make_cache(parse_cache_spec("tq3:first=none"), model.config).config.first_layer_key_bits is None
    assert make_cache(parse_cache_spec("tq3"), model.config).config.for_layer(0).key_bits == 8
    for text, corrected in (("tq4", True), ("tq4:norms=raw", False)):
        cache = make_cache(parse_cache_spec(text), model.config)
        forward(model, torch.ones(1, 4, dtype=torch.long), cache)
        assert cache.layers[0].value_quantizer.norm_correction is corrected


def test_missing_backend_message(monkeypatch):
    monkeypatch.setitem(specs._BACKEND_PACKAGE, "quanto", ("optimum-quanto", lambda: False))
    message = specs.missing_backend(parse_cache_spec("quanto-int4"))
    assert "optimum-quanto" in message and "pip install" in message
    with pytest.raises(ImportError, match="optimum-quanto"):
        make_cache(parse_cache_spec("quanto-int4"), tiny_config())
    # transformers 5.17 (the GPU image's) has no fp8 QuantizedCache.
    import transformers.cache_utils

    monkeypatch.delattr(transformers.cache_utils, "Fp8QuantizedLayer", raising=False)
    with pytest.raises(ImportError, match="fp8 QuantizedCache"):
        make_cache(parse_cache_spec("fp8"), tiny_config())
    # There the CLI still starts: fp8 drops out of the default caches, and asking for it is an argument error.
    args = build_parser().parse_args(["ppl", "--model", "m"])
    assert [spec.label for spec in args.caches] == ["dynamic", "tq4", "tq3", "tq2"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ppl", "--model", "m", "--caches", "dynamic,fp8"])


# -------------------------------------------------------------------------------------- footprint
def test_held_bytes_of_dynamic_cache_is_its_kv(model, input_ids):
    cache = DynamicCache(config=model.config)
    perplexity.nlls_through_cache(model, input_ids, cache, 16, 8, False)
    tokens = input_ids.shape[1] - 1
    assert footprint.held_bytes(cache) == 2 * LAYERS * KV_HEADS * tokens * HEAD_DIM * 4
    assert footprint.bytes_per_token(cache, model.config)["bytes_per_token"] == 2 * HEAD_DIM * 4


def test_held_bytes_counts_shared_and_wrapped_storage_once():
    class Layer:
        def __init__(self, shared):
            self.shared = shared
            self.parts = {"a": torch.zeros(4, dtype=torch.uint8), "view": shared[:2]}

    class Cache:
        pass

    shared = torch.zeros(10, dtype=torch.float32)
    cache = Cache()
    cache.layers = [Layer(shared), Layer(shared)]
    assert footprint.held_bytes(cache) == 40 + 2 * 4


# ---------------------------------------------------------------------------------------- agreement
def test_agreement_compare():
    reference = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    candidate = torch.tensor([[1, 2, 3, 4], [1, 9, 3, 9]])
    result = agreement.compare(reference, candidate)
    assert result["per_prompt"] == [{"first_divergence": 4, "match_rate": 1.0},
                                    {"first_divergence": 1, "match_rate": 0.5}]
    assert result["match_rate"] == 0.75 and result["first_divergence_mean"] == 2.5 and result["identical"] == 1


def test_greedy_decode_through_dynamic_matches_no_cache(model, input_ids):
    prompt = input_ids[:, :20]
    tokens = agreement.greedy_decode(model, prompt, DynamicCache(config=model.config), 5)
    ids = prompt
    for _ in range(5):
        ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(tokens, ids[:, 20:])


@pytest.mark.parametrize("text", ["dynamic", "fp8", "tq3", "k4v2-qjl:residual=8"])
def test_replayed_prefill_equals_prefill_through_the_cache(model, input_ids, text):
    if text == "fp8" and not HAS_FP8:
        pytest.skip("this transformers has no fp8 QuantizedCache")
    if text.startswith(("tq", "k")):
        pytest.importorskip("turboquant_hf.cache")
    spec = parse_cache_spec(text)
    prompts = torch.cat([input_ids[:, :24], input_ids[:, 30:54]])
    direct = agreement.greedy_decode(model, prompts, make_cache(spec, model.config), 8)
    first_tokens, prompt_cache = agreement.prefill(model, prompts)
    replayed_cache = agreement.replay(prompt_cache, make_cache(spec, model.config), 24)
    assert torch.equal(agreement.greedy_continue(model, first_tokens, replayed_cache, 8), direct)


# ---------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("argv, message", [
    (["ppl", "--model", "m", "--caches", "tq5"], "argument --caches: 'tq5'"),
    (["ppl", "--model", "m", "--caches", "tq3,bogus"], "allowed: dynamic, tq{1,2,3,4,8,2.5,3.5,4.5}, tq{2,3,4}-qjl"),
    (["ppl", "--model", "m", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8' (choose from"),
    (["ppl", "--model", "m", "--dtype", "int8"], "bfloat16"),
    (["ppl", "--model", "m", "--chunk", "0"], "argument --chunk: must be an int >= 1"),
    (["needle", "--model", "m", "--depths", "0.5,1.5"], "depths are floats in [0, 1]"),
    (["needle", "--model", "m", "--lengths", "512,x"], "argument --lengths: must be an int >= 1"),
    (["ppl", "--model", "m", "--text-file", "/no/such/file.txt"], "no such file"),
    (["bench", "--model", "m"], "invalid choice: 'bench'"),
    (["needle", "--model", "m", "--rope-scaling", "yarn"], "give KIND:FACTOR with KIND one of linear, dynamic, yarn"),
    (["needle", "--model", "m", "--rope-scaling", "ntk:4"], "got 'ntk:4'"),
    (["needle", "--model", "m", "--rope-scaling", "linear:0.5"], "FACTOR > 1"),
    (["ppl"], "the following arguments are required: --model"),
])
def test_cli_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_prefill_must_fit(model_dir, capsys):
    with pytest.raises(SystemExit):
        main(["ppl", "--model", str(model_dir), "--max-tokens", "40", "--prefill", "39", "--quiet"])
    assert "--prefill (39) must be at most --max-tokens - 2 (38)" in capsys.readouterr().err


def test_cli_missing_backend_is_an_argument_error(monkeypatch, capsys):
    monkeypatch.setitem(specs._BACKEND_PACKAGE, "hqq", ("hqq", lambda: False))
    with pytest.raises(SystemExit):
        main(["ppl", "--model", "m", "--caches", "dynamic,hqq-int2"])
    assert "needs the hqq package: pip install 'turboquant-kvcache[hqq]'" in capsys.readouterr().err


def test_spec_grammar_restates_the_library():
    """specs restates these so that the command line imports no torch: they must stay the library's."""
    from turboquant_hf.lloyd_max import SUPPORTED_BITS
    from turboquant_hf.outliers import FRACTIONAL_BITS
    from turboquant_hf.rotation import ROTATIONS

    assert specs.SUPPORTED_BITS == SUPPORTED_BITS and specs.ROTATIONS == ROTATIONS
    assert specs.FRACTIONAL_BITS == FRACTIONAL_BITS
    assert f'name = "{specs.DISTRIBUTION}"' in (ROOT / "pyproject.toml").read_text()


# A fresh interpreter builds the parser and formats every help page; it prints the heavy modules it imported.
# With stub_package, turboquant_hf's own __init__ (which imports the attention, hence torch, to register
# attn_implementation="turboquant") is replaced by an empty package, so only the command line is measured.
_IMPORTS_OF_THE_PARSER = """
import sys, types
if {stub_package}:
    package = types.ModuleType("turboquant_hf")
    package.__path__ = [{package_dir!r}]
    sys.modules["turboquant_hf"] = package
from turboquant_hf.eval.__main__ import build_parser
parser = build_parser()
parser.format_help()
for sub in parser._subparsers._group_actions[0].choices.values():
    sub.format_help()
print(sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "transformers")))
"""


@pytest.mark.parametrize("stub_package", [True, False])
def test_cli_parser_imports_no_torch_or_transformers(stub_package):
    code = _IMPORTS_OF_THE_PARSER.format(stub_package=stub_package, package_dir=str(ROOT / "turboquant_hf"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_cli_help_exits_0():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "turboquant_hf.eval", "--help"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "usage: turboquant-eval" in done.stdout and "{ppl,needle,generate,speed,report}" in done.stdout
    # Generous: the bound that matters is the import check above; this catches a --help that loads a model.
    assert time.perf_counter() - started < 120


@pytest.fixture
def local_model(tmp_path):
    """A folder that passes the up-front checks (config, weights and tokenizer files by name only)."""
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (folder / name).write_text("{}")
    return folder


@pytest.fixture
def no_model_load(monkeypatch):
    """The up-front errors must come before any model is loaded."""
    def load_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(commands, "load_model", load_model)


@pytest.mark.parametrize("case, message", [
    ("missing-folder", "argument --model: no such folder: /no/such/model"),
    ("folder-without-config", "argument --model: folder"),
    ("uncached-hub-id", "argument --model: someone/not-a-cached-model is neither a local folder nor in the hub cache"),
    ("config-only-for-ppl", "random weights are only for the speed command"),
    ("empty-text", "argument --text-file: text file"),
    ("latin1-text", "latin1.txt is not UTF-8 text ("),
    ("device-garbage", "argument --device: 'gpu0' is not a device"),
    ("device-without-cuda", "argument --device: 'cuda': this machine"),
    ("json-folder-missing", "argument --json: folder"),
    ("markdown-folder-missing", "argument --markdown: folder"),
    ("plot-folder-missing", "argument --plot: folder"),
    ("json-is-a-folder", "argument --json:"),
])
def test_cli_input_errors_come_before_the_model_loads(case, message, local_model, tmp_path, monkeypatch, capsys,
                                                       no_model_load):
    argv = ["ppl", "--model", str(local_model), "--quiet"]
    if case == "missing-folder":
        argv[2] = "/no/such/model"
    elif case == "folder-without-config":
        (local_model / "config.json").unlink()
    elif case == "uncached-hub-id":
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        argv[2] = "someone/not-a-cached-model"
    elif case == "config-only-for-ppl":
        (local_model / "model.safetensors").unlink()
        (local_model / "tokenizer.json").unlink()
    elif case == "empty-text":
        (tmp_path / "empty.txt").write_text(" \n")
        argv += ["--text-file", str(tmp_path / "empty.txt")]
    elif case == "latin1-text":
        (tmp_path / "latin1.txt").write_bytes("Caf\u00e9 au lait".encode("latin-1"))
        argv += ["--text-file", str(tmp_path / "latin1.txt")]
    elif case == "device-garbage":
        argv += ["--device", "gpu0"]
    elif case == "device-without-cuda":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        argv += ["--device", "cuda"]
    elif case == "json-is-a-folder":
        argv += ["--json", str(tmp_path)]
    else:
        option = "--" + case.split("-")[0]
        argv += [option, str(tmp_path / "missing" / "out.file")]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_failed_cache_exits_1_after_writing_the_others(model_dir, tmp_path, monkeypatch, capsys):
    """One cache that raises: its row says so, the others are printed and saved, the exit status is 1.
    Without --quiet and with stderr not a terminal (captured here), no progress bars reach the log."""
    class BrokenCache(DynamicCache):
        def update(self, *args, **kwargs):
            raise RuntimeError("broken on purpose")

    def make_cache(spec, config):
        return BrokenCache(config=config) if spec.family == "turboquant" else specs.make_cache(spec, config)

    monkeypatch.setattr(commands, "make_cache", make_cache)
    out_json = tmp_path / "r.json"
    code = main(["ppl", "--model", str(model_dir), "--device", "cpu", "--max-tokens", "40", "--prefill", "16",
                 "--chunk", "8", "--caches", "dynamic,tq4", "--json", str(out_json)])
    captured = capsys.readouterr()
    assert code == 1
    dynamic, tq4 = json.loads(out_json.read_text())["rows"]
    assert dynamic["spec"] == "dynamic" and dynamic["ppl"] > 0
    assert tq4["spec"] == "tq4" and tq4["error"] == "RuntimeError: broken on purpose"
    assert "failed: tq4" in captured.out and "1 of 2 cache runs failed" in captured.err
    assert "%|" not in captured.err and "it/s" not in captured.err  # tqdm's bar


def _check_common_schema(result: dict, command: str) -> None:
    assert result["schema"] == report.SCHEMA and result["command"] == command
    assert result["argv"].startswith(f"python -m turboquant_hf.eval {command}")
    environment = result["environment"]
    assert {"python", "platform", "cpu", "cpu_count", "torch_threads", "device", "gpus", "packages"} <= set(environment)
    assert environment["packages"]["torch"] == torch.__version__.split("+")[0] or environment["packages"]["torch"]
    assert environment["packages"]["transformers"]
    assert isinstance(result["seconds"], float) and result["rows"]


def test_cli_ppl_json_markdown_plot(model_dir, tmp_path, capsys):
    out_json, out_md, out_png = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.png"
    code = main(["ppl", "--model", str(model_dir), "--device", "cpu", "--max-tokens", "80", "--prefill", "16",
                 "--chunk", "8", "--caches", f"{BASELINE},dynamic", "--json", str(out_json), "--markdown", str(out_md),
                 "--plot", str(out_png), "--quiet"])
    assert code == 0
    terminal = capsys.readouterr().out
    assert "ΔPPL %" in terminal and "KLD nats" in terminal and BASELINE in terminal
    result = json.loads(out_json.read_text())
    _check_common_schema(result, "ppl")
    settings = result["settings"]
    expected = {"model", "gguf_file", "device", "dtype", "max_tokens", "prefill", "chunk", "caches", "texts"}
    assert expected <= set(settings)
    assert settings["dtype"] == "torch.float32" and (settings["prefill"], settings["chunk"]) == (16, 8)
    assert [c["spec"] for c in settings["caches"]] == [BASELINE, "dynamic"]
    assert settings["texts"][0]["name"] == PROSE_TEXT.name and settings["texts"][0]["tokens"] == 80
    assert len(settings["texts"][0]["sha256"]) == 64
    [check] = result["checks"]
    assert check["passed"] and check["relative_difference"] <= check["tolerance"] == 1e-4
    rows = {row["spec"]: row for row in result["rows"]}
    assert list(rows) == ["dynamic", BASELINE]  # the reference runs first
    for row in rows.values():
        assert {"text", "spec", "ppl", "delta_ppl_pct", "delta_ppl_ci95", "nll_mean", "scored_tokens", "cache_bytes",
                "cached_tokens", "bytes_per_token", "compression", "seconds"} <= set(row)
        assert row["scored_tokens"] == 80 - 16 - 1 and row["cached_tokens"] == 79
        assert math.isclose(row["ppl"], math.exp(row["nll_mean"]))
        assert row["kld_exact"] and 0.0 <= row["kld"] <= row["kld_max"] and 0.0 <= row["top1_agreement"] <= 1.0
    assert rows["dynamic"]["delta_ppl_pct"] == 0.0 and rows["dynamic"]["bytes_per_token"] == 2 * HEAD_DIM * 4
    assert rows["dynamic"]["kld"] == 0.0 and rows["dynamic"]["top1_agreement"] == 1.0
    assert rows[BASELINE]["kld"] > 0.0
    # fp8 of fp32 states: 1 byte of 4 plus scales (TQ4 here also counts its 64 KiB rotation state over 79 tokens).
    assert rows[BASELINE]["bytes_per_token"] < rows["dynamic"]["bytes_per_token"] / (3.5 if HAS_FP8 else 1)
    markdown = out_md.read_text()
    assert "Command: `python -m turboquant_hf.eval ppl" in markdown
    assert "| cache | PPL | ΔPPL % | 95% CI | KLD nats | top-1 agree |" in markdown
    assert "| dynamic |" in markdown and "Machine: " in markdown
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_frontier_script_reads_ppl_results(model_dir, tmp_path):
    pytest.importorskip("matplotlib")
    out_json, out_png = tmp_path / "r.json", tmp_path / "frontier.png"
    assert main(["ppl", "--model", str(model_dir), "--device", "cpu", "--max-tokens", "48", "--prefill", "16",
                 "--chunk", "8", "--caches", "dynamic,tq4,tq2:residual=8", "--json", str(out_json), "--quiet"]) == 0
    script = ROOT / "benchmarks" / "plot_frontier.py"
    done = subprocess.run([sys.executable, str(script), str(out_json), "--out", str(out_png)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_generate_needle_speed_report(model_dir, tmp_path, capsys):
    common = ["--model", str(model_dir), "--device", "cpu", "--quiet"]
    gen_json, ppl_json = tmp_path / "g.json", tmp_path / "p.json"
    assert main(["generate", *common, "--prompts", "2", "--prompt-tokens", "24", "--new-tokens", "6",
                 "--caches", f"dynamic,{BASELINE}", "--json", str(gen_json)]) == 0
    result = json.loads(gen_json.read_text())
    _check_common_schema(result, "generate")
    dynamic, fp8 = result["rows"]
    assert dynamic["match_rate"] == 1.0 and dynamic["first_divergence_mean"] == 6 and dynamic["identical"] == 2
    assert len(fp8["generations"]) == 2 and len(fp8["per_prompt"]) == 2
    assert "prompt 0" in capsys.readouterr().out

    needle_json = tmp_path / "n.json"
    assert main(["needle", *common, "--lengths", "96", "--depths", "0,0.5", "--new-tokens", "3",
                 "--caches", "dynamic", "--rope-scaling", "yarn:2", "--json", str(needle_json)]) == 0
    needle_result = json.loads(needle_json.read_text())
    _check_common_schema(needle_result, "needle")
    rope = needle_result["settings"]["rope_scaling"]
    assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"]) == ("yarn", 2.0, 1024)
    [row] = needle_result["rows"]
    assert row["trials"] == 2 and 0.0 <= row["score"] <= 1.0 and len(row["per_trial"]) == 2
    assert all(abs(t["prompt_tokens"] - 96) <= 8 for t in row["per_trial"])

    speed_json = tmp_path / "s.json"
    assert main(["speed", *common, "--prompt-tokens", "32", "--new-tokens", "4", "--caches", f"dynamic,{BASELINE}",
                 "--json", str(speed_json)]) == 0
    speed_result = json.loads(speed_json.read_text())
    _check_common_schema(speed_result, "speed")
    for row in speed_result["rows"]:
        assert row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0 and row["cache_bytes"] > 0
        assert row["max_memory_allocated"] is None  # CPU

    assert main(["ppl", *common, "--max-tokens", "48", "--prefill", "8", "--chunk", "8", "--caches", f"dynamic,{BASELINE}",
                 "--json", str(ppl_json)]) == 0
    merged_json, merged_png = tmp_path / "m.json", tmp_path / "m.png"
    assert main(["report", str(ppl_json), str(gen_json), "--json", str(merged_json), "--plot", str(merged_png),
                 "--quiet"]) == 0
    merged = json.loads(merged_json.read_text())
    assert merged["command"] == "report" and len(merged["sources"]) == 2
    fp8_row = next(row for row in merged["rows"] if row["spec"] == BASELINE)
    assert {"ppl", "delta_ppl_pct", "match_rate", "bytes_per_token"} <= set(fp8_row)
    assert merged_png.is_file()


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn"])
def test_scale_rope_stretches_the_trained_context(kind):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = tiny_config()
    original = LlamaRotaryEmbedding(config).inv_freq
    scale_rope(config, (kind, 4.0))
    assert config.max_position_embeddings == 4096 and config.rope_parameters["original_max_position_embeddings"] == 1024
    scaled = LlamaRotaryEmbedding(config).inv_freq
    if kind == "linear":  # closed form: every frequency divided by the factor
        torch.testing.assert_close(scaled, original / 4.0)
    elif kind == "yarn":  # the fastest frequency is kept, the slowest divided by the factor
        assert torch.isclose(scaled[0], original[0]) and torch.isclose(scaled[-1], original[-1] / 4.0)
    # Per-layer-type RoPE (Gemma3: sliding and full layers): each layer type is stretched.
    from transformers import Gemma3TextConfig

    gemma = Gemma3TextConfig(max_position_embeddings=1024)
    scale_rope(gemma, (kind, 4.0))
    assert {name: (p["rope_type"], p["factor"]) for name, p in gemma.rope_parameters.items()} == {
        "sliding_attention": (kind, 4.0), "full_attention": (kind, 4.0)}
    for bad, message in (((kind, 1.0), "factor must be > 1"), (("ntk", 4.0), "kind must be one of")):
        with pytest.raises(ValueError, match=message):
            scale_rope(tiny_config(), bad)


def test_cli_speed_on_random_weights_from_a_config(tmp_path, capsys):
    """A folder with only config.json: random weights, seeded random prompt ids; the fused attention path."""
    folder = tmp_path / "config-only"
    tiny_model(97).config.save_pretrained(folder)
    out = tmp_path / "s.json"
    common = ["--model", str(folder), "--device", "cpu", "--quiet"]
    assert main(["speed", *common, "--attn-implementation", "turboquant", "--prompt-tokens", "40", "--new-tokens",
                 "3", "--caches", "dynamic,tq4", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["random_weights"] and result["settings"]["attn_implementation"] == "turboquant"
    assert [row["spec"] for row in result["rows"]] == ["dynamic", "tq4"]
    assert all(row["decode_tokens_per_s"] > 0 and "error" not in row for row in result["rows"])
    with pytest.raises(SystemExit):  # the quality commands need a tokenizer
        main(["ppl", *common, "--max-tokens", "40", "--prefill", "8"])
    assert "random weights are only for the speed command" in capsys.readouterr().err


def test_cli_report_rejects_other_json(tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit):
        main(["report", str(other)])
    assert "not a turboquant_hf.eval/1 result" in capsys.readouterr().err
