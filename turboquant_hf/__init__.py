"""turboquant_hf: TurboQuant KV-cache compression for Hugging Face transformers.

The public names load on first use (PEP 562), so that ``python -m turboquant_hf.eval --help`` imports neither torch
nor transformers. Using any of them (``from turboquant_hf import TurboQuantCache``) also registers
``attn_implementation="turboquant"`` with transformers; ``import turboquant_hf.attention`` does only that.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> the submodule that defines it.
_SOURCES = {
    "QuantizedTensor": "quantizer",
    "Rotation": "rotation",
    "SplitQuantizedTensor": "outliers",
    "SplitQuantizer": "outliers",
    "TurboQuantCache": "cache",
    "TurboQuantConfig": "config",
    "TurboQuantLayer": "cache",
    "TurboQuantizer": "quantizer",
    "codebook": "lloyd_max",
    "codebook_distortion": "lloyd_max",
    "pack": "packing",
    "packed_size": "packing",
    "unpack": "packing",
}
__all__ = sorted(_SOURCES)


def __getattr__(name: str):
    if name not in _SOURCES:
        raise AttributeError(f"module 'turboquant_hf' has no attribute {name!r}")
    importlib.import_module(".attention", __name__)  # registers attn_implementation="turboquant"
    value = getattr(importlib.import_module(f".{_SOURCES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
