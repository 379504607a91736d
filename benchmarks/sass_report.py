"""Compile the fused attention kernel for sm_90 on any machine (no GPU) and report what the hardware would run.

    python benchmarks/sass_report.py --bits 4 --block-n 128 --warps 4
    python benchmarks/sass_report.py --fast     # the Gluon twin (decode_attention_fast, 4 bits, head_dim 128)
    PYTHONPATH=/tmp/triton36 python benchmarks/sass_report.py ...   # the GPU image's Triton, installed with
                                                                     # pip install --target /tmp/triton36 triton==3.6.0

Prints ptxas's register / spill report and the instruction mix of the kernel's hottest loop (the one with the
most global loads: the compressed-token loop), per warp and per token and kv head. Integer arguments get the
specializations Triton gives them at run time (strides of 1 become constants, pointers and strides are marked
divisible by 16), otherwise the compiler cannot vectorize loads and the report would mislead. Uses the ptxas and
cuobjdump that Triton uses and ships in its NVIDIA backend. Needs no CUDA device: costs no device time.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from turboquant_hf.kernels.decode_attention import _attention_config, _phases, _split_kernel  # noqa: E402
from turboquant_hf.kernels import decode_attention_fast  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
PTXAS = get_ptxas(90).path  # the ptxas this Triton itself uses for sm_90
# Strides that are 1 for the tensors the cache hands over (contiguous last dims): Triton makes them constants.
UNIT_STRIDES = ("stride_qd", "stride_kpbyte", "stride_vpbyte", "stride_rkd", "stride_rvd", "stride_mn")
POINTERS = {"query_ptr": "*bf16", "q_rot_ptr": "*fp32", "k_packed_ptr": "*u8", "v_packed_ptr": "*u8",
            "k_scales_ptr": "*fp32", "v_scales_ptr": "*fp32", "rk_ptr": "*bf16", "rv_ptr": "*bf16", "mask_ptr": "*bf16",
            "part_out_ptr": "*fp32", "length_ptr": "*i64", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32",
            "bias_ptr": "*fp32"}
INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")


def compile_split_kernel(args) -> tuple[str, str]:
    """(ptxas -v report, SASS) of _split_kernel for sm_90a with the given constexprs."""
    table = "*i64" if args.bits in (1, 2) else ("*fp16" if args.bits == 8 else "*i32")
    constants = {"HEAD_DIM": args.head_dim, "BLOCK_R": 16, "BLOCK_N": args.block_n,
                 "RESIDUAL_BLOCK_N": args.residual_block_n, "K_BITS": args.bits,
                 "V_BITS": args.bits, "K_PHASES": _phases(args.bits, args.head_dim),
                 "V_PHASES": _phases(args.bits, args.head_dim), "HAS_RESIDUAL": not args.no_residual,
                 "MASK_KIND": 0, "USE_SOFTCAP": False, "DEVICE_LENGTH": False, "HAS_BIAS": False,
                 **{name: 1 for name in UNIT_STRIDES}}
    signature, divisible = {}, []
    kernel = decode_attention_fast._fast_split_kernel if args.fast else _split_kernel
    for index, name in enumerate(inspect.signature(kernel.fn).parameters):
        if name in constants:
            signature[name] = "constexpr"
        elif name in POINTERS or name in ("k_table_ptr", "v_table_ptr"):
            signature[name] = POINTERS.get(name, table)
            divisible.append(index)
        elif name in ("scale", "softcap"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride") and name not in ("stride_mb", "stride_mh", "stride_mm"):
                divisible.append(index)
    attrs = {(index,): [["tt.divisibility", 16]] for index in divisible}
    constants = {name: value for name, value in constants.items() if name in signature}
    if args.fast:
        from triton.experimental.gluon._runtime import GluonASTSource

        source = GluonASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    else:
        source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": args.warps, "num_stages": args.stages})
    if args.dump:
        for stage in ("ttgir", "ptx"):
            Path(f"{args.dump}.{stage}").write_text(compiled.asm[stage])
    with tempfile.TemporaryDirectory() as folder:
        ptx, cubin = Path(folder) / "k.ptx", Path(folder) / "k.cubin"
        ptx.write_text(compiled.asm["ptx"])
        assembled = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", ptx, "-o", cubin],
                                   capture_output=True, text=True)
        if assembled.returncode:
            sys.exit(f"ptxas failed: {assembled.stderr[-2000:]}")
        report = assembled.stderr
        sass = subprocess.run([BIN / "cuobjdump", "-sass", cubin], capture_output=True, text=True, check=True).stdout
    return report, sass


LOAD = re.compile(r"(?:@!?U?P\w+\s+)?LD(?:G|S)(?!M)")  # global and shared loads (not LDSM: operand moves)


def hottest_loop(sass: str) -> list[str]:
    """Instructions of the backward-branch loop with the most global and shared loads: the compressed-token loop
    (its table lookups are shared or global gathers; the dense window's loop has a few wide loads)."""
    instructions = [(int(m.group(1), 16), m.group(2)) for m in map(INSTRUCTION.search, sass.splitlines()) if m]
    best: list[str] = []
    for address, text in instructions:
        target = re.search(r"BRA\b.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < address:
            body = [t for a, t in instructions if int(target.group(1), 16) <= a <= address]
            if sum(bool(LOAD.match(t)) for t in body) > sum(bool(LOAD.match(t)) for t in best):
                best = body
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4, choices=(1, 2, 3, 4, 8))
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-n", type=int, default=128)
    parser.add_argument("--warps", type=int, default=4)
    parser.add_argument("--residual-block-n", type=int, help="tokens per step of the dense window's loop (default: "
                        "the kernel's own launch config)")
    parser.add_argument("--stages", type=int, help="num_stages (default: the kernel's own launch config)")
    parser.add_argument("--no-residual", action="store_true", help="compile without the dense-window branch")
    parser.add_argument("--fast", action="store_true", help="the Gluon twin (decode_attention_fast): 4 bits, "
                        "head_dim 128, 4 warps, 64 tokens per step (--bits, --block-n, --warps, --stages ignored)")
    parser.add_argument("--dump", help="also write the TTGIR and PTX to DUMP.ttgir, DUMP.ptx")
    args = parser.parse_args()
    if args.fast:
        args.bits, args.head_dim, args.warps = 4, decode_attention_fast.HEAD_DIM, decode_attention_fast.WARPS
    phased = _phases(args.bits, args.head_dim) > 1
    shipped = _attention_config(args.head_dim, 4, 64, phased, torch.device("cpu"))
    args.stages = shipped["num_stages"] if args.stages is None else args.stages
    if args.residual_block_n is None:
        args.residual_block_n = shipped["RESIDUAL_BLOCK_N"]
    report, sass = compile_split_kernel(args)
    print(f"triton {triton.__version__}, sm_90a, bits {args.bits}, head_dim {args.head_dim}, BLOCK_N {args.block_n}, "
          f"{args.warps} warps, {args.stages} stages")
    print(" ".join(line.split(":", 1)[-1].strip() for line in report.splitlines() if "Used" in line or "spill" in line))
    loop = hottest_loop(sass)
    opcodes = collections.Counter(re.match(r"(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", t).group(1) for t in loop)
    # Triton's kernel: each warp's loop iteration covers BLOCK_N tokens together with the other warps; the fast
    # kernel's warps each take their own TOKENS_PER_WARP tokens per iteration.
    tokens = decode_attention_fast.TOKENS_PER_WARP if args.fast else args.block_n / args.warps
    print(f"compressed-token loop: {len(loop)} instructions per warp per iteration = "
          f"{len(loop) / tokens:.1f} warp-instructions per token and kv head")
    print(", ".join(f"{op}:{count}" for op, count in opcodes.most_common(20)))


if __name__ == "__main__":
    main()
