#!/usr/bin/env bash
# The megatron backend's GPU checks, called by scripts/gpu/validate.sh (one step, 60 s there):
#   1. benchmarks/train.py: torch vs megatron training steps (tokens/s, MFU, peak memory per rank) at TP/PP 1/1,
#      and 2/1, 1/2 when the host has 2+ GPUs;
#   2. with 2+ GPUs and Transformer Engine: sequence parallelism at TP=2 against the same run without it
#      (bf16: the losses agree to 2e-2); skipped with a line saying why otherwise;
#   3. with 2+ GPUs (and in --dry-run, on CPU): virtual pipeline stages, PP=2 x VPP=2 against PP=2 (TE layers
#      and nccl on GPUs; tests/test_megatron_parallel.py checks it against the torch backend on CPU).
#
#   bash scripts/gpu/megatron_steps.sh [--out DIR]     # on a GPU host
#   bash scripts/gpu/megatron_steps.sh --dry-run       # the same at toy size on CPU (gloo)
set -uo pipefail
cd "$(dirname "$0")/../.."
DRY=0
OUT=runs/gpu-megatron
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    *) echo "megatron_steps.sh: unknown argument $1 (use --dry-run, --out DIR)"; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" DSEL_PROGRESS=0
if [ "$DRY" = 1 ]; then
  export CUDA_VISIBLE_DEVICES=""
  GPUS=0
  BENCH=(--preset tiny --seq-len 16 --batch-size 2 --repeats 1 --layouts 1/1)
else
  GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
  LAYOUTS=1/1
  [ "$GPUS" -ge 2 ] && LAYOUTS=1/1,2/1,1/2
  BENCH=(--preset pds-160m --batch-size 8 --repeats 3 --layouts "$LAYOUTS")
fi
status=0

echo "== train benchmark (${BENCH[*]})"
python benchmarks/train.py "${BENCH[@]}" --report-memory --out "$OUT/train.json" || status=1

HAVE_TE=$(python -c "import importlib.util as u; print(int(u.find_spec('transformer_engine') is not None))")
DEVICE=cuda
[ "$DRY" = 1 ] && DEVICE=cpu
# compare NAME TOLERANCE "SETTINGS A" "SETTINGS B": the same 6 steps on 2 ranks, with A and with B; the losses agree.
compare() {
  python - "$OUT" "$DEVICE" "$@" <<'PY'
import json, subprocess, sys
from pathlib import Path
sys.path.insert(0, ".")
from tests._train_util import write_counting_dataset
out, device, name, tolerance, settings = Path(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5:]
data = write_counting_dataset(out / "data", vocab=128)
losses = []
for i, extra in enumerate(settings):
    run = out / f"{name}-{i}"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dsel",
                    "train", f"data=[{data}]", f"out={run}", "preset=tiny", "arch.vocab_size=128", "arch.seq_len=16",
                    "steps=6", "batch_size=4", "grad_accum=2", "backend=megatron", f"device={device}", *extra.split()],
                   check=True)
    losses.append([json.loads(l)["loss"] for l in (run / "log.jsonl").read_text().splitlines() if '"loss"' in l])
worst = max(abs(a - b) for a, b in zip(*losses))
print(f"{name}: largest loss difference {worst:.2e} over {len(losses[0])} steps ({' vs '.join(settings)})")
sys.exit(0 if worst < tolerance else 1)
PY
}

if [ "$GPUS" -ge 2 ] && [ "$HAVE_TE" = 1 ]; then
  echo "== sequence parallelism at TP=2 vs without (bf16: the losses agree to 2e-2)"
  compare sp 2e-2 "parallel.tp=2 parallel.sequence_parallel=false" "parallel.tp=2 parallel.sequence_parallel=true" \
    || status=1
else
  echo "== sequence parallelism: skipped (needs 2+ GPUs and Transformer Engine; this host: $GPUS GPUs, TE=$HAVE_TE)"
fi
if [ "$GPUS" -ge 2 ] || [ "$DRY" = 1 ]; then
  echo "== virtual pipeline PP=2 x VPP=2 (interleaved 1F1B) vs PP=2, 4 layers"
  compare vpp 2e-2 "parallel.pp=2 arch.n_layer=4" "parallel.pp=2 parallel.vpp=2 arch.n_layer=4" || status=1
else
  echo "== virtual pipeline: skipped (needs 2+ GPUs; this host: $GPUS GPUs)"
fi
exit $status
