"""Cache specs: the short strings that name a KV cache on the command line, and the caches they build.

Grammar (options follow the name, each after a colon; ``--caches`` separates specs with commas)::

    SPEC    := NAME (":" OPTION)*
    NAME    := dynamic                  transformers' DynamicCache, the uncompressed reference
             | tq<b>                    TurboQuantCache(bits=b), b in 1, 2, 3, 4, 8, 2.5, 3.5, 4.5
             | tq<b>-qjl                TurboQuantCache(bits=b, qjl=True), b in 2, 3, 4 (QJL on keys only)
             | k<kb>v<vb>[-qjl]         TurboQuantCache(key_bits=kb, value_bits=vb[, qjl=True]), e.g. k4v3.5
             | fp8                      QuantizedCache(backend="fp8"), per-tensor float8_e4m3fn
             | quanto-int<b>            QuantizedCache(backend="quanto", nbits=b), b in 2, 4
             | hqq-int<b>               QuantizedCache(backend="hqq", nbits=b, axis 1), b in 1, 2, 3, 4, 8
    OPTION  := residual=<N>             newest N tokens kept in full precision (default 0)
             | seed=<N> | rotation=hadamard|dense        TurboQuant only
             | norms=corrected|raw      TurboQuant only: raw = the paper's MSE reconstruction, without
                                        norm correction (see TurboQuantizer)
             | keys=centered|raw        TurboQuant only: raw = keys encoded as they are (center_keys=False)
             | sinks=<N>                TurboQuant only: the first N tokens kept in full precision (default 4)
             | first=<b>|none           TurboQuant only: layer 0's keys at b bits (default 8, as the library's
                                        first_layer_key_bits), none: as the other layers
             | edges=<b>                TurboQuant only: the first and the last decoder layer at b bits (keys and
                                        values; b as in tq<b>), a per-layer policy (layer_overrides)

Every quantized spec compresses every token unless it says ``residual=N``: the figures then measure
the compression of everything, for TurboQuant and the baselines alike. Example: ``tq3:residual=128``.

The residual windows differ in kind: TurboQuantCache keeps exactly the newest N tokens dense, while
transformers' quanto/HQQ layers let the dense window grow to N tokens and then quantize all of it at once.
HQQ runs with ``axis_key = axis_value = 1`` (groups along head_dim, as transformers' documentation
recommends); quanto with transformers' defaults (axis 0). Both use groups of 64 along head_dim
(transformers' default), or one group per head vector when head_dim is not a multiple of 64.
"""

from __future__ import annotations

import dataclasses
import re

# The pip name of this project (pyproject.toml); the import name stays turboquant_hf.
DISTRIBUTION = "turboquant-kvcache"
# codebook.SUPPORTED_BITS, outliers.FRACTIONAL_BITS and rotation.ROTATIONS, restated so that the command line (its
# --help, its spec parsing) imports no torch; tests/test_eval.py checks that they agree.
SUPPORTED_BITS = (1, 2, 3, 4, 8)
FRACTIONAL_BITS = (2.5, 3.5, 4.5)
ROTATIONS = ("hadamard", "dense")
FAMILIES = ("dynamic", "turboquant", "fp8", "quanto", "hqq")
QJL_BITS = (2, 3, 4)  # QJL takes one of the key bits, so the MSE stage keeps at least one
QUANTO_BITS = (2, 4)
HQQ_BITS = (1, 2, 3, 4, 8)


def _quanto_available() -> bool:
    from transformers.utils import is_optimum_quanto_available

    return is_optimum_quanto_available()


def _hqq_available() -> bool:
    from transformers.utils import is_hqq_available

    return is_hqq_available()


_BACKEND_PACKAGE = {"quanto": ("optimum-quanto", _quanto_available), "hqq": ("hqq", _hqq_available)}


def _bits_set(bits: tuple[int | float, ...]) -> str:
    return "{" + ",".join(str(b) for b in bits) + "}"


ALLOWED_NAMES = (
    f"dynamic, tq{_bits_set(SUPPORTED_BITS + FRACTIONAL_BITS)}, tq{_bits_set(QJL_BITS)}-qjl, "
    "k<bits>v<bits>[-qjl] (e.g. k4v2, k4v3.5), "
    f"fp8, quanto-int{_bits_set(QUANTO_BITS)}, hqq-int{_bits_set(HQQ_BITS)}"
)
NORMS = ("corrected", "raw")
KEYS = ("centered", "raw")
ALLOWED_OPTIONS = (f"residual=N (N >= 0); TurboQuant only: seed=N (N >= 0), rotation={'|'.join(ROTATIONS)}, "
                   f"norms={'|'.join(NORMS)}, keys={'|'.join(KEYS)}, sinks=N (N >= 0), "
                   f"first=b|none, edges=b (b in {_bits_set(SUPPORTED_BITS + FRACTIONAL_BITS)})")
