"""The Gluon split kernel (kernels/decode_attention_fast.py) against the Triton one and SDPA, on one GPU (issue 17).

    python benchmarks/probe_fast_split.py --out benchmarks/results/h200_fast_split.json

For B in (1, 8) and N in (4096, 8192, 16384, 32768, 32771, 131072) (Hq 32, Hkv 8, head_dim 128, TQ4, a 128-token
bf16 window, random packed K/V as in bench_attention.py): runs the whole decode attention (decode_attention_triton)
with the Triton split kernel and with the Gluon one (FAST_MIN_TOKENS set to force either), compares the outputs of
fp32 queries (max |diff| / max |ref| <= 1e-5), times both on bf16 queries and SDPA (enable_gqa, bf16 K/V of the
same N) as CUDA graph replays (median of 50), and prints a table. Small cases also run against the torch reference
and the Triton kernel: plain, with a mask, a softcap and 3 query tokens, the static layout (DEVICE_LENGTH) with and
without a mask, and centered keys (key_offset) with a softcap. A failure (compile error, mismatch) is recorded per
case and the others still run; the exit code is 1 if any case failed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import platform
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from turboquant_hf import TurboQuantizer  # noqa: E402
# importlib: the package's `decode_attention` attribute is the dispatching function, not the module.
attention = importlib.import_module("turboquant_hf.kernels.decode_attention")
fast = importlib.import_module("turboquant_hf.kernels.decode_attention_fast")

_spec = importlib.util.spec_from_file_location("bench_attention", ROOT / "benchmarks" / "bench_attention.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

Q_HEADS, KV_HEADS, HEAD_DIM, RESIDUAL = 32, 8, 128, 128
TOLERANCE = 1e-5


@contextlib.contextmanager
def fast_split(on: bool):
    """decode_attention_triton with the Gluon split kernel forced on (from 0 packed tokens) or off."""
    original = attention.FAST_MIN_TOKENS
    attention.FAST_MIN_TOKENS = 0 if on else 1 << 62
    try:
        yield
    finally:
        attention.FAST_MIN_TOKENS = original


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def timed_case(quantizer, batch: int, length: int, timing: bool) -> dict:
    row = {"batch": batch, "length": length}
    query = torch.randn(batch, Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    keys = bench.random_quantized(quantizer, batch, length - RESIDUAL)
    values = bench.random_quantized(quantizer, batch, length - RESIDUAL)
    window_k = torch.randn(batch, KV_HEADS, RESIDUAL, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    window_v = torch.randn_like(window_k)

    def run(query=query):
        return attention.decode_attention_triton(query, keys, values, quantizer, quantizer, window_k, window_v,
                                                 scale=HEAD_DIM**-0.5)

    # Correctness on fp32 queries (fp32 outputs): a bf16 output rounds both kernels' results, 1 ulp = 2^-8.
    with fast_split(False):
        expected = run(query.float())
        if timing:
            row["triton_us"] = bench.median_us(run, graph=True)
    try:
        with fast_split(True):
            actual = run(query.float())
            torch.cuda.synchronize()
            row["rel_diff"] = relative(actual, expected)
            row["ok"] = bool(row["rel_diff"] <= TOLERANCE)
            if timing:
                row["fast_us"] = bench.median_us(run, graph=True)
    except Exception as error:  # noqa: BLE001 -- a compile or launch failure is a result, reported per case
        row["ok"], row["error"] = False, f"{type(error).__name__}: {error}"[-3000:]
        traceback.print_exc()
    del keys, values
    if timing:
        dense_k = torch.randn(batch, KV_HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        dense_v = torch.randn_like(dense_k)
        row["sdpa_us"] = bench.median_us(
            lambda: F.scaled_dot_product_attention(query, dense_k, dense_v, enable_gqa=True), graph=True)
        del dense_k, dense_v
    torch.cuda.empty_cache()
    return row


def reference_case(quantizer, name: str, n_queries: int = 1, softcap=None, mask: bool = False,
                   static: bool = False, offset: bool = False) -> dict:
    """A small case against the float64 torch reference and the Triton kernel."""
    batch, length = 2, 1000
    row = {"case": name}
    query = torch.randn(batch, Q_HEADS, n_queries, HEAD_DIM, device="cuda", dtype=torch.float32)
    keys = bench.random_quantized(quantizer, batch, length)
    values = bench.random_quantized(quantizer, batch, length)
    window_k = torch.randn(batch, KV_HEADS, 48, HEAD_DIM, device="cuda")
    window_v = torch.randn_like(window_k)
    kwargs = {"scale": HEAD_DIM**-0.5, "softcap": softcap}
    if static:
        # Static layout: every slot packed, the ring repeats the newest 48 tokens; 900 tokens valid.
        kwargs["length"] = torch.tensor([900, 0], device="cuda", dtype=torch.int64)
    if offset:  # centered packed keys (the dynamic layout's default): a per-row logit bias in both kernels
        kwargs["key_offset"] = 5 * torch.randn(batch, KV_HEADS, 1, HEAD_DIM, device="cuda")
    kv_len = length + (0 if static else 48)
    if mask:
        allowed = torch.rand(batch, 1, n_queries, kv_len, device="cuda") > 0.3
        allowed[..., -1] = True
        kwargs["attention_mask"] = allowed
    args = (query, keys, values, quantizer, quantizer, window_k, window_v)
    with fast_split(False):
        expected = attention.decode_attention_triton(*args, **kwargs)
    reference = attention.decode_attention_torch(query.double(), keys, values, quantizer, quantizer,
                                                 window_k.double(), window_v.double(), **kwargs)
    try:
        with fast_split(True):
            actual = attention.decode_attention_triton(*args, **kwargs)
        row["rel_diff_vs_triton"] = relative(actual, expected)
        row["rel_diff_vs_float64"] = relative(actual, reference)
        row["triton_rel_diff_vs_float64"] = relative(expected, reference)
        row["ok"] = bool(row["rel_diff_vs_triton"] <= TOLERANCE and row["rel_diff_vs_float64"] <= TOLERANCE)
    except Exception as error:  # noqa: BLE001
        row["ok"], row["error"] = False, f"{type(error).__name__}: {error}"[-3000:]
        traceback.print_exc()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 32771, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda")
    quantizer = TurboQuantizer(HEAD_DIM, 4, device="cuda")
    results = {"command": " ".join(sys.argv), "machine": torch.cuda.get_device_name(device),
               "torch": torch.__version__, "triton": attention.triton.__version__, "python": platform.python_version(),
               "available": fast.fast_split_runs(device) and fast.fast_split_covers(quantizer, quantizer,
                                                                                    HEAD_DIM),
               "reference": [], "timing": []}
    print(f"{results['machine']}, torch {results['torch']}, triton {results['triton']}; "
          f"Gluon split kernel available: {results['available']}\n$ {results['command']}", flush=True)
    if not results["available"]:  # both runs would take the Triton kernel and agree trivially
        sys.exit("the Gluon split kernel cannot run here (needs CUDA sm_80+ and a Triton with Gluon)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for name, options in (("plain", {}), ("mask+softcap+3 queries", {"n_queries": 3, "softcap": 30.0, "mask": True}),
                          ("static layout", {"static": True}), ("static + mask", {"static": True, "mask": True}),
                          ("key offset + softcap", {"offset": True, "softcap": 30.0})):
        row = reference_case(quantizer, name, **options)
        results["reference"].append(row)
        print(json.dumps(row), flush=True)
    print(f"{'B':>2} {'N':>7} {'triton us':>10} {'fast us':>9} {'sdpa us':>9} {'triton/sdpa':>11} {'fast/sdpa':>9} "
          f"{'rel diff':>9}  ok", flush=True)
    for batch in args.batches:
        for length in args.lengths:
            row = timed_case(quantizer, batch, length, timing=True)
            results["timing"].append(row)
            sdpa = row.get("sdpa_us", float("nan"))
            print(f"{batch:>2} {length:>7} {row.get('triton_us', float('nan')):>10.1f} "
                  f"{row.get('fast_us', float('nan')):>9.1f} {sdpa:>9.1f} "
                  f"{row.get('triton_us', float('nan')) / sdpa:>11.2f} {row.get('fast_us', float('nan')) / sdpa:>9.2f} "
                  f"{row.get('rel_diff', float('nan')):>9.1e}  {row['ok']}", flush=True)
            Path(args.out).write_text(json.dumps(results, indent=1))
    Path(args.out).write_text(json.dumps(results, indent=1))
    failed = [row for row in results["reference"] + results["timing"] if not row["ok"]]
    print(f"{len(failed)} failed" if failed else "all ok")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
