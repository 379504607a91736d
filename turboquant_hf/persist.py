"""Keep and reuse a TurboQuantCache: ``save`` / ``load`` one safetensors file, ``copy`` in memory.

The file holds what the cache holds and nothing more: per layer the valid packed slots (not the spare capacity),
their scales (and QJL signs / residual norms), the dense window (the static layout: its ring and ``lengths``), and
the keys/values or states of layers that transformers made (sliding windows, linear-attention states). The
quantizers are not stored: their rotation and codebook follow from the settings and the seed, so ``load`` rebuilds
the same ones (``shared_quantizer``) and the loaded cache decodes to the same values.

safetensors metadata is str -> str; these entries are JSON:

    format          "turboquant_hf.cache"            format_version  FORMAT_VERSION (2 without fractional bits)
    config          TurboQuantConfig.to_dict()       static          {"max_cache_len", "max_batch_size"}
    fingerprint     {"layers": [{kind, kv_heads, head_dim, value_head_dim, dtype, batch, tokens}, ...]}
    layers          per layer what rebuilding it needs (packed tokens, the plain attributes of other layers)
    checksum        over every tensor's name, dtype, shape and bytes (a flipped byte is caught): version 2, the
                    CRC-32s ``tensor_file`` takes while writing and reading; version 1 (still read, in a pass of its
                    own), a sha256

The bytes go from the cache's tensors straight into the file and back into the loaded cache's storage
(``tensor_file``): one copy each way, the checksum taken alongside.

Tensor names: ``layers.{i}.keys.packed_indices`` (and ``.scales``, ``.qjl_signs``, ``.residual_norms``; at fractional
bits ``.outliers.packed_indices``, ``.outliers.scales``, ``.regular.packed_indices``, ``.regular.scales``), the same
for ``values``, ``layers.{i}.window_keys`` / ``window_values``, ``sink_keys`` / ``sink_values``, ``key_offset``,
``key_channels`` / ``value_channels`` (fractional bits: the channel order of the split), ``layers.{i}.lengths``
(static), and ``layers.{i}.state.{attribute}[.{key}]`` for the tensors of layers (or layer parts) that transformers
owns.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PretrainedConfig

from . import tensor_file
from .config import TurboQuantConfig

if TYPE_CHECKING:
    from .cache import TurboQuantCache

FORMAT = "turboquant_hf.cache"
# 1: a sha256 over the tensors (still read); 2: tensor_file's CRC-32 checksum; 3: version 2 with fractional bits (their
# slots and channel orders), written only for caches that have them, so that releases without them refuse the file
# by its version. Every version loads.
FORMAT_VERSION = 3
_READ_VERSIONS = ("1", "2", "3")
# Attributes of a TurboQuantLayer that save/copy handle themselves (or rebuild: settings come from the config, the
# reader from the attention's next call, device/dtype from the load).
_OWN_ATTRIBUTES = {"storage", "settings", "_reader_config", "is_initialized", "lengths", "specs", "max_cache_len",
                   "max_batch_size", "_host_slots", "_fetched"}
_DTYPES = {str(dtype): dtype for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8,
                                           torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)}


# ------------------------------------------------------------------------------------------------------ save
def save(cache: TurboQuantCache, path: str | os.PathLike) -> Path:
    """Write ``cache`` to ``path`` (safetensors, from the tensors' memory; atomic: a temporary file in the same
    folder, fsync, rename).

    Returns the path. The file size is the bytes of the valid tokens the cache holds plus a header of a few KiB.
    """
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    records = [_save_layer(layer, f"layers.{index}.", tensors) for index, layer in enumerate(cache.layers)]
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION if cache.config.fractional else 2),
        "config": json.dumps(cache.config.to_dict()),
        "static": json.dumps({"max_cache_len": cache.max_cache_len, "max_batch_size": cache.max_batch_size}),
        "fingerprint": json.dumps(fingerprint(cache)),
        "layers": json.dumps(records),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    try:
        tensor_file.write(partial, tensors, metadata)
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def _save_layer(layer, prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Put ``layer``'s tensors into ``tensors`` under ``prefix``; return what rebuilding it needs (JSON)."""
    from .cache import StaticTurboQuantLayer, TurboQuantLayer

    record: dict[str, Any] = {"kind": type(layer).__name__}
    if isinstance(layer, TurboQuantLayer):
        record["initialized"] = bool(layer.is_initialized)
        if layer.is_initialized:
            layer.wait_for_prefetch()
            storage = layer.storage
            length = int(layer.lengths[0]) if isinstance(layer, StaticTurboQuantLayer) else storage.length
            record.update(packed=length, dtype=str(layer.dtype))
            for name, slots in (("keys", storage.keys), ("values", storage.values)):
                for field, tensor in slots.named_tensors().items():
                    tensors[f"{prefix}{name}.{field}"] = tensor[:, :, :length]
            tensors[prefix + "window_keys"] = storage.window_keys
            tensors[prefix + "window_values"] = storage.window_values
            if storage.sink_length:
                tensors[prefix + "sink_keys"] = storage.sink_keys
                tensors[prefix + "sink_values"] = storage.sink_values
            for name in ("key_offset", "key_channels", "value_channels"):
                if getattr(storage, name) is not None:
                    tensors[prefix + name] = getattr(storage, name)
            if isinstance(layer, StaticTurboQuantLayer):
                tensors[prefix + "lengths"] = layer.lengths
    record["state"] = _save_plain_state(layer, prefix + "state.", tensors)
    return record


