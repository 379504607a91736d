"""A model on several devices: layers split by accelerate's ``device_map``, or heads split by tensor parallelism.

On CPU (every run):
- ``launch_device``: a no-op for CPU tensors and for the current GPU, a switch to the tensors' GPU otherwise (Triton
  launches on the current device, whatever the pointers');
- the kernels and the layers refuse operands on another device than their states ("meta" stands in for the second
  device: the checks run before any arithmetic);
- ``load`` puts layer i on ``device[i]``, and the memory report counts the quantizer state on each device;
- accelerate's hooks: a model dispatched with some layers offloaded to disk (weights brought in per call, the path a
  ``device_map`` model takes) gives the tokens of the plain model, both layouts, both attention implementations;
- tensor parallelism with ``tp_plan="auto"`` over two processes on gloo: each rank compresses its own kv heads
  (half of them), with the bytes the single-process cache has for those heads, and the tokens are the single
  process's.

On two GPUs (``-m gpu``, skipped elsewhere): each kernel on cuda:1 while cuda:0 is current equals the same kernel on
cuda:0, and a model split over cuda:0 / cuda:1 generates the tokens of the model on cuda:0 alone.
"""

from __future__ import annotations

import contextlib
import copy
import os
import socket

import pytest
import torch
import torch.multiprocessing
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from turboquant_hf import TurboQuantCache, TurboQuantizer
from turboquant_hf.cache import TurboQuantLayer
from turboquant_hf.kernels import decode_attention, dequantize_into, encode_into
from turboquant_hf.kernels._common import launch_device
from turboquant_hf.quantizer import _indexed
from turboquant_hf.storage import empty_slots

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # tests/conftest.py

PROMPT_TOKENS, NEW_TOKENS = 40, 16
TWO_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= 2
needs_two_gpus = pytest.mark.skipif(not TWO_GPUS, reason="needs two CUDA devices")


def tiny_llama_config(layers: int = 4) -> LlamaConfig:
    # 2 kv heads: one per rank under tensor parallelism. Large random weights (initializer_range 0.3): varied tokens,
    # and 4-bit compression of every token changes them (so equal tokens say the compressed path ran the same).
    return LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=None, pad_token_id=0,
        initializer_range=0.3,
    )


def tiny_llama(layers: int = 4) -> LlamaForCausalLM:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_llama_config(layers)).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def prompt(device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.randint(1, 256, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1)).to(device)


# The caches every split is checked with: everything compressed (dynamic), and the static layout with a short window.
CACHES = {
    "dynamic": lambda: TurboQuantCache(bits=4, residual_length=0),
    "static": lambda: TurboQuantCache(bits=4, residual_length=4, max_cache_len=PROMPT_TOKENS + NEW_TOKENS),
}


def greedy(model, ids: torch.Tensor, cache) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, cache=cache)[0, ids.shape[1]:].cpu()


# ------------------------------------------------------------------------------------------ launch device
def test_launch_device_is_a_no_op_off_cuda():
    for device in ("cpu", "meta"):
        context = launch_device(torch.device(device))
        assert isinstance(context, contextlib.nullcontext)
        with context:
            pass  # entering it touches no CUDA state


def test_launch_device_switches_only_to_another_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert isinstance(launch_device(torch.device("cuda", 0)), contextlib.nullcontext)
    switch = launch_device(torch.device("cuda", 1))  # built, not entered: no GPU here
    assert isinstance(switch, torch.cuda.device) and switch.idx == 1