SPEC_HELP = f"names: {ALLOWED_NAMES}; options after ':' : {ALLOWED_OPTIONS}"


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """One parsed cache spec. ``key_bits``/``value_bits`` are None for dynamic and fp8 (8-bit float)."""

    family: str
    key_bits: int | float | None = None
    value_bits: int | float | None = None
    qjl: bool = False
    residual: int = 0
    sinks: int = 4
    seed: int = 0
    rotation: str = "hadamard"
    norms: str = "corrected"
    keys: str = "centered"
    first: int | float | None = 8  # bits of layer 0's keys (None: as the others)
    edges: int | float | None = None  # bits of the first and last decoder layer (None: as the others)

    @property
    def name(self) -> str:
        """The spec's name without options: tq3, k4v2-qjl, quanto-int4, ..."""
        if self.family in ("dynamic", "fp8"):
            return self.family
        if self.family in ("quanto", "hqq"):
            return f"{self.family}-int{self.key_bits}"
        if self.key_bits == self.value_bits:
            base = f"tq{self.key_bits}"
        else:
            base = f"k{self.key_bits}v{self.value_bits}"
        return base + ("-qjl" if self.qjl else "")

    @property
    def label(self) -> str:
        """Canonical spec string: the name plus the options that differ from their defaults."""
        options = []
        if self.residual:
            options.append(f"residual={self.residual}")
        if self.seed:
            options.append(f"seed={self.seed}")
        if self.rotation != "hadamard":
            options.append(f"rotation={self.rotation}")
        if self.norms != "corrected":
            options.append(f"norms={self.norms}")
        if self.keys != "centered":
            options.append(f"keys={self.keys}")
        if self.sinks != 4:
            options.append(f"sinks={self.sinks}")
        if self.first != 8 and self.family == "turboquant":
            options.append(f"first={'none' if self.first is None else self.first}")
        if self.edges is not None:
            options.append(f"edges={self.edges}")
        return ":".join([self.name, *options])

    def describe(self) -> dict:
        """Every setting, for the JSON output."""
        return {"spec": self.label, **dataclasses.asdict(self)}


def _parse_name(name: str) -> dict:
    if name in ("dynamic", "fp8"):
        return {"family": name}
    match = re.fullmatch(rf"tq({_NUMBER})(-qjl)?", name)
    if match:
        bits = _number(match.group(1))
        return {"family": "turboquant", "key_bits": bits, "value_bits": bits, "qjl": bool(match.group(2))}
    match = re.fullmatch(rf"k({_NUMBER})v({_NUMBER})(-qjl)?", name)
    if match:
        return {"family": "turboquant", "key_bits": _number(match.group(1)), "value_bits": _number(match.group(2)),
                "qjl": bool(match.group(3))}
    match = re.fullmatch(r"(quanto|hqq)-int(\d+)", name)
    if match:
        bits = int(match.group(2))
        return {"family": match.group(1), "key_bits": bits, "value_bits": bits}
    raise ValueError(f"unknown cache spec {name!r}; allowed: {ALLOWED_NAMES}")


_NUMBER = r"\d+(?:\.\d+)?"


def _number(text: str) -> int | float:
    """"4" (or "4.0") -> 4, "3.5" -> 3.5: bits as TurboQuantConfig takes them."""
    value = float(text)
    return int(value) if value.is_integer() else value


def _check_bits(fields: dict, name: str) -> None:
    family, key_bits, value_bits = fields["family"], fields.get("key_bits"), fields.get("value_bits")
    allowed = {"turboquant": SUPPORTED_BITS + FRACTIONAL_BITS, "quanto": QUANTO_BITS, "hqq": HQQ_BITS}.get(family)
    if allowed is None:
        return
    asymmetric = name.startswith("k")
    for which, bits in (("key bits", key_bits), ("value bits", value_bits)):
        if bits not in allowed:
            which = which if asymmetric else "bits"
            raise ValueError(f"{name!r}: {which} must be one of {allowed}, got {bits}; allowed: {ALLOWED_NAMES}")
    if fields.get("qjl") and key_bits not in QJL_BITS:
        raise ValueError(f"{name!r}: -qjl needs key bits in {QJL_BITS} (one bit goes to QJL), got {key_bits}")