def _save_plain_state(layer, prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The attributes of a layer (part) that transformers owns: tensors into ``tensors``, the rest as JSON values.

    A tensor is recorded as {"tensor": name}; a dict {int: value} (linear-attention states) as {"dict": {...}}.
    """
    def encode(name: str, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[prefix + name] = value
            return {"tensor": prefix + name}
        if isinstance(value, torch.dtype):
            return {"dtype": str(value)}
        if isinstance(value, dict) and all(isinstance(key, int) for key in value):
            return {"dict": {str(key): encode(f"{name}.{key}", item) for key, item in value.items()}}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise ValueError(f"cannot save {type(layer).__name__}.{name} ({type(value).__name__}): TurboQuantCache.save "
                         "stores tensors, dicts of them and plain values only")

    from .cache import TurboQuantLayer

    skip = _OWN_ATTRIBUTES if isinstance(layer, TurboQuantLayer) else ()
    return {name: encode(name, value) for name, value in vars(layer).items()
            if name not in skip and not isinstance(value, torch.device)}


def fingerprint(cache: TurboQuantCache) -> dict[str, Any]:
    """What a model must match to use ``cache``: per layer its kind (class name) and, once it holds tokens, kv heads,
    head_dim (keys; value_head_dim for values), dtype, batch and tokens."""
    layers = []
    for layer in cache.layers:
        entry = {"kind": type(layer).__name__}
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if getattr(layer, "is_initialized", False) and isinstance(keys, torch.Tensor) and keys.dim() == 4:
            entry.update(batch=keys.shape[0], kv_heads=keys.shape[1], head_dim=keys.shape[-1],
                         value_head_dim=values.shape[-1], dtype=str(keys.dtype), tokens=int(layer.get_seq_length()))
        layers.append(entry)
    return {"layers": layers}


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


# ------------------------------------------------------------------------------------------------------ load
def load(path: str | os.PathLike, device: torch.device | str | Sequence[torch.device | str] | None = None,
         model_config: PretrainedConfig | None = None) -> TurboQuantCache:
    """The cache saved at ``path``, its tensors on ``device`` (default: CPU), or, for a model split over devices
    (``device_map``), on ``device[i]`` for layer i (one device per layer, as the model runs them).

    With ``model_config`` the cache is rebuilt as ``TurboQuantCache(config=..., model_config=model_config)`` and the
    file must match what that config implies (layer count, kinds, kv heads, head_dim); without it the file must hold
    TurboQuant layers only. Any mismatch, a truncated or corrupt file, another format version or a missing tensor is
    a ValueError; nothing is returned half-built.
    """
    path = Path(path)
    with tensor_file.TensorFile(path) as file:
        _check_format(file)
        cache = _restore(file, device, model_config)
        _verify(file)
    return cache


def _restore(file: tensor_file.TensorFile, device: torch.device | str | Sequence[torch.device | str] | None,
             model_config: PretrainedConfig | None) -> TurboQuantCache:
    """``load``'s cache, its tensors read from ``file``; a restoring error is reported as the checksum mismatch it
    comes from when the file is corrupt."""
    from .cache import TurboQuantCache, TurboQuantLayer

    where = f"{file.path}: "
    try:
        config = TurboQuantConfig.from_dict(json.loads(file.metadata["config"]))
        static = json.loads(file.metadata["static"])
        file_print = json.loads(file.metadata["fingerprint"])
        records = json.loads(file.metadata["layers"])
        max_cache_len, max_batch_size = static["max_cache_len"], static["max_batch_size"]
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{where}not a valid TurboQuantCache file (bad header: {error})") from error
    if len(records) != len(file_print["layers"]):
        raise ValueError(f"{where}corrupt header: {len(records)} layer records, {len(file_print['layers'])} in the "
                         "fingerprint")
    devices = _layer_devices(device, len(records))
    cache = TurboQuantCache(config=config, model_config=model_config, max_cache_len=max_cache_len,
                            max_batch_size=max_batch_size)
    if model_config is not None:
        _check_fingerprint(file_print, cache, model_config, "the file")
    else:
        foreign = [f"{index}: {record['kind']}" for index, record in enumerate(records)
                   if record["kind"] not in ("TurboQuantLayer", "StaticTurboQuantLayer")]
        if foreign:
            raise ValueError(f"{where}the file holds layers that transformers builds ({', '.join(foreign)}): pass "
                             "model_config= to load")
        cache.layers = [cache._layer(index) for index in range(len(records))]
    for index, (layer, record, device) in enumerate(zip(cache.layers, records, devices)):
        prefix = f"layers.{index}."
        try:
            if isinstance(layer, TurboQuantLayer):
                _load_compressed(layer, record, prefix, file, device)
            _load_plain_state(layer, record.get("state", {}), file, device)
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            _verify(file)  # a corrupt file: say so rather than what its damage looked like
            detail = f"missing tensor {error}" if isinstance(error, KeyError) else str(error)
            raise ValueError(f"{where}layer {index} ({record.get('kind')}) cannot be restored: {detail}") from error
    return cache


def _layer_devices(device, layers: int) -> list[torch.device]:
    """``load``'s device argument as one device per layer."""
    if device is None or isinstance(device, (str, torch.device)):
        return [torch.device("cpu" if device is None else device)] * layers
    devices = [torch.device(each) for each in device]
    if len(devices) != layers:
        raise ValueError(f"device lists {len(devices)} devices; the file holds {layers} layers (one device per layer)")
    return devices


def _check_format(file: tensor_file.TensorFile) -> None:
    """ValueError unless ``file`` is a TurboQuantCache file of a version this code reads (version 1: its sha256 is
    checked here, in a pass of its own)."""
    metadata = file.metadata
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{file.path}: not a TurboQuantCache file (format {metadata.get('format')!r}, expected "
                         f"{FORMAT!r})")
    if metadata.get("format_version") not in _READ_VERSIONS:
        raise ValueError(f"{file.path}: TurboQuantCache format version {metadata.get('format_version')!r}; this "
                         f"turboquant_hf reads versions {', '.join(_READ_VERSIONS)}")
    if metadata["format_version"] == "1":
        from safetensors.torch import load_file

        if metadata.get("checksum") != _sha256_v1(load_file(file.path)):
            raise ValueError(f"{file.path}: checksum mismatch: the file is corrupt")


def _verify(file: tensor_file.TensorFile) -> None:
    """ValueError when the CRC-32s of what was read disagree with the checksum (version 2; ``_check_format`` checked
    a version 1 file's sha256 before anything was read)."""
    if file.metadata["format_version"] != "1":
        file.verify()


def _sha256_v1(tensors: dict[str, torch.Tensor]) -> str:
    """Format version 1's checksum: sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _load_compressed(layer, record: dict, prefix: str, file: tensor_file.TensorFile, device: torch.device) -> None:
    """Fill a fresh TurboQuantLayer (either layout) from ``record`` and the file's tensors, read straight into the
    layer's storage where it has its own (the slots; the static layout's ring and lengths)."""
    from .cache import StaticTurboQuantLayer

    if not record.get("initialized"):
        return
    dtype = _DTYPES[record["dtype"]]
    key_spec, value_spec = file.specs[prefix + "window_keys"], file.specs[prefix + "window_values"]
    for name, spec in (("window_keys", key_spec), ("window_values", value_spec)):
        if len(spec.shape) != 4 or spec.dtype != dtype:
            raise ValueError(f"{name} is {spec.dtype} of shape {spec.shape}, expected 4 dims of {dtype}")
    batch, heads = key_spec.shape[:2]
    # Empty states of the saved shapes: the layer allocates its storage (and quantizers) as on a first update.
    layer.lazy_initialization(torch.empty(batch, heads, 0, key_spec.shape[-1], dtype=dtype, device=device),
                              torch.empty(batch, heads, 0, value_spec.shape[-1], dtype=dtype, device=device))
    storage, length = layer.storage, int(record["packed"])
    static = isinstance(layer, StaticTurboQuantLayer)
    if static and length > layer.max_cache_len:
        raise ValueError(f"{length} packed tokens exceed max_cache_len={layer.max_cache_len}")
    if not static:
        storage.reserve(length)  # exactly ``length`` slots: each slot tensor is contiguous, the file reads into it
    for name in ("keys", "values"):
        held = getattr(storage, name).named_tensors()
        extra = sorted({key for key in file.specs if key.startswith(f"{prefix}{name}.")}
                       - {f"{prefix}{name}.{field}" for field in held})
        if extra:
            raise ValueError(f"{extra[0]} is in the file but this layer's settings store no such field")
        for field, target in held.items():
            file.read_into(f"{prefix}{name}.{field}", target[:, :, :length])
    if static:
        file.read_into(prefix + "window_keys", storage.window_keys)
        file.read_into(prefix + "window_values", storage.window_values)
        file.read_into(prefix + "lengths", layer.lengths)
        if int(layer.lengths[0]) != length:
            raise ValueError(f"lengths {layer.lengths.tolist()} disagree with {length} packed tokens")
        return
    storage.window_keys = file.read(prefix + "window_keys", device)
    storage.window_values = file.read(prefix + "window_values", device)
    storage.length = length
    if prefix + "sink_keys" in file:
        sink_spec = file.specs[prefix + "sink_keys"]
        if len(sink_spec.shape) != 4 or sink_spec.shape[-2] > min(storage.sinks, length) or \
                sink_spec.shape[:2] != key_spec.shape[:2]:
            raise ValueError(f"{prefix}sink_keys of shape {sink_spec.shape} do not fit this layer "
                             f"(sink_tokens={storage.sinks}, batch and heads {key_spec.shape[:2]})")
        storage.sink_keys = file.read(prefix + "sink_keys", device)
        storage.sink_values = file.read(prefix + "sink_values", device)
    expected = (*key_spec.shape[:2], 1, key_spec.shape[-1])
    if prefix + "key_offset" in file:
        offset_spec = file.specs[prefix + "key_offset"]
        if not storage.center_keys or offset_spec.shape != expected or offset_spec.dtype != torch.float32:
            raise ValueError(f"{prefix}key_offset ({offset_spec.dtype} of shape {offset_spec.shape}) does not fit "
                             f"this layer (center_keys={storage.center_keys}, expected float32 {expected})")
        storage.key_offset = file.read(prefix + "key_offset", device)
    elif storage.center_keys and length:  # saved before key centering: its slots hold the keys as they are
        storage.key_offset = torch.zeros(expected, device=device)
    needed = length > storage.sinks  # a write past the sinks chose the channels of a split
    for name, quantizer, spec in (("key_channels", storage.key_quantizer, key_spec),
                                  ("value_channels", storage.value_quantizer, value_spec)):
        setattr(storage, name, _loaded_channels(file, prefix + name, quantizer, spec.shape, needed, device))


def _loaded_channels(file: tensor_file.TensorFile, name: str, quantizer, window_shape: tuple[int, ...], needed: bool,
                     device: torch.device) -> torch.Tensor | None:
    """A split's saved channel order ((B, H, D) int64, each row a permutation of the D channels), read and checked
    against the layer (its window's shape: (B, H, r, D)); ValueError when it does not fit, or is missing though packed
    tokens after the sinks need it; None for a layer without it."""
    from .outliers import SplitQuantizer

    split = isinstance(quantizer, SplitQuantizer)
    if name not in file:
        if split and needed:
            raise ValueError(f"{name} is missing: the packed tokens of fractional bits need their channel order")
        return None
    expected = (*window_shape[:2], window_shape[-1])
    spec = file.specs[name]
    if not split or tuple(spec.shape) != expected or spec.dtype != torch.int64:
        raise ValueError(f"{name} ({spec.dtype} of shape {tuple(spec.shape)}) does not fit this layer (fractional "
                         f"bits: {split}; expected int64 {expected})")
    channels = file.read(name, device)
    if not torch.equal(channels.sort(dim=-1).values, torch.arange(expected[-1], device=device).expand(expected)):
        raise ValueError(f"{name} is not a channel order: each row must be a permutation of the {expected[-1]} "
                         "channels")
    return channels


def _load_plain_state(layer, state: dict[str, Any], file: tensor_file.TensorFile, device: torch.device) -> None:
    """Set the attributes ``_save_plain_state`` recorded on a freshly built ``layer``."""
    known = set(vars(layer))

    def decode(value: Any) -> Any:
        if isinstance(value, dict) and set(value) == {"tensor"}:
            return file.read(value["tensor"], device)
        if isinstance(value, dict) and set(value) == {"dtype"}:
            return _DTYPES[value["dtype"]]
        if isinstance(value, dict) and set(value) == {"dict"}:
            return {int(key): decode(item) for key, item in value["dict"].items()}
        return value

    # Attributes a fresh layer lacks are legitimate: lazy_initialization sets some of them (dtype on 5.17, ...).
    for name, value in state.items():
        setattr(layer, name, decode(value))
    if "device" in known or getattr(layer, "is_initialized", False):  # the device is the load's, not the file's
        layer.device = device


# ------------------------------------------------------------------------------------------- compatibility
def expected_fingerprint(cache: TurboQuantCache, model_config: PretrainedConfig) -> dict[str, Any]:
    """The layer kinds a cache with ``cache``'s settings has for ``model_config``, plus its kv heads and head_dim."""
    from .cache import TurboQuantCache

    built = TurboQuantCache(config=cache.config, model_config=model_config, max_cache_len=cache.max_cache_len,
                            max_batch_size=cache.max_batch_size)
    text = model_config.get_text_config(decoder=True)
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None)
    if head_dim is None and heads and getattr(text, "hidden_size", None):
        head_dim = text.hidden_size // heads
    return {"layers": [{"kind": type(layer).__name__} for layer in built.layers], "kv_heads": kv_heads,
            "head_dim": head_dim}


