#!/usr/bin/env bash
# Session 6 closing smoke on one H100: the CLI after the review fixes (flags checked before
# loading), a batch job with a bad line, and the compiled sampler tests.
set -uo pipefail
export PYTHONUNBUFFERED=1
R=$OUT/s6smoke; PY=python3
source bench/gpu_install.sh && gpu_session "$R" session.log "closing smoke" && gpu_install || exit 1
$PY -m xlaserve generate --prompt "Hello, my name is" --max-tokens 16 --temperature 0 --json > $R/generate.json 2> $R/generate.log; echo "=== generate rc=$?"; cat $R/generate.json
printf '%s\n' '{"id": "a", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}' '{"id": "b", "prompt": "x", "max_token": 3}' '{"id": "c", "prompt": [1, 2, 3], "max_tokens": 4, "top_k": -1, "temperature": 0.7, "seed": 1}' > $R/in.jsonl
$PY -m xlaserve generate --input $R/in.jsonl --output $R/out.jsonl > $R/batch.log 2>&1; echo "=== batch rc=$?"; cut -c1-200 $R/out.jsonl
$PY -m xlaserve generate --prompt hi --attention-impl bogus > /dev/null 2> $R/bad_flag.log; echo "=== bad flag rc=$? (want 2)"; tail -1 $R/bad_flag.log
JAX_PLATFORMS=cuda timeout 200 $PY -m pytest -q -p no:cacheprovider tests/runtime/test_sampling.py tests/runtime/test_review_sampling.py > $R/pytest_sampling_gpu.txt 2>&1; echo "=== pytest rc=$?"; tail -2 $R/pytest_sampling_gpu.txt
