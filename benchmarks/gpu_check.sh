#!/usr/bin/env bash
# Everything this repo measures on a CUDA GPU, in one call: GPU kernel tests, decode-attention and codec
# benchmark, end-to-end generate on an 8B-shaped random Llama, the eval CLI's speed command, and greedy agreement
# of the fused path with the default one. Logs and JSON go to $OUT (default ./out), at most 8 files.
#   bash benchmarks/gpu_check.sh [STEP ...]     steps: tests attention generate speed agreement (default: all)
# Every step runs even when an earlier one fails; status.log lists each step's exit code, and the exit status
# is nonzero if any step failed.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"  # works without the editable install too
export PIP_DISABLE_PIP_VERSION_CHECK=1
STEPS=("$@")
[ ${#STEPS[@]} -gt 0 ] || STEPS=(tests attention generate speed agreement)

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

failed=0
for step in "${STEPS[@]}"; do
    case $step in
        tests)
            run_step tests bash -c "python -m pytest tests/test_kernels.py -m gpu -q -rs 2>&1 | tee '$OUT/tests.log'" ;;
        attention)
            run_step attention bash -c "python benchmarks/bench_attention.py --out '$OUT/bench_attention.json' 2>&1 \
                | tee '$OUT/bench_attention.log'" ;;
        generate)
            run_step generate bash -c "python benchmarks/bench_generate.py --prompt 32768 --new 128 --batch 1 8 \
                --out '$OUT/bench_generate.json' 2>&1 | tail -12" ;;
        speed)
            # The eval CLI on random weights: a folder with only the 8B-shaped config (see bench_generate.py).
            run_step speed bash -c "python -c 'import bench_generate as b, sys; \
b.llama_8b_config(32).save_pretrained(sys.argv[1])' /tmp/llama-8b-shape && \
                python -m turboquant_hf.eval speed --model /tmp/llama-8b-shape --attn-implementation turboquant \
                --prompt-tokens 8192 --batch 4 --new-tokens 32 --caches dynamic,tq4,tq3,tq2,k4v3,fp8 --quiet \
                --json '$OUT/eval_speed.json' --markdown '$OUT/eval_speed.md'" ;;
        agreement)
            run_step agreement bash -c "python benchmarks/check_fused_agreement.py --layers 8 --prompt 4096 --new 64 \
                2>&1 | tail -3" ;;
        *)
            echo "unknown step $step (tests attention generate speed agreement)"; false ;;
    esac
    [ $? -eq 0 ] || failed=1
done
exit $failed