def check_compatible(cache: TurboQuantCache, model_config: PretrainedConfig) -> None:
    """ValueError naming the first mismatch between ``cache``'s layers and those ``model_config`` implies."""
    _check_fingerprint(fingerprint(cache), cache, model_config, "the cache")


def _check_fingerprint(found: dict[str, Any], cache: TurboQuantCache, model_config: PretrainedConfig,
                       source: str) -> None:
    expected = expected_fingerprint(cache, model_config)
    found_layers, expected_layers = found["layers"], expected["layers"]
    # A cache built without model_config makes its layers as the model first reaches them: before any token, fewer
    # layers are not yet a mismatch.
    grows = source == "the cache" and cache.layer_class_to_replicate is not None and cache.get_seq_length() == 0
    if len(found_layers) != len(expected_layers) and not (grows and len(found_layers) < len(expected_layers)):
        raise ValueError(f"{source} has {len(found_layers)} layers, model config has {len(expected_layers)}")
    for index, (have, want) in enumerate(zip(found_layers, expected_layers)):
        if have["kind"] != want["kind"]:
            raise ValueError(f"layer {index} is a {have['kind']} in {source}, a {want['kind']} for this model config "
                             "(build the cache with the same model_config= it is used with)")
    # Models whose layers differ in head_dim (global vs local attention) give several values: check uniform ones only.
    for name in ("kv_heads", "head_dim"):
        values = {layer[name] for layer in found_layers if name in layer and layer["kind"].endswith("TurboQuantLayer")}
        if len(values) == 1 and expected[name] is not None and values != {expected[name]}:
            raise ValueError(f"{source} has {name}={values.pop()}, model config has {name}={expected[name]}")


