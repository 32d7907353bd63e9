#!/usr/bin/env bash
# One-shot GPU validation (target: under 8 minutes on one H100/H200). Each step has its own time
# limit; a failed or timed-out step is recorded and the next one still runs. Everything lands in
# one folder: every step's log and JSON, steps.jsonl, summary.json and RESULTS_section.md (a ready
# markdown section for benchmarks/RESULTS.md).
#
#   bash scripts/gpu/validate.sh [--out DIR]       # on a GPU host
#   bash scripts/gpu/validate.sh --dry-run         # every step at toy size on CPU (Triton interpreter)
#
# Wheels: a bare GPU image (CUDA torch + triton) may lack megatron-core, lm-eval, liger-kernel,
# cut-cross-entropy and the build/test tools. Fill the ignored folder .whl/ on a machine with
# registry access, for the GPU host's Python version and platform, e.g.
#   pip download -d .whl --python-version 3.11 --only-binary=:all: --platform manylinux2014_x86_64 \
#       megatron-core==0.16.* lm-eval liger-kernel cut-cross-entropy pybind11 pytest pyyaml tqdm \
#       sentencepiece pyarrow matplotlib
# (drop --platform/--python-version when downloading on a host like the GPU one). The install step
# installs only the missing packages, from .whl/ only (--no-index), never replacing torch.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
DRY=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    *) echo "validate.sh: unknown argument $1 (use --dry-run, --out DIR)"; exit 2 ;;
  esac
  shift
done
OUT=${OUT:-runs/gpu-validate-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export DRY OUT
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
: > "$OUT/steps.jsonl"
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""   # CPU only; Triton interpreted
else
  unset TRITON_INTERPRET                              # compiled Triton: never the interpreter on GPU
fi

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to NAME.log, record the outcome
  local name=$1 limit=$2; shift 2
  [ "$DRY" = 1 ] && [ "$limit" -lt 600 ] && limit=600  # toy sizes, but on a CPU that may be shared
  local start=$SECONDS
  echo "== $name (limit ${limit}s)"
  if [ "$(type -t "$1")" = function ]; then  # a function of this script: run it in a child bash
    timeout --kill-after=15 "$limit" bash -c "$(declare -f "$1"); $*" > "$OUT/$name.log" 2>&1
  else
    timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  fi
  local rc=$?
  local took=$((SECONDS - start))
  tail -n 3 "$OUT/$name.log" | sed 's/^/   /'
  echo "   -> rc=$rc in ${took}s"
  printf '{"step": "%s", "rc": %d, "seconds": %d, "limit": %d, "timed_out": %s}\n' "$name" "$rc" "$took" "$limit" \
    "$([ $rc = 124 ] || [ $rc = 137 ] && echo true || echo false)" >> "$OUT/steps.jsonl"
}

install_missing() {  # the packages the image lacks, from .whl/ only
  local missing
  missing=$(python3 - <<'EOF'
import importlib.util
wanted = {"megatron.core": "megatron-core", "lm_eval": "lm-eval", "liger_kernel": "liger-kernel",
          "cut_cross_entropy": "cut-cross-entropy", "pybind11": "pybind11", "pytest": "pytest"}
print(" ".join(pkg for mod, pkg in wanted.items() if importlib.util.find_spec(mod.split(".")[0]) is None
               or (mod == "megatron.core" and importlib.util.find_spec(mod) is None)))
EOF
)
  echo "missing: ${missing:-nothing}"
  if [ "$DRY" = 1 ] || [ -z "$missing" ]; then return 0; fi
  [ -d .whl ] || { echo "no .whl/ folder: see the header of scripts/gpu/validate.sh"; return 1; }
  python3 -m pip install --no-index --find-links .whl $missing &&
    python3 -m pip install --no-index --find-links .whl --no-deps --no-build-isolation -e .
}

build_extension() {
  if [ "$DRY" = 1 ]; then python3 -c "import dsel._C; print('extension imports:', dsel._C.__file__)"; return; fi
  python3 setup.py build_ext --inplace && python3 -c "import dsel._C; print('built', dsel._C.__file__)"
}

measure_peak() {  # the bf16 matmul rate every MFU below is measured against (fp32 at toy size on CPU)
  python3 - "$OUT/peak.json" "$DRY" <<'EOF'
import sys, torch, triton
from dsel.benchmarking import matmul_flops
from dsel.io import write_json
gpu = sys.argv[2] == "0"
device = torch.device("cuda" if gpu else "cpu")
dtype = torch.bfloat16 if gpu else torch.float32
size = 8192 if gpu else 256
flops = matmul_flops(device, dtype, size=size, repeats=20 if gpu else 3)
info = dict(peak_tflops=flops / 1e12, dtype=str(dtype), size=size, torch=torch.__version__, triton=triton.__version__,
            device=torch.cuda.get_device_name() if gpu else "cpu", cuda=torch.version.cuda)
write_json(sys.argv[1], info)
print(info)
EOF
}

bench() {  # a benchmarks/ script without its folder on sys.path
  python3 -c 'import runpy, sys; path = sys.argv[1]; sys.argv = sys.argv[1:]; runpy.run_path(path, run_name="__main__")' "$@"
}

peak() { python3 -c "import json; print(json.load(open('$OUT/peak.json'))['peak_tflops'])" 2>/dev/null || echo 0; }

# GPU limits sum to 8 minutes (megatron included); typical runs finish well inside each.
step install 30 install_missing
step build 40 build_extension
step peak 10 measure_peak
PEAK=$(peak)
if [ "$DRY" = 1 ]; then
  step parity 300 python3 scripts/gpu/parity.py --dry-run --out "$OUT/parity.json"
  step gpu_tests 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_gpu.py
  step kernels_bench 300 bench benchmarks/kernels.py --device cpu --vocab 70 --dim 16 --tokens 33 --repeats 1 \
    --peak-tflops "$PEAK" --out "$OUT/kernels.json"
  step score_bench 300 bench benchmarks/score.py --device cpu --preset tiny --window 16 --batch-size 3 \
    --micro-batch 2 --repeats 1 --peak-tflops "$PEAK" --out "$OUT/score.json"
  step train_bench 300 bench benchmarks/train.py --preset tiny --seq-len 16 --batch-size 2 --repeats 1 \
    --out "$OUT/train.json"
  step pmp_bench 300 bench benchmarks/pmp.py --device cpu --model tiny --batch 2 --micro-batch 2 --target 1 \
    --out "$OUT/pmp.json"
else
  step parity 90 python3 scripts/gpu/parity.py --out "$OUT/parity.json"
  step gpu_tests 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests
  step kernels_bench 60 bench benchmarks/kernels.py --peak-tflops "$PEAK" --out "$OUT/kernels.json"
  step score_bench 30 bench benchmarks/score.py --peak-tflops "$PEAK" --out "$OUT/score.json"
  step train_bench 30 bench benchmarks/train.py --out "$OUT/train.json"
  step pmp_bench 30 bench benchmarks/pmp.py --out "$OUT/pmp.json"
fi
if [ -f scripts/gpu/megatron_steps.sh ]; then
  step megatron 40 bash scripts/gpu/megatron_steps.sh $([ "$DRY" = 1 ] && echo --dry-run) --out "$OUT/megatron"
fi
python3 scripts/gpu/summarize.py "$OUT"
