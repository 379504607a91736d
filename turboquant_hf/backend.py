"""Choose the Triton kernels or the torch reference for a device: ``TURBOQUANT_BACKEND=auto|torch|triton``.

auto (default): Triton on CUDA when triton imports, torch elsewhere. triton: Triton everywhere, which off
CUDA needs Triton's CPU interpreter (``TRITON_INTERPRET=1``, for tests). torch: the torch reference.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

BACKENDS = ("auto", "torch", "triton")
logger = logging.getLogger("turboquant_hf")
_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Log ``message`` as a warning the first time it is seen in this process."""
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreting() -> bool:
    """True when Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def backend_for(device: torch.device) -> str:
    """"triton" or "torch" for tensors on ``device``, from ``TURBOQUANT_BACKEND``."""
    choice = os.environ.get("TURBOQUANT_BACKEND", "auto").strip().lower()
    if choice not in BACKENDS:
        raise ValueError(f"TURBOQUANT_BACKEND must be one of {BACKENDS}, got {choice!r}")
    if choice == "torch":
        return "torch"
    if choice == "triton":
        if not triton_importable():
            raise ValueError("TURBOQUANT_BACKEND=triton but triton cannot be imported")
        if device.type != "cuda" and not triton_interpreting():
            raise ValueError(f"TURBOQUANT_BACKEND=triton on a {device.type} device needs TRITON_INTERPRET=1")
        return "triton"
    if device.type == "cuda":
        if triton_importable():
            return "triton"
        warn_once("turboquant_hf: triton is not importable; CUDA tensors use the slower torch path")
    return "torch"
