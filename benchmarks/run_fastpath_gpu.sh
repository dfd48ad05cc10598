#!/usr/bin/env bash
# Issue 19's fast-path targets on one CUDA GPU, in one command, each beside its baseline
# measured in the same run (Llama-3.1-8B shape, random weights, bf16, sdpa, executor auto):
#   bash benchmarks/run_fastpath_gpu.sh OUTDIR            # the GPU run, ~8.5 minutes at most
#   bash benchmarks/run_fastpath_gpu.sh --smoke OUTDIR    # every section on tiny-llama on CPU, ~1-2 minutes
# Sections, each in its own process under a hard `timeout` (a cut section loses only itself):
#   bench  prefix 8K (TTFT, decode vs the weights-read floor), 10 aLoRA checks on 4K, rag K=8
#          parallel none: `python -m spanctx.bench prefix rag checks`
#   chat   a growing chat in a FRESH process, then a warm second pass, then 10 aLoRA checks on 4K
#          (the first call beside the later ones): benchmarks/fastpath_bench.py chat
#   long   a 32K cached prefix + a 64-token question: fastpath_bench.py long
#   batch  generate_batch of 8 rows over a shared 4K vs one row: fastpath_bench.py batch
#   mellea the Mellea program (benchmarks/mellea/bench.py) vs stock LocalHFBackend, with Mellea
#          from the wheels in .whl/ (carried) when the interpreter has none; skipped, saying so, without
# Carried wheels (python 3.12, x86-64; 12 files, 7.2 MiB): mellea 0.8.0, llguidance 1.9.1, pydantic 2.14.4,
# pydantic_core 2.50.5, annotated-types 0.8.0, typing-inspection 0.4.5, typing_extensions 4.16.0, requests 2.32.5,
# urllib3 2.8.0, idna 3.20, certifi 2026.10.19.post1, charset_normalizer 3.5.3 (benchmarks/mellea/carried.py: the
# image's packages win where it has them). Run from a checkout holding them in .whl/, with carry [".whl"].
# OUTDIR gets fastpath.json, fastpath.md, fastpath.log and sections/*.json (8 files); the
# table is rewritten after every section, so a run cut short keeps what finished.
set -uo pipefail
SMOKE=${FASTPATH_SMOKE:-0}
if [[ ${1:-} == --smoke ]]; then SMOKE=1; shift; fi
OUTDIR=${1:?usage: bash benchmarks/run_fastpath_gpu.sh [--smoke] OUTDIR}
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUTDIR/sections"
OUTDIR=$(cd "$OUTDIR" && pwd)
WORK=$(mktemp -d /tmp/fastpath.XXXXXX)
exec > >(tee -a "$OUTDIR/fastpath.log") 2>&1

if [[ $SMOKE == 1 ]]; then  # the same code paths on a tiny model, small sizes
    M=(--model tiny-llama --device cpu)
    BENCH=(--contexts 512 --checks-context 256 --checks 3 --rag-doc-tokens 32 --rag-pool 12 --rag-system-tokens 16
           --rag-fidelity-prompts 1 --repeats 2 --new-tokens 8)
    CHAT=(--turns 4 --system-tokens 128 --new-tokens 8 --checks 3 --checks-context 256); LONG=(--context 4096 --repeats 2 --full-repeats 1)
    BATCH=(--context 256 --new-tokens 8 --repeats 2); MELLEA=(--report-tokens 256 --new-tokens 8 --repeats 1)
    LIMITS=(bench=120 chat=60 long=60 batch=60 mellea=90); REPORT=(--smoke)
else
    M=(--model llama-3.1-8b --device cuda)
    BENCH=(--contexts 8192 --checks-context 4096 --checks 10 --rag-doc-tokens 512 --rag-pool 16
           --rag-system-tokens 128 --rag-fidelity-prompts 2 --repeats 5,rag=3,checks=3 --new-tokens 32,rag=16)
    CHAT=(); LONG=(); BATCH=(); MELLEA=(--report-tokens 8192 --repeats 1)
    LIMITS=(bench=160 chat=100 long=70 batch=60 mellea=120); REPORT=()
fi
declare -A LIMIT; for kv in "${LIMITS[@]}"; do LIMIT[${kv%=*}]=${kv#*=}; done

report() {
    python3 benchmarks/fastpath_report.py "$OUTDIR" --runs "$WORK/runs.jsonl" "${REPORT[@]}" > "$WORK/table.md" \
        || echo "!! the report failed (the sections' JSON stays in $OUTDIR/sections)"
}

section() {  # section NAME FROM COMMAND...: run under NAME's limit; FROM (if not -): the folder whose JSON
             # becomes sections/NAME.json; record rc and seconds; rewrite the table
    local name=$1 from=$2 limit=${LIMIT[$1]} started=$SECONDS rc; shift 2
    echo; echo "=== $name (limit ${limit} s) ==="
    timeout --kill-after=15 "$limit" "$@"; rc=$?
    [[ $rc == 0 ]] || echo "!! section $name ended with rc $rc$( ((rc == 124 || rc == 137)) && echo ' (TIMED OUT)')"
    if [[ $from != - ]]; then  # written as it went (bench: after each scenario), so a cut run keeps some
        cp "$from"/*.json "$OUTDIR/sections/$name.json" 2>/dev/null || echo "!! section $name wrote no JSON"
    fi
    echo "=== $name: rc $rc, $((SECONDS - started)) s ==="
    printf '{"section": "%s", "rc": %d, "seconds": %d, "limit_s": %d}\n' "$name" "$rc" $((SECONDS - started)) "$limit" \
        >> "$WORK/runs.jsonl"
    report
}

python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__,
'peft', peft.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA'); import datetime;
print(datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'))"

section bench "$WORK/bench" python3 -m spanctx.bench prefix rag checks "${M[@]}" --executor auto --attn sdpa --warmup 1 \
    --question-tokens 64 --rag-docs 8 --methods full,spanctx,spanctx-parallel:none --no-progress --out "$WORK/bench" \
    "${BENCH[@]}"
for name in chat long batch; do
    args=("${M[@]}" --out "$OUTDIR/sections/$name.json")
    case $name in chat) args+=("${CHAT[@]}");; long) args+=("${LONG[@]}");; batch) args+=("${BATCH[@]}");; esac
    section $name - python3 benchmarks/fastpath_bench.py $name "${args[@]}"
done

# Mellea: the interpreter's own, or the carried wheels in .whl/ installed into a scratch folder
SITE="$WORK/site"; mkdir -p "$SITE"
if ! python3 -c "import mellea" 2> /dev/null && ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || echo "!! installing the carried wheels failed"
fi
if python3 benchmarks/mellea/carried.py "$SITE" --check; then
    section mellea "$WORK/mellea" python3 benchmarks/mellea/carried.py "$SITE" "${M[@]}" --out "$WORK/mellea" \
        "${MELLEA[@]}" ${FASTPATH_MELLEA_METHODS:+--methods "$FASTPATH_MELLEA_METHODS"}
else
    why="Mellea is not importable here and no usable wheels were carried (.whl/*.whl): the Mellea program benchmark is SKIPPED"
    echo "!! $why"
    printf '{"skipped": "%s"}\n' "$why" > "$OUTDIR/sections/mellea.json"
    report
fi

echo; echo "=== fast-path targets ==="
cat "$WORK/table.md"
echo "wrote $OUTDIR/fastpath.json, $OUTDIR/fastpath.md, $OUTDIR/fastpath.log, $OUTDIR/sections/"
rm -rf "$WORK"
