"""TurboQuantConfig: every setting of a TurboQuantCache in one frozen, validated, serializable object."""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Mapping
from typing import Any

from .lloyd_max import SUPPORTED_BITS
from .outliers import FRACTIONAL_BITS
from .rotation import ROTATIONS

# Bits per coordinate a layer's keys or values may take: integers, or fractional (outliers.py: a channel split).
ALLOWED_BITS = (*SUPPORTED_BITS, *FRACTIONAL_BITS)

# Settings a per-layer override may change (the rotation and seed are shared by every layer).
LAYER_SETTINGS = ("key_bits", "value_bits", "qjl", "residual_length", "sink_tokens", "norm_correction")
_MAX_SEED = 2**63  # torch.Generator.manual_seed takes seeds below 2**64; keep them in int64 range


def integer(name: str, value: Any) -> int:
    """``value`` as a Python int: ints and integer scalars (numpy, 0-d tensors) pass, bool and float raise."""
    if isinstance(value, bool) or isinstance(value, float):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})") from None


def _bits(name: str, value: Any) -> int | float:
    """An integer of SUPPORTED_BITS (as an int: 4.0 raises TypeError) or a float of FRACTIONAL_BITS."""
    if isinstance(value, float) and not value.is_integer():  # NaN and inf too: ValueError
        if value not in FRACTIONAL_BITS:
            raise ValueError(f"{name} must be one of {ALLOWED_BITS}, got {value!r}")
        return float(value)
    bits = integer(name, value)
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{name} must be one of {ALLOWED_BITS}, got {bits!r}")
    return bits


def is_fractional(bits: int | float) -> bool:
    """Whether validated ``bits`` are fractional (an outlier-channel split, outliers.py)."""
    return bits in FRACTIONAL_BITS


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return value


@dataclasses.dataclass(frozen=True)
class LayerSettings:
    """The resolved settings of one compressed layer (``TurboQuantConfig.for_layer``)."""

    key_bits: int | float
    value_bits: int | float
    qjl: bool
    residual_length: int
    norm_correction: bool
    rotation: str
    seed: int
    sink_tokens: int = 0
    center_keys: bool = False