def test_quantizer_state_is_one_per_indexed_device(monkeypatch):
    quantizer = TurboQuantizer(64, 4)
    assert quantizer.state("cpu") is quantizer.state(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    # "cuda" is the GPU current now, never a state made while another GPU was current.
    assert _indexed("cuda") == torch.device("cuda", 1) and _indexed("cuda:0") == torch.device("cuda", 0)


# ------------------------------------------------------------------------------ operands on another device
def test_kernels_refuse_operands_on_another_device():
    quantizer = TurboQuantizer(64, 4)
    states = torch.randn(1, 2, 3, 64)
    on_meta = empty_slots(quantizer, 1, 2, 3, torch.float32, torch.device("meta"))
    with pytest.raises(ValueError, match="encode: packed_indices is on meta, expected cpu"):
        encode_into(states, quantizer, on_meta, 0)
    with pytest.raises(ValueError, match="dequantize: packed_indices is on meta, expected cpu"):
        dequantize_into(on_meta, quantizer, torch.empty(1, 2, 3, 64))
    on_cpu = empty_slots(quantizer, 1, 2, 3, torch.float32, torch.device("cpu"), fill=torch.zeros)
    with pytest.raises(ValueError, match="decode attention: residual_keys is on meta, expected cpu"):
        decode_attention(torch.randn(1, 2, 1, 64), on_cpu, on_cpu, quantizer, quantizer,
                         torch.empty(1, 2, 1, 64, device="meta"), torch.empty(1, 2, 1, 64, device="meta"), scale=0.125)


@pytest.mark.parametrize("layout", sorted(CACHES))
def test_layer_refuses_states_on_another_device(layout):
    layer = CACHES[layout]()._layer(0)
    states = torch.randn(1, 2, 3, 64)
    layer.update(states, states)
    elsewhere = states.to("meta")
    with pytest.raises(ValueError, match="holds its tokens on cpu"):
        layer.update(elsewhere, elsewhere)


def test_load_puts_each_layer_on_its_device(tmp_path):
    cache = TurboQuantCache(bits=4, residual_length=2, first_layer_key_bits=None)  # one quantizer per device
    states = torch.randn(1, 2, 5, 64)
    for index in range(2):
        cache.update(states, states, index)
    cache.save(tmp_path / "cache.safetensors")
    split = TurboQuantCache.load(tmp_path / "cache.safetensors", device=["cpu", "meta"])
    for layer, device in zip(split.layers, ("cpu", "meta"), strict=True):
        assert layer.device.type == device
        assert {tensor.device.type for tensor in layer.storage.tensors()} == {device}
    one_device = TurboQuantCache.load(tmp_path / "cache.safetensors")
    # The same quantizers, their state held on two devices instead of one.
    assert split.memory_report()["quantizer_state_bytes"] == 2 * one_device.memory_report()["quantizer_state_bytes"]
    with pytest.raises(ValueError, match="device lists 1 devices; the file holds 2 layers"):
        TurboQuantCache.load(tmp_path / "cache.safetensors", device=["cpu"])


# --------------------------------------------------------------------------------------------- device_map
def test_device_map_with_offloaded_layers_matches_the_plain_model(tmp_path):
    """accelerate's hooks around every layer (layers 1 and 3 offloaded to disk: their weights come in per call, as
    a GPU ``device_map`` moves each layer's inputs): the tokens of the plain model, and each layer's storage where its
    states are. A CPU has one device, so this checks the hooks, not a split over two devices (the GPU tests do)."""
    from accelerate import dispatch_model

    plain = tiny_llama()
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": "cpu",
                  "lm_head": "cpu"}
    split = dispatch_model(copy.deepcopy(plain), device_map=device_map, main_device="cpu", offload_dir=tmp_path)
    assert split.model.layers[1].self_attn.q_proj.weight.device.type == "meta"  # really offloaded
    for attention in ("sdpa", "turboquant"):
        for model in (plain, split):
            model.set_attn_implementation(attention)
        for layout, make in CACHES.items():
            cache = make()
            assert torch.equal(greedy(split, prompt(), cache), greedy(plain, prompt(), make())), (attention, layout)
            assert all(layer.storage.keys.scales.device.type == "cpu" for layer in cache.layers)


@pytest.mark.gpu
@needs_two_gpus
@pytest.mark.parametrize("attention", ["sdpa", "turboquant"])
@pytest.mark.parametrize("layout", sorted(CACHES))
@pytest.mark.parametrize("current", [0, 1])
def test_device_map_over_two_gpus_matches_one_gpu(attention, layout, current):
    """Layers 0-1 on cuda:0, 2-3 on cuda:1, whichever GPU is current: the tokens of the model on cuda:0 alone; each
    layer's storage and its quantizers' state on its own GPU. (generate compiles the static layout on CUDA.)"""
    from accelerate import dispatch_model

    one_gpu = tiny_llama().to("cuda:0")
    one_gpu.set_attn_implementation(attention)
    expected = greedy(one_gpu, prompt("cuda:0"), CACHES[layout]())
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
                  "model.layers.2": 1, "model.layers.3": 1, "model.norm": 1, "lm_head": 1}
    split = dispatch_model(tiny_llama(), device_map=device_map)
    split.set_attn_implementation(attention)
    cache = CACHES[layout]()
    with torch.cuda.device(current):
        got = greedy(split, prompt("cuda:0"), cache)
    assert torch.equal(got, expected)
    for layer, index in zip(cache.layers, (0, 0, 1, 1), strict=True):
        assert {tensor.device for tensor in layer.storage.tensors()} == {torch.device("cuda", index)}
        assert torch.device("cuda", index) in layer.key_quantizer._states


