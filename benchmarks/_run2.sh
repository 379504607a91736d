python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD:$PWD/benchmarks; python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
L=$OUT/run2.log
(timeout 150 python3 -m pytest tests/test_kernels.py -m gpu -q --tb=short -k "extreme_norms_match_torch and bfloat16-1e-39 or gpu_decode_attention" 2>&1 | grep -v "^  " | tail -40) > $L
mkdir -p /tmp/old && cp -r turboquant_hf /tmp/old/ && git show 28439a7:turboquant_hf/kernels/decode_attention.py > /tmp/old/turboquant_hf/kernels/decode_attention.py
(cd tests && PYTHONPATH=/tmp/old:/tmp/site timeout 100 python3 -m pytest test_kernels.py -m gpu -q --tb=line -k "gpu_decode_attention and N130944" -p no:cacheprovider 2>&1 | tail -4; PYTHONPATH=/tmp/old:/tmp/site python3 -c "import turboquant_hf.kernels.decode_attention as m;print(m.__file__, hasattr(m, \"_query_phase\"))") >> $L
timeout 200 python3 benchmarks/bench_decode.py --layers 8 --batch 1 --prompt 256 --configs static-compile tq4-static-compile --steps 16 --profile 4 --out $OUT/profile_l8.json 2>&1 | grep -v warn > $OUT/h200_profile_l8_after.log
timeout 150 python3 benchmarks/bench_attention.py --out $OUT/h200_bench_attention.json > $OUT/h200_bench_attention.log 2>&1
tail -5 $OUT/h200_bench_attention.log >> $L; grep -E "^\||profile" $OUT/h200_profile_l8_after.log >> $L