@dataclasses.dataclass(frozen=True)
class TurboQuantConfig:
    """Settings of a ``TurboQuantCache``, validated once at construction.

    Args:
        bits: bits per coordinate of keys and values: 1, 2, 3, 4 or 8, or fractional 2.5, 3.5 or 4.5, an outlier-
            channel split (outliers.py: 2.5 and 3.5 keep half the head_dim channels at one more bit, 4.5 an eighth at
            8 bits; the channels with the largest mean square over the first tokens a layer compresses, per
            sequence and kv head). Fractional bits: the dynamic layout only, no QJL.
        key_bits, value_bits: override ``bits`` for keys / values (None: ``bits``).
        qjl: spend one key bit on the QJL residual stage (unbiased scores; needs key bits 2-4). Values stay MSE.
        residual_length: newest tokens per layer kept in full precision (0: compress every token).
        sink_tokens: oldest tokens per layer kept in full precision (the "attention sinks" that draw much of the
            attention mass; 0: none). The dynamic layout only (the static one keeps none).
        rotation: "hadamard" (randomized Hadamard; dense Haar for head dims that are not powers of two) or "dense".
        seed: seeds the rotation and the QJL projection, an int in [0, 2**63).
        norm_correction: store ||x|| / ||c[i]|| so reconstructions keep their length (not applied to QJL keys).
        center_keys: encode keys less their mean over the first tokens compressed (per sequence and kv head), added
            back when they are decoded: keys that share a large component (Qwen2's key bias) keep their small
            differences. The fused attention reads the packed keys centered and adds each query's q . mean to their
            scores. The dynamic layout only (the static one encodes keys as they are).
        first_layer_key_bits: bits of layer 0's keys (None: as every other layer's), without QJL there. 8 by
            default, chosen by measurement: on Qwen2.5-Coder-0.5B, whose first layer's keys carry a large bias,
            4-bit caches went from KLD 0.24 to 0.004 for 1.5-3 % more bytes, and SmolLM2 was unharmed or helped
            (benchmarks/RESULTS.md, "The first layer's keys"). A ``layer_overrides[0]`` entry takes precedence.
            Index 0 of the cache's layers: a hybrid model whose layer 0 is not attention gains nothing from it.
        layer_overrides: {layer index: {setting: value}} for any of ``LAYER_SETTINGS``, e.g.
            ``{0: {"key_bits": 8, "value_bits": 8}}`` keeps the first layer at 8 bits.

    ``TurboQuantCache(bits=4, ...)`` builds one of these; ``TurboQuantCache(config=TurboQuantConfig(...))`` takes it
    as is. ``to_dict`` / ``from_dict`` round-trip through JSON.
    """

    bits: int | float = 4
    key_bits: int | float | None = None
    value_bits: int | float | None = None
    qjl: bool = False
    residual_length: int = 128
    sink_tokens: int = 4
    rotation: str = "hadamard"
    seed: int = 0
    norm_correction: bool = True
    center_keys: bool = True
    first_layer_key_bits: int | float | None = 8
    layer_overrides: Mapping[int, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        set_ = _setter(self)
        bits = _bits("bits", self.bits)
        set_("bits", bits)
        set_("key_bits", bits if self.key_bits is None else _bits("key_bits", self.key_bits))
        set_("value_bits", bits if self.value_bits is None else _bits("value_bits", self.value_bits))
        set_("qjl", _flag("qjl", self.qjl))
        set_("norm_correction", _flag("norm_correction", self.norm_correction))
        set_("center_keys", _flag("center_keys", self.center_keys))
        if self.first_layer_key_bits is not None:
            set_("first_layer_key_bits", _bits("first_layer_key_bits", self.first_layer_key_bits))
        set_("residual_length", _token_count("residual_length", self.residual_length))
        set_("sink_tokens", _token_count("sink_tokens", self.sink_tokens))
        if not isinstance(self.rotation, str) or self.rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}, got {self.rotation!r}")
        seed = integer("seed", self.seed)
        if not 0 <= seed < _MAX_SEED:
            raise ValueError(f"seed must be an int in [0, 2**63), got {seed}")
        set_("seed", seed)
        if not isinstance(self.layer_overrides, Mapping):
            raise TypeError(f"layer_overrides must be a mapping {{layer index: {{setting: value}}}}, got "
                            f"{type(self.layer_overrides).__name__}")
        overrides = {}
        for index, settings in self.layer_overrides.items():
            layer = integer("layer_overrides key", int(index) if isinstance(index, str) and index.isdigit() else index)
            if layer < 0:
                raise ValueError(f"layer_overrides keys must be layer indices >= 0, got {layer}")
            if not isinstance(settings, Mapping):
                raise TypeError(f"layer_overrides[{layer}] must be a mapping of settings, got {type(settings).__name__}")
            unknown = set(settings) - set(LAYER_SETTINGS)
            if unknown:
                raise ValueError(f"layer_overrides[{layer}] has unknown settings {sorted(unknown)}; allowed: "
                                 f"{LAYER_SETTINGS}")
            overrides[layer] = dict(settings)
        set_("layer_overrides", overrides)
        for layer in (None, 0, *overrides):  # every layer's combination must be valid on its own
            self.for_layer(layer)

    def for_layer(self, index: int | None) -> LayerSettings:
        """The settings of layer ``index`` (its overrides applied; None: the defaults), validated."""
        values = {name: getattr(self, name) for name in LAYER_SETTINGS}
        if index == 0 and self.first_layer_key_bits is not None:
            values.update(key_bits=self.first_layer_key_bits, qjl=False)
        values.update(self.layer_overrides.get(index, {}) if index is not None else {})
        where = "" if index is None or index not in self.layer_overrides else f" (layer_overrides[{index}])"
        key_bits = _bits("key_bits" + where, values["key_bits"])
        qjl = _flag("qjl" + where, values["qjl"])
        if qjl and key_bits not in (2, 3, 4):
            raise ValueError(f"qjl=True needs key_bits in (2, 3, 4) (one bit goes to QJL), got {key_bits}{where}")
        return LayerSettings(
            key_bits=key_bits, value_bits=_bits("value_bits" + where, values["value_bits"]), qjl=qjl,
            residual_length=_token_count("residual_length" + where, values["residual_length"]),
            sink_tokens=_token_count("sink_tokens" + where, values["sink_tokens"]),
            norm_correction=_flag("norm_correction" + where, values["norm_correction"]),
            rotation=self.rotation, seed=self.seed, center_keys=self.center_keys,
        )

    @property
    def fractional(self) -> bool:
        """Whether any layer's keys or values take fractional bits (an outlier-channel split)."""
        layers = [self.for_layer(index) for index in (None, 0, *self.layer_overrides)]
        return any(is_fractional(bits) for layer in layers for bits in (layer.key_bits, layer.value_bits))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serializable dict (layer indices as strings, as JSON keys must be)."""
        values = dataclasses.asdict(self)
        values["layer_overrides"] = {str(layer): dict(settings) for layer, settings in self.layer_overrides.items()}
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TurboQuantConfig:
        """Inverse of ``to_dict``; unknown keys raise ValueError. A dict without ``first_layer_key_bits`` (saved
        before that setting existed, when layer 0 was like the others) means None."""
        if not isinstance(values, Mapping):
            raise TypeError(f"values must be a mapping, got {type(values).__name__}")
        unknown = set(values) - {field.name for field in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown TurboQuantConfig fields {sorted(unknown)}")
        return cls(**{"first_layer_key_bits": None, **values})


def _token_count(name: str, value: Any) -> int:
    """A token count (residual_length, sink_tokens): an int >= 0."""
    length = integer(name, value)
    if length < 0:
        raise ValueError(f"{name} must be an int >= 0, got {length}")
    return length


def _setter(instance):
    """Setter for fields of a frozen dataclass during its own __post_init__ (normalizing validated values)."""
    return lambda name, value: object.__setattr__(instance, name, value)