# --------------------------------------------------------------------------------- kernels on another GPU
@pytest.mark.gpu
@needs_two_gpus
def test_kernels_on_cuda1_while_cuda0_is_current():
    """Each Triton kernel on cuda:1 tensors, cuda:0 current: the result the same kernel gives on cuda:0."""
    quantizer = TurboQuantizer(128, 4)
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(2, 2, 70, 128, generator=generator).to(torch.bfloat16)
    query = torch.randn(2, 8, 1, 128, generator=generator).to(torch.bfloat16)
    results = {}
    for device in ("cuda:0", "cuda:1"):
        with torch.cuda.device(0):
            slots = empty_slots(quantizer, 2, 2, 64, torch.bfloat16, torch.device(device))
            encode_into(states[:, :, :64].to(device), quantizer, slots, 0)
            dense = torch.empty(2, 2, 64, 128, dtype=torch.bfloat16, device=device)
            dequantize_into(slots, quantizer, dense)
            window = states[:, :, 64:].to(device)
            attended = decode_attention(query.to(device), slots, slots, quantizer, quantizer, window, window,
                                        scale=128 ** -0.5)
            torch.cuda.synchronize(device)
        results[device] = [tensor.cpu() for tensor in (slots.packed_indices, slots.scales, dense, attended)]
    for on_0, on_1 in zip(results["cuda:0"], results["cuda:1"], strict=True):
        assert torch.equal(on_0, on_1)


# ---------------------------------------------------------------------------------------- tensor parallel
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run(model, ids: torch.Tensor) -> dict:
    """Tokens and the compressed keys of every (attention implementation, layout) case, on CPU tensors."""
    results = {}
    for attention in ("sdpa", "turboquant"):
        model.set_attn_implementation(attention)
        for layout, make in CACHES.items():
            cache = make()
            tokens = greedy(model, ids, cache)
            length = PROMPT_TOKENS + NEW_TOKENS - 1  # the newest token is generated, never cached
            keys = [layer.storage.keys[:, :, :length] for layer in cache.layers]
            results[attention, layout] = tokens, [(slots.packed_indices.clone(), slots.scales.clone()) for slots in keys]
    return results


def _tensor_parallel_rank(rank: int, world_size: int, port: int, folder: str) -> None:
    """One rank of the tensor-parallel run (torch.multiprocessing.spawn): its results to folder/rank{rank}.pt."""
    import warnings

    import torch.distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    with warnings.catch_warnings():  # 5.24 prefers distributed_config=DistributedConfig(tp_plan=...), 5.17 lacks it
        warnings.simplefilter("ignore", FutureWarning)
        model = AutoModelForCausalLM.from_pretrained(folder, tp_plan="auto", dtype=torch.float32).eval()
    try:
        torch.save(_run(model, prompt()), os.path.join(folder, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_tensor_parallel_on_gloo_matches_one_process(tmp_path, monkeypatch):
    """tp_plan="auto", two CPU processes on gloo: rank r holds the compressed K/V of kv head r only (the model's q/k/v
    projections are column-split), bit-equal to those heads of the one-process cache in the first layer (identical
    inputs) and to float rounding in later ones (the all-reduce of the row-split o_proj sums in another order); the
    tokens are the one-process tokens, every case."""
    import torch.distributed

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    tiny_llama().save_pretrained(tmp_path)
    # CPU ranks even on a GPU machine (transformers would pick CUDA and nccl there): the children start without GPUs.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    world_size = 2
    torch.multiprocessing.spawn(_tensor_parallel_rank, args=(world_size, _free_port(), str(tmp_path)),
                                nprocs=world_size)
    expected = _run(AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval(), prompt())
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world_size)]
    kv_heads = tiny_llama_config().num_key_value_heads
    heads = kv_heads // world_size
    for case, (tokens, layers) in expected.items():
        for rank, results in enumerate(ranks):
            rank_tokens, rank_layers = results[case]
            assert torch.equal(rank_tokens, tokens), (case, rank)
            for index, ((packed, scales), (rank_packed, rank_scales)) in enumerate(zip(layers, rank_layers,
                                                                                       strict=True)):
                own = slice(rank * heads, (rank + 1) * heads)
                assert rank_packed.shape[1] == heads, (case, rank, index)
                if index == 0:
                    assert torch.equal(rank_packed, packed[:, own]) and torch.equal(rank_scales, scales[:, own])
                else:
                    assert (rank_packed == packed[:, own]).float().mean() > 0.99, (case, rank, index)
                    torch.testing.assert_close(rank_scales, scales[:, own], rtol=1e-4, atol=0)
