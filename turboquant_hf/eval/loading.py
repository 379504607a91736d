"""Loading what an evaluation runs on: the model, its tokenizer, the texts; and calling it with a cache.

torch is imported inside the functions that need it: the command line imports this module to build its
parser, and ``--help`` should not wait for torch.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

TEXTS_DIR = Path(__file__).parent / "texts"
PROSE_TEXT = TEXTS_DIR / "prose_harbour_almanac.txt"
CODE_TEXT = TEXTS_DIR / "textwrap_py3117.txt"
DTYPES = ("float32", "bfloat16", "float16")  # names of torch dtypes
ROPE_SCALINGS = ("linear", "dynamic", "yarn")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def resolve_device(device: str) -> torch.device:
    """``auto``: cuda if available, else cpu. ValueError unless ``device`` names a device this machine has."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"{device!r} is not a device; give auto, cpu, cuda, cuda:1, mps, ...") from None
    if resolved.type == "cpu":
        return resolved
    backend = getattr(torch, resolved.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise ValueError(f"{device!r}: this machine (torch {torch.__version__}) has no {resolved.type} device")
    count = backend.device_count() if hasattr(backend, "device_count") else None
    if resolved.index is not None and count is not None and resolved.index >= count:
        raise ValueError(f"{device!r}: this machine has {count} {resolved.type} device(s), numbered from 0")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: float32 on CPU (16-bit matmuls there are slow and add their own error), bfloat16 on GPU."""
    import torch

    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return getattr(torch, dtype)


def has_weights(model: str) -> bool:
    """False for a local folder that holds a config.json but no weights (see load_model)."""
    folder = Path(model)
    if not (folder / "config.json").is_file():
        return True
    return any(any(folder.glob(pattern)) for pattern in ("*.safetensors", "*.bin", "*.pt", "*.gguf"))


def has_tokenizer(model: str) -> bool:
    """Whether a local folder holds tokenizer files (a hub id is assumed to)."""
    folder = Path(model)
    return not folder.is_dir() or any((folder / name).is_file() for name in TOKENIZER_FILES)


def check_rope_scaling(rope_scaling: tuple[str, float]) -> None:
    """ValueError unless rope_scaling = (kind in ROPE_SCALINGS, factor > 1)."""
    kind, factor = rope_scaling
    if kind not in ROPE_SCALINGS:
        raise ValueError(f"rope_scaling kind must be one of {', '.join(ROPE_SCALINGS)}, got {kind!r}")
    if not factor > 1.0:
        raise ValueError(f"rope_scaling factor must be > 1, got {factor}")


def scale_rope(config, rope_scaling: tuple[str, float]) -> None:
    """Stretch ``config``'s RoPE (in place) to ``factor`` times its trained context, for prompts beyond it:
    rope_scaling = (kind, factor), kind in ROPE_SCALINGS (transformers' rope types of those names)."""
    check_rope_scaling(rope_scaling)
    kind, factor = rope_scaling
    original = config.max_position_embeddings
    scaled = {"rope_type": kind, "factor": float(factor), "original_max_position_embeddings": original}
    params = config.rope_parameters or {}
    if params and all(isinstance(value, dict) for value in params.values()):  # per layer type (Gemma3, ...)
        config.rope_parameters = {layer_type: {**value, **scaled} for layer_type, value in params.items()}
    else:
        config.rope_parameters = {**params, **scaled}
    config.max_position_embeddings = int(original * factor)


def load_model(model: str, gguf_file: str | None, device: torch.device, dtype: torch.dtype,
               rope_scaling: tuple[str, float] | None = None):
    """(model in eval mode on ``device``, tokenizer) from a local folder or hub id, optionally a GGUF file in it,
    with its RoPE stretched by :func:`scale_rope` if ``rope_scaling`` is given.

    A local folder with only a config.json gets random weights (for speed and memory, e.g. an 8B-shaped
    model that is not on the machine) and tokenizer None unless the folder also holds tokenizer files.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    config = AutoConfig.from_pretrained(model, **extra)
    if rope_scaling:
        scale_rope(config, rope_scaling)
    if gguf_file or has_weights(model):
        tokenizer = AutoTokenizer.from_pretrained(model, **extra)
        loaded = AutoModelForCausalLM.from_pretrained(model, config=config, dtype=dtype, **extra).to(device).eval()
        return loaded, tokenizer
    tokenizer = AutoTokenizer.from_pretrained(model) if has_tokenizer(model) else None
    with torch.device(device):
        loaded = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return loaded.eval(), tokenizer


def prose_document(tokenizer, max_tokens: int) -> str:
    """The shipped essay's paragraphs, in order, up to ``max_tokens`` tokens of ``tokenizer`` (examples' documents)."""
    paragraphs = [p.strip() for p in PROSE_TEXT.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    kept, used = [], 0
    for paragraph in paragraphs:
        length = len(tokenizer(paragraph + "\n\n")["input_ids"])
        if kept and used + length > max_tokens:
            break
        kept.append(paragraph)
        used += length
    return "\n\n".join(kept)


def read_text(path: str | Path) -> str:
    text = Path(path).read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"text file {path} is empty")
    return text


def cache_kwarg(model) -> str:
    """The forward argument that takes the cache: ``cache`` (transformers >= 5.23) or ``past_key_values``."""
    return _cache_parameter(type(model))


@functools.cache
def _cache_parameter(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def forward(model, input_ids: torch.Tensor, cache, **kwargs):
    """model(input_ids) through ``cache``: input_ids (batch, n) long -> the model output (logits (batch, n', vocab))."""
    return model(input_ids, use_cache=True, **{cache_kwarg(model): cache}, **kwargs)