# ------------------------------------------------------------------------------------------------------ copy
def copy_cache(cache: TurboQuantCache) -> TurboQuantCache:
    """An independent copy of ``cache``: every tensor cloned (the valid packed tokens only, for the dynamic layout),
    the quantizers, settings and model config shared. Neither sees the other's later tokens."""
    duplicate = copy.copy(cache)
    duplicate.layers = [_copy_layer(layer) for layer in cache.layers]
    if cache.layer_class_to_replicate is not None:  # bound to the original: would count the original's layers
        duplicate.layer_class_to_replicate = duplicate._next_layer
    return duplicate


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone(memory_format=torch.contiguous_format)
    if isinstance(value, dict):
        return {key: _clone(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_clone(item) for item in value]
    return value


def _copy_layer(layer):
    from .cache import StaticTurboQuantLayer, TurboQuantLayer

    duplicate = copy.copy(layer)
    for name, value in vars(layer).items():
        if name not in ("storage", "settings", "_reader_config"):
            vars(duplicate)[name] = _clone(value)
    if isinstance(layer, TurboQuantLayer):  # the offloading host copy stays the original's: the copy makes its own
        layer.wait_for_prefetch()
        duplicate._host_slots = duplicate._fetched = None
    if isinstance(layer, TurboQuantLayer) and layer.storage is not None:
        storage = copy.copy(layer.storage)
        if isinstance(layer, StaticTurboQuantLayer):  # every slot: the static layout never grows
            storage.keys, storage.values = (slots._map(_clone) for slots in (storage.keys, storage.values))
        else:
            storage.keys, storage.values = (slots._map(_clone) for slots in storage.past())
        storage.window_keys, storage.window_values = _clone(storage.window_keys), _clone(storage.window_values)
        storage.sink_keys, storage.sink_values = _clone(storage.sink_keys), _clone(storage.sink_values)
        storage.key_offset = _clone(storage.key_offset)
        storage.key_channels, storage.value_channels = _clone(storage.key_channels), _clone(storage.value_channels)
        duplicate.storage = storage
        if isinstance(layer, StaticTurboQuantLayer):  # fixed addresses, as lazy_initialization marks them
            for tensor in (*storage.tensors(), duplicate.lengths):
                torch._dynamo.mark_static_address(tensor)
    return duplicate