def _parse_option(option: str, fields: dict, spec: str) -> None:
    key, sep, value = option.partition("=")
    if not sep or not value:
        raise ValueError(f"{spec!r}: option {option!r} is not key=value; allowed options: {ALLOWED_OPTIONS}")
    if key in fields and key in ("residual", "seed", "rotation", "norms", "keys", "sinks", "first", "edges"):
        raise ValueError(f"{spec!r}: option {key!r} given twice")
    if key in ("residual", "seed", "sinks"):
        if not value.isdigit():
            raise ValueError(f"{spec!r}: {key} must be an int >= 0, got {value!r}")
        if key == "residual" and fields["family"] in ("dynamic", "fp8"):
            raise ValueError(f"{spec!r}: {fields['family']} has no residual window; residual=N applies to "
                             "tq*, k*v*, quanto-int*, hqq-int*")
        fields[key] = int(value)
    elif key == "rotation":
        if value not in ROTATIONS:
            raise ValueError(f"{spec!r}: rotation must be one of {ROTATIONS}, got {value!r}")
        fields[key] = value
    elif key in ("first", "edges"):
        allowed = SUPPORTED_BITS + FRACTIONAL_BITS + (("none",) if key == "first" else ())
        bits = _number(value) if re.fullmatch(_NUMBER, value) else value
        if bits not in allowed:
            raise ValueError(f"{spec!r}: {key} must be one of {allowed}, got {value!r}")
        fields[key] = None if bits == "none" else bits
    elif key in ("norms", "keys"):
        allowed = NORMS if key == "norms" else KEYS
        if value not in allowed:
            raise ValueError(f"{spec!r}: {key} must be one of {allowed}, got {value!r}")
        fields[key] = value
    else:
        raise ValueError(f"{spec!r}: unknown option {key!r}; allowed options: {ALLOWED_OPTIONS}")
    if key in ("seed", "rotation", "norms", "keys", "sinks", "first", "edges") and fields["family"] != "turboquant":
        raise ValueError(f"{spec!r}: {key}= applies to TurboQuant specs only (tq*, k*v*)")


def parse_cache_spec(spec: str) -> CacheSpec:
    """``"tq3:residual=128"`` -> CacheSpec; ValueError naming the allowed values otherwise."""
    name, *options = spec.strip().lower().split(":")
    fields = _parse_name(name)
    _check_bits(fields, name)
    for option in options:
        _parse_option(option, fields, spec)
    return CacheSpec(**fields)


def parse_cache_specs(text: str) -> list[CacheSpec]:
    """A comma list of specs -> CacheSpecs in order, without duplicates (ValueError on an empty list)."""
    specs = [parse_cache_spec(part) for part in text.split(",") if part.strip()]
    if not specs:
        raise ValueError(f"no cache spec given; allowed: {ALLOWED_NAMES}")
    return list(dict.fromkeys(specs))


def missing_backend(spec: CacheSpec) -> str | None:
    """A message naming the package to install if ``spec`` needs one that is absent, else None."""
    if spec.family == "fp8":
        import transformers
        from transformers import cache_utils

        if hasattr(cache_utils, "Fp8QuantizedLayer"):
            return None
        return (f"cache spec {spec.label!r} needs transformers' fp8 QuantizedCache, which this transformers "
                f"({transformers.__version__}) does not have: pip install -U transformers")
    if spec.family not in _BACKEND_PACKAGE:
        return None
    package, available = _BACKEND_PACKAGE[spec.family]
    if available():
        return None
    return (f"cache spec {spec.label!r} needs the {package} package: pip install '{DISTRIBUTION}[{spec.family}]' "
            f"(or pip install {package})")


def make_cache(spec: CacheSpec, config):
    """A fresh, empty cache for ``spec`` and the model ``config``."""
    from transformers import DynamicCache, QuantizedCache

    if spec.family == "dynamic":
        return DynamicCache(config=config)
    if spec.family == "turboquant":
        from .. import TurboQuantCache, TurboQuantConfig

        overrides = {}
        if spec.edges is not None:
            last = config.get_text_config(decoder=True).num_hidden_layers - 1
            overrides = {layer: {"key_bits": spec.edges, "value_bits": spec.edges, "qjl": False} for layer in (0, last)}
        settings = TurboQuantConfig(key_bits=spec.key_bits, value_bits=spec.value_bits, qjl=spec.qjl,
                                    residual_length=spec.residual, rotation=spec.rotation, seed=spec.seed,
                                    norm_correction=spec.norms == "corrected", center_keys=spec.keys == "centered",
                                    sink_tokens=spec.sinks, first_layer_key_bits=spec.first, layer_overrides=overrides)
        return TurboQuantCache(config=settings, model_config=config)
    message = missing_backend(spec)
    if message:
        raise ImportError(message)
    if spec.family == "fp8":
        return QuantizedCache(backend="fp8", config=config)
    axis = 1 if spec.family == "hqq" else 0
    text_config = config.get_text_config(decoder=True)
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    # transformers' default group of 64 must divide the flattened states; one group per head vector otherwise.
    group = 64 if head_dim % 64 == 0 else head_dim
    return QuantizedCache(backend=spec.family, config=config, nbits=spec.key_bits, axis_key=axis, axis_value=axis,
                          q_group_size=group, residual_length=spec.residual)
