#!/usr/bin/env bash
# Mellea's own test/backends/test_huggingface.py, offline, on stock LocalHFBackend and on
# spanctx's backend; prints both summaries and writes one JUnit XML per backend.
#
#   benchmarks/mellea/run_acceptance.sh [PYTHON] [MELLEA_TESTS] [OUTDIR]
#
# PYTHON has mellea[hf] and spanctx installed (default: python3); MELLEA_TESTS is a copy
# of Mellea's test folder's parent (default: ../shared/mellea-tests beside the repo).
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PYTHON=${1:-python3}
TESTS=${2:-$REPO/../shared/mellea-tests}
OUTDIR=${3:-$(mktemp -d)}
export PYTHONPATH="$REPO:$HERE${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$TESTS"
for backend in stock spanctx; do
    echo "=== $backend"
    MELLEA_BACKEND=$backend "$PYTHON" -m pytest -o addopts="" -p acceptance_plugin -q -rA \
        --junitxml="$OUTDIR/$backend.xml" test/backends/test_huggingface.py 2>&1 | tail -40
done
echo "JUnit XML in $OUTDIR"
