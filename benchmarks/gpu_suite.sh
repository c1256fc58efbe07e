#!/usr/bin/env bash
# The prepared GPU run: the CUDA tests, then the benchmarks, one JSON line each, in under 8 minutes on
# one H100/H200 (every step has a time limit; the limits add up to 470 s).
#
#   benchmarks/gpu_suite.sh [OUT.jsonl]            # default OUT: gpu_suite.jsonl; PYTHON=... to pick the interpreter
#
# With a CUDA device:
#   cuda_tests        tests/test_cuda.py (pytest -m cuda): bf16 autocast, fused AdamW, compiled blocks,
#                     FSDP2 on one GPU, exact resume on CUDA; passed / failed / skipped and the failures
#   pretrain_step     ViT-B 96^3 patch 12, batch 64, 2 global + 8 local crops, 65,536 prototypes, bf16,
#                     compiled: volumes/s, MFU, peak memory with the losses chunked and whole
#   head_loss_memory  the DINO and iBOT losses at batch 64: peak memory whole vs chunked, equal results
#   embed             ViT-B fmct embed end to end vs the forward pass alone
#   loader            benchmarks/loader.py, when the checkout has it
# Without one: the same scripts at tiny CPU shapes (it checks the wiring, not the speed), the CUDA tests
# skipped, and a last line saying that the GPU figures are unmeasured.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${1:-gpu_suite.jsonl}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
: >"$OUT"
started=$(date +%s)
errors=0
if "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then gpu=1; else gpu=0; fi

# run NAME LIMIT_S COMMAND...: the command's last JSON line goes to OUT, or a line naming its failure.
run() {
    local name=$1 limit=$2
    shift 2
    local log line status
    log=$(mktemp)
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    status=$?
    line=$(grep '^{' "$log" | tail -n 1)
    if [ "$status" -eq 0 ] && [ -n "$line" ]; then
        echo "$line" | tee -a "$OUT"
    else
        errors=$((errors + 1))
        tail -n 25 "$log" >&2
        "$PYTHON" -c 'import json, sys; name, status, limit = sys.argv[1], int(sys.argv[2]), sys.argv[3]
print(json.dumps({"benchmark": name, "error": f"timed out after {limit} s" if status in (124, 137) else f"exit status {status}"}))' \
            "$name" "$status" "$limit" | tee -a "$OUT"
    fi
    rm -f "$log"
}

# The tests' JSON line, from pytest's JUnit XML.
cuda_tests() {
    local xml
    xml=$(mktemp --suffix=.xml)
    "$PYTHON" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider --junitxml="$xml" >&2
    "$PYTHON" - "$xml" <<'EOF'
import json, sys
import xml.etree.ElementTree as ElementTree

cases = ElementTree.parse(sys.argv[1]).getroot().iter("testcase")
outcomes = {}
for case in cases:
    failed = case.find("failure") if case.find("failure") is not None else case.find("error")
    outcome = "failed" if failed is not None else "skipped" if case.find("skipped") is not None else "passed"
    outcomes[case.get("name")] = (outcome, (failed.get("message") or "")[:300] if failed is not None else "")
counts = {kind: sum(outcome == kind for outcome, _ in outcomes.values()) for kind in ("passed", "failed", "skipped")}
print(json.dumps({"benchmark": "cuda_tests", **counts,
                  "failures": {name: message for name, (outcome, message) in outcomes.items() if outcome == "failed"}}))
sys.exit(1 if counts["failed"] else 0)
EOF
    local status=$?
    rm -f "$xml"
    return $status
}

export PYTHON
export -f cuda_tests  # so that timeout can run it in a shell of its own
if [ "$gpu" -eq 1 ]; then
    run cuda_tests 140 bash -c cuda_tests
    run pretrain_step 160 "$PYTHON" benchmarks/pretrain_step.py --steps 10 --warmup 3
    run head_loss_memory 30 "$PYTHON" benchmarks/head_loss_memory.py
    run embed 120 "$PYTHON" benchmarks/embed.py --scans 4096 --distinct 16 --out "${TMPDIR:-/tmp}/fmct-gpu-suite-embed"
    [ -f benchmarks/loader.py ] && run loader 20 "$PYTHON" benchmarks/loader.py
else
    run cuda_tests 140 bash -c cuda_tests
    run pretrain_step 160 "$PYTHON" benchmarks/pretrain_step.py --steps 1 --warmup 1
    run head_loss_memory 30 "$PYTHON" benchmarks/head_loss_memory.py --batch 2 --prototypes 8192 --ibot-chunk-rows 64 --dino-chunk-size 1
    run embed 120 "$PYTHON" benchmarks/embed.py --scans 8 --batch-size 4 --distinct 2 --workers 1 --out "${TMPDIR:-/tmp}/fmct-gpu-suite-embed"
    [ -f benchmarks/loader.py ] && run loader 20 "$PYTHON" benchmarks/loader.py
fi

"$PYTHON" - "$gpu" "$(($(date +%s) - started))" "$errors" "$OUT" <<'EOF' | tee -a "$OUT"
import json, platform, sys
import torch

gpu, seconds, errors, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
device = torch.cuda.get_device_name(0) if gpu else f"cpu ({platform.machine()})"
figures = f"measured on {device}" if gpu else "unmeasured: no CUDA device; CPU fallback at tiny shapes (wiring only)"
print(json.dumps({"benchmark": "gpu_suite", "device": device, "torch": torch.__version__, "gpu_figures": figures,
                  "seconds": seconds, "errors": errors, "lines": out}))
EOF
[ "$errors" -eq 0 ]
