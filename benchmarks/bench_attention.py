"""Decode attention over a TurboQuant cache vs bf16 SDPA, against memory floors, on one CUDA GPU.

    python benchmarks/bench_attention.py --out out/bench_attention.json [--sweep]

Shapes: bf16, Hq=32, Hkv=8, D=128, one new query token, B in {1, 8}, kv length N in {4K, 32K, 128K}.
The TurboQuant cache holds N - 128 compressed tokens plus a 128-token bf16 residual window (same total
length as SDPA's N). Packed data is random: speed does not depend on the values. Times are medians of
CUDA-event pairs around each of 50 calls after warm-up, "eager" (each call launched from Python, as in
generate) and "graph" (the same call captured once in a CUDA graph and replayed: kernel time without
the launch overhead). Memory floor = bytes the call must read and write / device-to-device copy
bandwidth measured in the same run. Also reports encode and dequantize throughput (graph replay) as a share of
that bandwidth. --sweep times alternative launch configs of the fused kernel and of encode and dequantize.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from turboquant_hf import QuantizedTensor, TurboQuantizer  # noqa: E402

attention = importlib.import_module("turboquant_hf.kernels.decode_attention")
encode = importlib.import_module("turboquant_hf.kernels.encode")
dequant = importlib.import_module("turboquant_hf.kernels.dequant")

Q_HEADS, KV_HEADS, HEAD_DIM, RESIDUAL = 32, 8, 128, 128
BATCHES, LENGTHS, BITS = (1, 8), (4096, 32768, 131072), (4, 3, 2)


def median_us(fn, calls: int = 50, warmup: int = 10, graph: bool = False) -> float:
    """Median over ``calls`` of the CUDA-event time around one call of fn (or, with ``graph``, one replay of
    a CUDA graph that captured one call), in microseconds."""
    for _ in range(warmup):
        fn()
    if graph:
        torch.cuda.synchronize()
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            fn()
        fn = captured.replay
        for _ in range(3):
            fn()
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(calls)]
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in pairs) * 1e3


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (a copy reads and writes each byte)."""
    source = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    return 2 * nbytes / (median_us(lambda: target.copy_(source), calls=20) * 1e-6)


