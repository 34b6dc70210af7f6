#!/usr/bin/env bash
# moekit's CUDA checks, for one call on a GPU machine:  bash scripts/gpu_check.sh
# 1. the machine (nvidia-smi -L, python / torch / transformers versions, CUDA visible to torch);
# 2. the gpu test suite (tests/gpu, marker `gpu`), log teed to $OUT/gpu-tests.log when $OUT is set;
# 3. a quick CUDA benchmark of wrapped vs transformers models (benchmarks/hf.py --device cuda --quick),
#    JSON lines to $OUT/hf-cuda.jsonl.
# Worst case about 7 minutes (tests 270 s, benchmark 150 s, each under `timeout`); expected 2-3 minutes.
# Runs from the source tree (PYTHONPATH=src, moekit not installed). Exit status: the tests' (the benchmark's
# failure is reported but does not hide a test result). GPU_MAXFAIL (default 25) stops pytest after that many
# failures: one device call should bring back every failure, not only the first.
set -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
# No network on the device machine: hub look-ups (e.g. GPU-only experts kernels the benchmark tries) fail at once.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT_DIR=${OUT:-}
log() { if [ -n "$OUT_DIR" ]; then tee -a "$OUT_DIR/$1"; else cat; fi; }

echo "== machine ($(date -u +%FT%TZ))"
nvidia-smi -L || echo "nvidia-smi failed"
$PY - <<'PY'
import platform, torch, transformers
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| transformers", transformers.__version__)
print("cuda available:", torch.cuda.is_available(), "| devices:", torch.cuda.device_count(),
      "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "-",
      "| torch._grouped_mm:", hasattr(torch, "_grouped_mm"))
import moekit, moekit.hf  # noqa: E401 (fails here, loudly, if an import is missing on this machine)
print("moekit", moekit.__version__, "imports; routers:", moekit.registered_routers())
PY

echo "== tests/gpu"
TIMEOUT_OPT=()
if $PY -c "import pytest_timeout" 2>/dev/null; then TIMEOUT_OPT=(--timeout 120); else echo "(pytest-timeout absent: no per-test timeout)"; fi
start=$(date +%s)
timeout 270 $PY -m pytest tests/gpu -m gpu -p no:cacheprovider --maxfail "${GPU_MAXFAIL:-25}" "${TIMEOUT_OPT[@]}" \
    -rA --durations=15 2>&1 | log gpu-tests.log
tests_rc=$?
echo "== tests/gpu exit status $tests_rc after $(( $(date +%s) - start )) s"

echo "== benchmarks/hf.py --device cuda --quick"
start=$(date +%s)
BENCH_OUT=()
if [ -n "$OUT_DIR" ]; then BENCH_OUT=(--out "$OUT_DIR/hf-cuda.jsonl"); fi
timeout 150 $PY benchmarks/hf.py --device cuda --quick --archs mixtral,qwen3_moe,gpt_oss "${BENCH_OUT[@]}" 2>&1 \
    | log hf-cuda.log
echo "== benchmark exit status $? after $(( $(date +%s) - start )) s"
exit $tests_rc
