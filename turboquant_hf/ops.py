"""Torch custom ops: what ``torch.compile`` sees of the static layout's decode step.

``turboquant::static_encode`` encodes new keys and values into their slots at the position a device tensor holds
(``encode_pair_into`` with a tensor start), and ``turboquant::static_decode_attention`` is the fused decode
attention over a static layout (``decode_attention`` with ``length``). Both are opaque to the compiler, with fake implementations
for tracing, so that ``torch.compile(model.forward, fullgraph=True)`` captures the whole step and CUDA graphs replay
their kernel launches (on CUDA the Triton kernels; elsewhere the torch twins). They take tensors and plain values
only; each quantizer travels as its ``spec`` (a JSON list) and is rebuilt by ``shared_quantizer`` (cached).

Why an op for the encode and not the traced torch code of ``TurboQuantizer.quantize``: traced, its rotation is an
fp32 matmul of a few rows that cuBLAS ran in ~50 us on an H200, twice per layer (``bench_decode.py --profile``);
the encode kernel rotates on tensor cores, keys and values in one launch.
"""

from __future__ import annotations

import functools
import json

import torch

from .kernels import decode_attention, encode_pair_into
from .quantizer import QuantizedTensor, TurboQuantizer, shared_quantizer


def quantizer_spec(quantizer: TurboQuantizer) -> str:
    """``quantizer.spec`` as the string the op takes."""
    return json.dumps(quantizer.spec)


@functools.lru_cache(maxsize=32)
def _quantizer(spec: str) -> TurboQuantizer:
    """The quantizer a spec string names (parsed once per spec; ``shared_quantizer`` shares the instance)."""
    return shared_quantizer(*json.loads(spec))


def _slots(packed: torch.Tensor, scales: torch.Tensor, quantizer: TurboQuantizer, dtype: torch.dtype
           ) -> QuantizedTensor:
    return QuantizedTensor(packed, scales, None, None, quantizer.dim, quantizer.mse_bits, dtype)


@torch.library.custom_op("turboquant::static_encode",
                         mutates_args=("key_packed", "key_scales", "value_packed", "value_scales"))
def static_encode(key_states: torch.Tensor, value_states: torch.Tensor, key_packed: torch.Tensor,
                  key_scales: torch.Tensor, value_packed: torch.Tensor, value_scales: torch.Tensor,
                  length: torch.Tensor, key_spec: str, value_spec: str) -> None:
    """Encode (B, H, n, D) key and value states into slots length[0] .. length[0] + n - 1 of their packed
    (B, H, N, D * bits / 8) uint8 and scales (B, H, N) fp32, in place (length: int64 on the states' device, read
    there; the caller keeps the slots within N). One kernel launch for both when the specs agree
    (``kernels.encode_pair_into``)."""
    key_quantizer, value_quantizer = _quantizer(key_spec), _quantizer(value_spec)
    encode_pair_into(key_states, value_states, key_quantizer, value_quantizer,
                     _slots(key_packed, key_scales, key_quantizer, key_states.dtype),
                     _slots(value_packed, value_scales, value_quantizer, value_states.dtype), length)


@static_encode.register_fake
def _(key_states, value_states, key_packed, key_scales, value_packed, value_scales, length, key_spec, value_spec):
    return None


@torch.library.custom_op("turboquant::static_decode_attention", mutates_args=())
def static_decode_attention(
    query: torch.Tensor, key_packed: torch.Tensor, key_scales: torch.Tensor, value_packed: torch.Tensor,
    value_scales: torch.Tensor, window_keys: torch.Tensor, window_values: torch.Tensor, length: torch.Tensor,
    attention_mask: torch.Tensor | None, key_spec: str, value_spec: str, scale: float, softcap: float,
) -> torch.Tensor:
    """query (B, Hq, M, D) over a static layout: packed slots (B, H, N, D * bits / 8) uint8 with scales (B, H, N)
    fp32, the ring window (B, H, W, D) (W may be 0), length: int64 [cached tokens (the M new ones included), first
    position the ring holds].
    softcap 0 means none. Returns (B, Hq, M, D) in query.dtype (``kernels.decode_attention`` with ``length``)."""
    key_quantizer, value_quantizer = _quantizer(key_spec), _quantizer(value_spec)
    window = window_keys.shape[2] > 0
    return decode_attention(
        query, _slots(key_packed, key_scales, key_quantizer, window_keys.dtype),
        _slots(value_packed, value_scales, value_quantizer, window_values.dtype), key_quantizer, value_quantizer,
        window_keys if window else None, window_values if window else None, scale=scale,
        softcap=softcap or None, attention_mask=attention_mask, length=length,
    )


@static_decode_attention.register_fake
def _(query, key_packed, key_scales, value_packed, value_scales, window_keys, window_values, length, attention_mask,
      key_spec, value_spec, scale, softcap):
    return torch.empty_like(query)