def random_quantized(quantizer: TurboQuantizer, batch: int, length: int) -> QuantizedTensor:
    packed = torch.randint(0, 256, (batch, KV_HEADS, length, quantizer.dim * quantizer.mse_bits // 8),
                           dtype=torch.uint8, device="cuda")
    norms = torch.rand(batch, KV_HEADS, length, device="cuda") * 4 + 9
    return QuantizedTensor(packed, norms, None, None, quantizer.dim, quantizer.mse_bits, torch.bfloat16)


def attention_rows(bandwidth: float, quantizers: dict) -> list[dict]:
    rows = []
    for batch in BATCHES:
        for length in LENGTHS:
            query = torch.randn(batch, Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            keys = torch.randn(batch, KV_HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            values = torch.randn_like(keys)
            io_bytes = 2 * query.numel() * query.element_size()
            sdpa_bytes = 2 * keys.numel() * keys.element_size() + io_bytes
            def sdpa():
                return F.scaled_dot_product_attention(query, keys, values, enable_gqa=True)

            rows.append({"batch": batch, "length": length, "method": "sdpa bf16", "us": median_us(sdpa),
                         "graph_us": median_us(sdpa, graph=True), "bytes": sdpa_bytes})
            residual_keys, residual_values = keys[:, :, -RESIDUAL:].clone(), values[:, :, -RESIDUAL:].clone()
            del keys, values
            for bits in BITS:
                quantizer = quantizers[bits]
                compressed_keys = random_quantized(quantizer, batch, length - RESIDUAL)
                compressed_values = random_quantized(quantizer, batch, length - RESIDUAL)
                tq_bytes = (sum(t.numel() * t.element_size() for q in (compressed_keys, compressed_values)
                                for t in q.tensors())
                            + 2 * residual_keys.numel() * residual_keys.element_size() + io_bytes)

                def fused():
                    return attention.decode_attention_triton(query, compressed_keys, compressed_values, quantizer,
                                                             quantizer, residual_keys, residual_values,
                                                             scale=HEAD_DIM**-0.5)

                rows.append({"batch": batch, "length": length, "method": f"TQ{bits} fused", "us": median_us(fused),
                             "graph_us": median_us(fused, graph=True), "bytes": tq_bytes})
                del compressed_keys, compressed_values
            torch.cuda.empty_cache()
    for row in rows:
        sdpa = next(r for r in rows if (r["batch"], r["length"], r["method"]) == (row["batch"], row["length"],
                                                                                  "sdpa bf16"))
        row["floor_us"] = row["bytes"] / bandwidth * 1e6
        row["speedup_vs_sdpa"] = sdpa["us"] / row["us"]
        row["graph_time_vs_sdpa"] = row["graph_us"] / sdpa["graph_us"]
    return rows


def codec_rows(bandwidth: float, quantizers: dict, ops: tuple = (encode, dequant)) -> list[dict]:
    """Encode (bf16 -> storage) and dequantize (storage -> bf16) of 8 heads x 64K tokens, for each quantizer."""
    rows = []
    batch, length = 1, 65536
    x = torch.randn(batch, KV_HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(x)
    for bits, quantizer in quantizers.items():
        storage = random_quantized(quantizer, batch, length)
        packed_bytes = sum(t.numel() * t.element_size() for t in storage.tensors())
        dense_bytes = x.numel() * x.element_size()
        calls = {encode: ("encode", lambda: encode.encode_into_triton(x, quantizer, storage, 0)),
                 dequant: ("dequantize", lambda: dequant.dequantize_into_triton(storage, quantizer, out))}
        for name, fn in (calls[op] for op in ops):
            us, graph_us = median_us(fn, calls=20), median_us(fn, calls=20, graph=True)
            moved = packed_bytes + dense_bytes
            rows.append({"op": name, "bits": bits, "vectors": batch * KV_HEADS * length, "us": us, "graph_us": graph_us,
                         "bytes": moved, "percent_of_bandwidth": 100 * moved / (graph_us * 1e-6) / bandwidth})
    return rows


# (BLOCK_N, num_warps, waves, num_stages); waves = programs per SM that the split count aims for
SWEEP_LAUNCHES = [(block_n, warps, waves, stages) for block_n, warps in ((128, 4), (64, 4), (32, 4), (64, 8))
                  for stages in (1, 2) for waves in (2, 3, 4, 6, 8, 12, 16)]
SWEEP_SHAPES = [(1, 32768), (1, 131072), (8, 32768), (8, 131072)]
# (elements per program = BLOCK_M * head_dim, num_warps) of the encode and dequantize kernels
CODEC_LAUNCHES = [(2048, 4), (4096, 4), (8192, 4), (8192, 8), (16384, 8)]


def codec_sweep_rows(bandwidth: float, quantizers: dict) -> list[dict]:
    """Encode and dequantize (TQ4 and TQ2, as in codec_rows) under alternative launches (CODEC_LAUNCHES)."""
    rows = []
    for module in (encode, dequant):
        default = dict(module._LAUNCH["cuda"])
        for elements, warps in CODEC_LAUNCHES:
            module._LAUNCH["cuda"].update(elements=elements, num_warps=warps)
            try:
                for row in codec_rows(bandwidth, {bits: quantizers[bits] for bits in (4, 2)}, ops=(module,)):
                    rows.append({**row, "elements": elements, "num_warps": warps})
            except Exception as error:  # a launch that does not compile or fit is a result too
                print(f"codec sweep {module.__name__} {(elements, warps)}: {type(error).__name__}: {error}"[:300])
            finally:
                module._LAUNCH["cuda"].update(default)
    return rows


def sweep_rows(quantizers: dict) -> list[dict]:
    """Fused attention under alternative launch configs (SWEEP_LAUNCHES), graph replay, with the 128-token bf16
    window that the timed rows have (the window's branch is compiled in, as in generate)."""
    default_config = attention._attention_config
    rows = []
    for bits in BITS:
        quantizer = quantizers[bits]
        for batch, length in SWEEP_SHAPES:
            query = torch.randn(batch, Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            keys = random_quantized(quantizer, batch, length - RESIDUAL)
            values = random_quantized(quantizer, batch, length - RESIDUAL)
            window = torch.randn(2, batch, KV_HEADS, RESIDUAL, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            for block_n, warps, waves, stages in SWEEP_LAUNCHES:
                def config(*args, **kwargs):
                    return {**default_config(*args, **kwargs), "BLOCK_N": block_n, "num_warps": warps, "waves": waves,
                            "num_stages": stages}

                attention._attention_config = config
                try:
                    us = median_us(lambda: attention.decode_attention_triton(
                        query, keys, values, quantizer, quantizer, window[0], window[1], scale=HEAD_DIM**-0.5),
                        graph=True)
                except Exception as error:  # a config that does not compile or fit is a result too
                    us = float("nan")
                    print(f"sweep bits={bits} {(block_n, warps, waves, stages)}: "
                          f"{type(error).__name__}: {error}"[:300])
                finally:
                    attention._attention_config = default_config
                rows.append({"bits": bits, "batch": batch, "length": length, "BLOCK_N": block_n, "num_warps": warps,
                             "waves": waves, "num_stages": stages, "us": us})
            del keys, values, window
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--sweep", action="store_true", help="also time alternative launch configs")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA GPU")
    torch.manual_seed(0)
    gpu = torch.cuda.get_device_name()
    quantizers = {bits: TurboQuantizer(HEAD_DIM, bits, device="cuda") for bits in BITS}
    bandwidth = copy_bandwidth()

    # Guard against timing a broken kernel: TQ4 fused vs the torch twin on a small random cache.
    quantizer = quantizers[4]
    query = torch.randn(1, Q_HEADS, 1, HEAD_DIM, device="cuda")  # fp32 output: no bf16 rounding in the check
    keys, values = random_quantized(quantizer, 1, 1000), random_quantized(quantizer, 1, 1000)
    call = (query, keys, values, quantizer, quantizer, None, None)
    fused = attention.decode_attention_triton(*call, scale=HEAD_DIM**-0.5).float()
    twin = attention.decode_attention_torch(*call, scale=HEAD_DIM**-0.5).float()
    check_error = ((fused - twin).abs().max() / twin.abs().max()).item()
    assert check_error < 1e-4, f"fused attention disagrees with the torch twin: {check_error:.2e}"

    results = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "twin_check_relative_error": check_error,
        "attention": attention_rows(bandwidth, quantizers),
        "codec": codec_rows(bandwidth, quantizers),
    }
    if args.sweep:
        results["sweep"] = sweep_rows(quantizers)
        results["codec_sweep"] = codec_sweep_rows(bandwidth, quantizers)

    print(f"`{results['command']}` on {gpu}, torch {torch.__version__}, triton {triton.__version__}, "
          f"copy bandwidth {bandwidth / 1e9:.0f} GB/s\n")
    print("| B | N | method | eager (us) | graph (us) | memory floor (us) | floor / graph time "
          "| graph time / SDPA's |")
    print("|---|---|---|---|---|---|---|---|")
    for row in results["attention"]:
        print(f"| {row['batch']} | {row['length']} | {row['method']} | {row['us']:.1f} | {row['graph_us']:.1f} "
              f"| {row['floor_us']:.1f} | {100 * row['floor_us'] / row['graph_us']:.0f}% "
              f"| {row['graph_time_vs_sdpa']:.2f} |")
    print("\n| op | bits | vectors | eager (us) | graph (us) | % of copy bandwidth (graph) |")
    print("|---|---|---|---|---|---|")
    for row in results["codec"]:
        print(f"| {row['op']} | {row['bits']} | {row['vectors']} | {row['us']:.1f} | {row['graph_us']:.1f} "
              f"| {row['percent_of_bandwidth']:.0f}% |")
    if args.sweep:
        print("\n| bits | B | N | BLOCK_N | warps | waves | stages | graph time (us) |")
        print("|---|---|---|---|---|---|---|---|")
        for row in results["sweep"]:
            print(f"| {row['bits']} | {row['batch']} | {row['length']} | {row['BLOCK_N']} | {row['num_warps']} "
                  f"| {row['waves']} | {row['num_stages']} | {row['us']:.1f} |")
        print("\n| op | bits | elements per program | warps | graph time (us) | % of copy bandwidth |")
        print("|---|---|---|---|---|---|")
        for row in results["codec_sweep"]:
            print(f"| {row['op']} | {row['bits']} | {row['elements']} | {row['num_warps']} | {row['graph_us']:.1f} "
                  f"| {row['percent_of_bandwidth']:.0f}% |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
