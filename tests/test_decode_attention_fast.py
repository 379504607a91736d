"""The Gluon split kernel on machines without a GPU: it imports and says it is unavailable (its real checks run on
a GPU: benchmarks/probe_fast_split.py)."""

from __future__ import annotations

import torch

from turboquant_hf import TurboQuantizer
from turboquant_hf.kernels import decode_attention_fast


def test_imports_and_is_unavailable_on_cpu():
    quantizer = TurboQuantizer(128, 4)
    assert not decode_attention_fast.fast_split_available(torch.device("cpu"), quantizer, quantizer, 128)


def test_unavailable_for_other_bits_and_dims():
    if not torch.cuda.is_available():
        return
    device = torch.device("cuda")
    for quantizer in (TurboQuantizer(128, 3), TurboQuantizer(64, 4)):
        assert not decode_attention_fast.fast_split_available(device, quantizer, quantizer, quantizer.dim)
