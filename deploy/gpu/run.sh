#!/usr/bin/env bash
# infermux GPU check, end to end in one call (written by `cargo xtask gpu-bundle`):
#   1. seeded random weights of SmolLM2-135M's config (and, on a GPU, of a ~0.4B Qwen2-shape
#      config) made with this machine's torch; goldens from its transformers (f32, eager) on
#      the same device;
#   2. the conformance binary on that device, f32 and bf16 (f32 only on the CPU), candle and torch;
#   3. the bench binary on each backend and dtype next to transformers (the peer) on the same
#      device, the same token ids;
#   4. the tables and raw JSON under the output folder.
# Usage: run.sh [--device cuda|cpu] [--out DIR]   (default: cuda, $OUT or ./out)
# Needs python3 with torch and transformers; libtorch comes from that torch (same 2.11.0).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
device=cuda
out=${OUT:-$here/out}
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
python=${PYTHON:-python3}
mkdir -p "$out"
work=$(mktemp -d "${TMPDIR:-/tmp}/infermux-gpu.XXXXXX")
trap 'rm -rf "$work"' EXIT
log() { echo "[run.sh $(date +%H:%M:%S)] $*" >&2; }
failed=0
step() { # step NAME CMD...: runs CMD, remembers a failure, keeps going
  local name=$1; shift
  log "$name"
  if ! "$@"; then log "FAILED: $name"; echo "$name" >> "$out/failed.txt"; failed=1; fi
}

log "device $device, output $out"
# The binaries go next to the bundle, not into $work: /tmp may be mounted noexec.
bins=$here/.bin
mkdir -p "$bins"
for b in infermux infermux-conformance infermux-bench; do
  "$python" -c 'import lzma, shutil, sys
with lzma.open(sys.argv[1]) as src, open(sys.argv[2], "wb") as dst: shutil.copyfileobj(src, dst)' \
    "$here/bin/$b.xz" "$bins/$b" || exit 1
  chmod +x "$bins/$b"
done
torch_lib=$("$python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))') || exit 1
loader=$torch_lib
for dir in "$(dirname "$(dirname "$torch_lib")")"/nvidia/*/lib; do
  [ -d "$dir" ] && loader=$loader:$dir
done
export LD_LIBRARY_PATH="$loader${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONPATH="$here/scripts${PYTHONPATH:+:$PYTHONPATH}"
if [ "$device" = cpu ]; then
  workload=$here/workloads/cpu.json; dtypes="f32"; models="smollm2-135m"
else
  workload=$here/workloads/gpu.json; dtypes="f32 bf16"; models="smollm2-135m qwen2-0.5b"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt"
fi
{ uname -a; lscpu 2>/dev/null | grep -m1 'Model name'; "$python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'; } > "$out/machine.txt"

step "make smollm2-135m weights and goldens" \
  "$python" "$here/scripts/make_model.py" --config "$here/models/smollm2-135m" --tokenizer "$here/tokenizer" \
  --out "$work/smollm2-135m" --device "$device" --goldens "$work/smollm2-135m/goldens.json"
cp "$work/smollm2-135m/goldens.json" "$out/goldens-smollm2-135m.json" 2>/dev/null
for dtype in $dtypes; do
  step "conformance $device $dtype" env INFERMUX_MODEL_DIR="$work/smollm2-135m" \
    INFERMUX_GOLDENS="$work/smollm2-135m/goldens.json" "$bins/infermux-conformance" \
    --backends candle,torch --device "$device" --dtype "$dtype" --json "$out/conformance-$dtype.json" \
    > "$out/conformance-$dtype.md"
  step "conformance $device $dtype measured every backend" "$python" -c 'import json, sys
skipped = json.load(open(sys.argv[1]))["skipped"]
sys.exit(f"skipped: {skipped}" if skipped else 0)' "$out/conformance-$dtype.json"
done
for model in $models; do
  [ -d "$work/$model" ] || step "make $model weights" "$python" "$here/scripts/make_model.py" \
    --config "$here/models/$model" --tokenizer "$here/tokenizer" --out "$work/$model" --device "$device"
  for dtype in $dtypes; do
    for backend in candle torch; do
      step "bench $model $backend $dtype" sh -c '"$0" --backend "$1" --dtype "$2" --device "$3" --model "$4" --workload "$5" >> "$6"' \
        "$bins/infermux-bench" "$backend" "$dtype" "$device" "$work/$model" "$workload" "$out/bench-$model.jsonl"
    done
    step "bench $model transformers $dtype" sh -c '"$0" "$1" --model "$2" --workload "$3" --device "$4" --dtype "$5" >> "$6"' \
      "$python" "$here/scripts/peer_bench.py" "$work/$model" "$workload" "$device" "$dtype" "$out/bench-$model.jsonl"
  done
  step "table $model" "$python" "$here/scripts/tables.py" "$out/bench-$model.jsonl" "$model" "$device" \
    > "$out/bench-$model.md"
done
[ -f "$out/bench-smollm2-135m.md" ] && cat "$out"/conformance-*.md "$out"/bench-*.md >&2
if [ $failed -ne 0 ]; then log "failed steps: $(tr '\n' ';' < "$out/failed.txt")"; exit 1; fi
log "all steps passed"
