#!/usr/bin/env bash
# One call on one GPU machine: the train / generate / caption benchmarks at the fixed bench shape
# and at Qwen2-0.5B shape, printed as a table (and the raw JSON lines under $OUT, default ./bench).
#   launch/gpu_bench.sh [--steps N]          (run from the repository root, project installed)
set -euo pipefail
cd "$(dirname "$0")/.."
steps=10
[[ "${1:-}" == "--steps" ]] && steps="$2"
out="${OUT:-bench}"
mkdir -p "$out"
# Fused attention on GPU; deterministic ops off (they cost speed and are for repro runs).
run() {  # name, subcommand, config, extra args
  local name="$1" what="$2" cfg="$3"; shift 3
  echo "[gpu_bench] $name: mmar-jax bench $what --config $cfg $*" >&2
  mmar-jax bench "$what" --config "$cfg" --steps "$steps" --config.model.attention=cudnn "$@" \
    | tail -n 1 | tee "$out/$name.json"
}
run train_bench train configs/bench.py
run train_0_5b train configs/bench.py:qwen2_0_5b
run train_0_5b_remat train configs/bench.py:qwen2_0_5b --config.model.remat=dots_no_batch
run generate_0_5b generate configs/bench.py:qwen2_0_5b --config.train.batch_size=16
run caption_0_5b caption configs/bench.py:qwen2_0_5b --config.train.batch_size=16
python3 - "$out" <<'PY'
import json, pathlib, sys
rows = []
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
  d = json.loads(f.read_text())
  mfu = d.get("mfu")
  rows.append((f.stem, d.get("device", "?"), f"{d['median_step_s']:.4f}",
               f"{d.get('tokens_per_s') or 0:,.0f}", f"{d.get('images_per_s') or 0:,.1f}",
               "-" if mfu is None else f"{100 * mfu:.1f}%", f"{(d.get('peak_bytes') or 0) / 2**30:.1f}"))
head = ("benchmark", "device", "step s", "tokens/s", "images/s", "MFU", "peak GiB")
w = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
for r in [head] + rows:
  print("  ".join(c.ljust(n) for c, n in zip(r, w)))
PY
