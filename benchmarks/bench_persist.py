"""Save and load speed of a TurboQuantCache (issue 19: save and load at 1 GB/s or more on local disk; 1 GiB of
compressed cache onto the GPU in under 1.5 s).

    python benchmarks/bench_persist.py --gib 1 --out persist.json       # a GPU machine: about a minute
    python benchmarks/bench_persist.py --gib 0.05                       # CPU smoke test, under a minute

A TurboQuantCache(bits=--bits) of the 8B shape (32 layers, 8 kv heads, head_dim 128, bf16), no model: every layer
filled through ``cache.update`` with random K/V (bench_generate.py's ``fill``) until its packed tokens take --gib GiB.
Then, --repeats times each (the median is reported):
  save              cache.save(path): safetensors written from the tensors' memory into a temporary file of --dir,
                    the checksum taken alongside, fsync, atomic rename
  load-cpu cold     TurboQuantCache.load(path), the file first dropped from the page cache (posix_fadvise
                    DONTNEED: the bytes come from the disk, as in a fresh process on a fresh boot)
  load-cpu warm     the same, the file in the page cache (a reload soon after a save)
  load-cuda cold / warm   TurboQuantCache.load(path, device="cuda"), synchronized (when CUDA is available)
  checksum          the CRC-32s over every tensor that save writes and load verifies, in one pass (save and
                    load take them in a worker thread, overlapping the disk)
GB/s is the file's bytes (1e9 per GB) over the seconds. Printed first: the command, the machine and the filesystem
of --dir (a tmpfs is RAM, not a disk); then the file's size against the bytes of the packed tokens it holds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file

from bench_decode import machine_info, synchronize
from bench_generate import fill, llama_8b_config
from turboquant_hf import TurboQuantCache
from turboquant_hf.quantizer import shared_quantizer
from turboquant_hf.tensor_file import checksum


def filesystem(path: Path) -> str:
    """The type and device of the mount holding ``path`` (from /proc/mounts; "unknown" elsewhere)."""
    try:
        mounts = [line.split()[:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "unknown"
    resolved = str(path.resolve())
    device, point, kind = max((mount for mount in mounts
                               if resolved == mount[1] or resolved.startswith(mount[1].rstrip("/") + "/")),
                              key=lambda mount: len(mount[1]), default=("?", "?", "unknown"))
    return f"{kind} ({device} on {point})"


def drop_from_page_cache(path: Path) -> None:
    """Ask the kernel to forget the file's cached pages (clean after save's fsync), so the next read hits the disk."""
    if hasattr(os, "posix_fadvise"):
        handle = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(handle, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(handle)


def timed(action, repeats: int, before=None) -> float:
    """Median seconds of ``action()`` over ``repeats`` runs, ``before()`` untimed ahead of each."""
    seconds = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        action()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--gib", type=float, default=1.0, help="GiB of packed tokens in the cache")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the cache is filled (and saved from)")
    parser.add_argument("--dir", default=".", help="folder for the file (a local disk; default: here)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="JSON file")
    args = parser.parse_args()
    if args.gib <= 0 or args.repeats < 1:
        parser.error("--gib must be > 0 and --repeats >= 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_persist.py: no CUDA GPU here (use --device cpu)")
    machine = machine_info(device)
    machine.update(cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
                   filesystem=filesystem(Path(args.dir)))
    for key in ("command", "device", "cpu", "torch", "cuda", "triton", "transformers", "python", "filesystem"):
        print(f"{key}: {machine[key]}")

    config = llama_8b_config()
    heads, head_dim, layers = config.num_key_value_heads, config.head_dim, config.num_hidden_layers
    quantizer = shared_quantizer(head_dim, args.bits, False, "hadamard", 0, True)  # the cache's, for keys and values
    tokens = int(args.gib * 2**30 / (layers * heads * 2 * quantizer.bytes_per_vector))
    cache = TurboQuantCache(bits=args.bits)
    start = time.perf_counter()
    fill(SimpleNamespace(config=config, device=device, dtype=torch.bfloat16), cache, tokens, chunk=8192)
    synchronize(device)
    report = cache.memory_report()
    packed_bytes = sum(slots.nbytes for layer in cache.layers for slots in layer.storage.past())
    print(f"filled {tokens} tokens x {layers} layers in {time.perf_counter() - start:.1f} s: packed tokens "
          f"{packed_bytes / 2**30:.3f} GiB, the cache holds {report['compressed_bytes'] / 2**30:.3f} GiB "
          f"(spare capacity, dense windows of {report['window_tokens']} tokens, quantizer state)", flush=True)

    rows = {}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix=".bench_persist.") as folder:
        path = Path(folder) / "cache.safetensors"
        rows["save"] = timed(lambda: cache.save(path), args.repeats)
        file_bytes = path.stat().st_size
        tensors = load_file(path)  # what save checksums and load verifies
        rows["checksum"] = timed(lambda: checksum(tensors), args.repeats)
        del tensors
        targets = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        for target in targets:
            def load(target=target):
                loaded = TurboQuantCache.load(path, device=target)
                synchronize(torch.device(target))
                assert loaded.get_seq_length() == cache.get_seq_length()

            rows[f"load-{target} cold"] = timed(load, args.repeats, before=lambda: drop_from_page_cache(path))
            rows[f"load-{target} warm"] = timed(load, args.repeats)

    print(f"\nfile {file_bytes / 2**30:.3f} GiB = {file_bytes / packed_bytes:.4f} x the packed tokens' bytes "
          f"(+ the dense windows and the header)\n")
    print("| step | s (median) | GB/s of the file |\n|---|---|---|")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds:.3f} | {file_bytes / seconds / 1e9:.2f} |")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"machine": machine, "gib": args.gib, "bits": args.bits, "tokens": tokens, "layers": layers,
                       "packed_bytes": packed_bytes, "compressed_bytes": report["compressed_bytes"],
                       "file_bytes": file_bytes, "seconds": rows,
                       "gb_per_s": {name: file_bytes / seconds / 1e9 for name, seconds in rows.items()}},
                      handle, indent=1)


if __name__ == "__main__":
    main()
