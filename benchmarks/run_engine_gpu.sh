#!/usr/bin/env bash
# The executors side by side on one CUDA GPU, in one command (the README's results table):
#   benchmarks/run_engine_gpu.sh OUTDIR
# prefix 8K and rag K=8 on the llama-3.1-8b shape (random weights, bf16), spanctx on the
# eager executor, the static one (CUDA graphs) and the static one compiled, each run with
# its own full-prefill and hf-deepcopy baselines; then the cost of the model fingerprint
# on the 8B shape, and the static executor's tests on the GPU. Everything lands in OUTDIR.
set -uo pipefail
OUTDIR=${1:?usage: benchmarks/run_engine_gpu.sh OUTDIR}
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUTDIR"
python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__, torch.cuda.get_device_name())"
common=(--model llama-3.1-8b --device cuda --warmup 1 --repeats 5,rag=3 --contexts 8192 --question-tokens 64
        --new-tokens 32,rag=16 --rag-docs 8 --rag-doc-tokens 512 --rag-pool 16 --rag-system-tokens 128
        --rag-fidelity-prompts 4 --no-progress --out "$OUTDIR" --methods full,hf-deepcopy,spanctx,spanctx-parallel:none)
for executor in eager static; do
    timeout 170 python3 -m spanctx.bench prefix rag --executor "$executor" "${common[@]}" 2>&1 | tail -25
done
timeout 200 python3 -m spanctx.bench prefix --executor static --compile "${common[@]}" 2>&1 | tail -12
timeout 60 python3 benchmarks/fingerprint_cost.py 2>&1 | tail -3
SPANCTX_TEST_DEVICE=cuda timeout 90 python3 -m pytest -q -x -p no:cacheprovider tests/test_static.py 2>&1 | tail -4
