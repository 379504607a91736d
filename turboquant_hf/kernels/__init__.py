"""Triton kernels, each next to its torch twin (same signature) and a dispatcher that picks one by device.

encode_into: (B, H, n, D) -> QuantizedTensor storage slots (encode_pair_into: keys and values);
dequantize_into: QuantizedTensor -> dense; decode_attention: M new query tokens over a compressed past plus a
dense residual window.
"""

from .decode_attention import decode_attention, decode_attention_torch, decode_attention_triton
from .dequant import dequantize_into, dequantize_into_torch, dequantize_into_triton
from .encode import encode_into, encode_into_torch, encode_into_triton, encode_pair_into

__all__ = [
    "decode_attention",
    "decode_attention_torch",
    "decode_attention_triton",
    "dequantize_into",
    "dequantize_into_torch",
    "dequantize_into_triton",
    "encode_into",
    "encode_into_torch",
    "encode_into_triton",
    "encode_pair_into",
]
