"""turboquant_hf: TurboQuant KV-cache compression for Hugging Face transformers."""

from . import attention  # noqa: F401  (registers attn_implementation="turboquant")
from .cache import TurboQuantCache, TurboQuantLayer
from .codebook import codebook, codebook_distortion
from .config import TurboQuantConfig
from .packing import pack, packed_size, unpack
from .quantizer import QuantizedTensor, TurboQuantizer
from .rotation import Rotation

__all__ = [
    "QuantizedTensor",
    "Rotation",
    "TurboQuantCache",
    "TurboQuantConfig",
    "TurboQuantLayer",
    "TurboQuantizer",
    "codebook",
    "codebook_distortion",
    "pack",
    "packed_size",
    "unpack",
]
__version__ = "0.1.0"
