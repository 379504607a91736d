"""The "turboquant" attention implementation: decode attention straight from the packed cache.

``import turboquant_hf`` registers it, so ``from_pretrained(..., attn_implementation="turboquant")``
with a ``TurboQuantCache`` never materializes the dense past: each layer's attention call reads the
packed keys/values (``kernels.decode_attention``), plus the exact sinks, the full-precision window and the new
tokens.

Calls that have no compressed past to read (prefill of an empty cache, a layer kind the cache keeps
dense, such as a sliding-window layer, or a model run without a TurboQuantCache) and calls with many
query tokens (chunked prefill, over ``MAX_FUSED_QUERIES``) use dense attention on the states given,
after dequantizing the past into a transient tensor where there is one.

The packed past reaches this function through the attention kwargs that the model hands to ``Cache.update``
(cache.py describes the contract). transformers >= 5.23 does that for almost every model; with older versions or
models that do not, every call receives the full dense states and runs SDPA on them: right answers, no speed-up.
"""

from __future__ import annotations

import torch
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .backend import warn_once
from .cache import ATTENTION_NAME, CompressedPast, StaticPast, TurboQuantLayer
from .kernels import decode_attention
from .kernels.decode_attention import attention_fp32
from .ops import static_decode_attention
from .storage import dense_states

NAME = ATTENTION_NAME
# Above this many query tokens a dense matmul over the dequantized past beats the decode kernel.
MAX_FUSED_QUERIES = 64
_SPLIT_NOT_FUSED = ("turboquant_hf: the fused decode attention does not read fractional bits (outlier-channel "
                    "splits) yet; attention over those layers dequantizes their past and runs dense attention")


def dense_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, attention_mask: torch.Tensor | None,
                    *, scale: float, softcap: float | None, causal: bool) -> torch.Tensor:
    """query (B, Hq, M, D), keys/values (B, Hkv, L, D) -> (B, Hq, M, D), in query.dtype.

    attention_mask: (B, 1, M, >= L) bool (True = attend) or additive float, or None. ``causal`` (used when
    there is no mask; a given mask already encodes the model's pattern): the M queries are the last M of
    the L positions. A query row with no allowed key gives zeros. SDPA without softcapping, else fp32 math.
    """
    causal = causal and attention_mask is None
    if softcap is not None:
        return attention_fp32(query, keys, values, scale=scale, softcap=softcap, attention_mask=attention_mask,
                              causal=causal)
    n_queries, kv_len = query.shape[2], keys.shape[2]
    allowed = None if attention_mask is None else attention_mask[..., :kv_len]
    if causal and n_queries > 1:
        # A bias object, not an (M, L) mask: with it SDPA keeps its fused GQA kernels and materializes nothing
        # (benchmarks/RESULTS.md, "Dense attention for chunks over a cache").
        allowed = causal_lower_right(n_queries, kv_len)
    return torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=allowed, scale=scale,
                                                            enable_gqa=True)


def _sinks_after_packed(attention_mask: torch.Tensor | None, sinks: int, packed: int) -> torch.Tensor | None:
    """A (B, 1, M, >= L) mask in position order (sinks, packed, window) -> columns in the kernel's order (packed,
    sinks, window). Sinks come first in position, so with the window's M >= query tokens after them, the kernel's
    causal rule (a residual row r sits at position packed + r) still lets every query see every sink."""
    if attention_mask is None:
        return None
    return torch.cat([attention_mask[..., sinks:sinks + packed], attention_mask[..., :sinks],
                      attention_mask[..., sinks + packed:]], dim=-1)


def turboquant_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         softcap: float | None = None, turboquant_layer: TurboQuantLayer | None = None,
                         turboquant_past: CompressedPast | StaticPast | None = None, **kwargs
                         ) -> tuple[torch.Tensor, None]:
    """transformers attention function: query (B, Hq, M, D), key/value (B, Hkv, L, D) -> ((B, M, Hq, D), None).

    turboquant_layer, turboquant_past: put into the attention kwargs by ``TurboQuantLayer.update`` (cache.py's
    contract). With ``turboquant_past``, key/value hold only the sinks, the window and the new tokens and the past is
    read packed; without it they are the full dense states, and the layer is asked to serve its past packed from the
    next update on.
    """
    if dropout and module.training:
        raise ValueError("attn_implementation='turboquant' is for inference: dropout must be 0 in training mode")
    if turboquant_layer is not None and turboquant_past is None:
        turboquant_layer.serve_packed(module.config)
    if turboquant_past is None and softcap is None:  # all states are dense here: plain SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    causal = kwargs.get("is_causal") if kwargs.get("is_causal") is not None else getattr(module, "is_causal", True)
    n_queries = query.shape[2]
    # The kernel applies the decoder's causal pattern itself, which a given mask may relax (e.g. image
    # tokens attending each other): with a mask, only single-token steps take the kernel.
    fusable = causal and n_queries <= MAX_FUSED_QUERIES and (attention_mask is None or n_queries == 1)
    past = turboquant_past
    if isinstance(past, StaticPast):  # a compiled step of the static layout: one custom op, lengths on the device
        out = static_decode_attention(
            query, past.keys.packed_indices, past.keys.scales, past.values.packed_indices, past.values.scales,
            past.window_keys, past.window_values, past.lengths, attention_mask, past.key_spec, past.value_spec,
            float(scale), float(softcap or 0.0))
        return out.transpose(1, 2).contiguous(), None
    if past is not None and past.split and past.length and fusable:
        warn_once(_SPLIT_NOT_FUSED)
        fusable = False
    if past is not None and past.length and fusable:
        # key/value: the sinks, the window and the new tokens, which the kernel reads after the packed tokens.
        if past.sink_length:
            attention_mask = _sinks_after_packed(attention_mask, past.sink_length, past.length)
        out = decode_attention(query, past.keys, past.values, past.key_quantizer, past.value_quantizer, key, value,
                               scale=scale, softcap=softcap, attention_mask=attention_mask, key_offset=past.key_offset)
    else:
        if past is not None and past.length:
            # The past is needed dense: the packed tokens dequantized after the sinks, in a transient tensor.
            s = past.sink_length
            key = dense_states(past.keys, past.key_quantizer, key[:, :, s:], prefix=key[:, :, :s],
                               offset=past.key_offset, channels=past.key_channels)
            value = dense_states(past.values, past.value_quantizer, value[:, :, s:], prefix=value[:, :, :s],
                                 channels=past.value_channels)
        out = dense_attention(query, key, value, attention_mask, scale=scale, softcap=softcap, causal=causal)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, turboquant_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)
