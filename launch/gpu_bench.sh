#!/usr/bin/env bash
# One call on one GPU machine: the train step at Qwen2-0.5B shape (configs/bench.py:qwen2_0_5b,
# bf16) with jax's einsum attention against cuDNN's fused kernel, each with the top operations of
# a profile; the largest batch that fits; generate and caption; then the bf16 numerics check.
# Prints a table; the raw JSON lines (and numerics/) go under $OUT (default ./bench).
#   launch/gpu_bench.sh [--steps N] [--max-batch B] [--config CFG]   (from the repository root)
# Needs only the package importable: `python -m mmar_jax` (set PYTHON for another interpreter).
set -uo pipefail
cd "$(dirname "$0")/.."
steps=10
max_batch=1024
m="configs/bench.py:qwen2_0_5b"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --steps) steps="$2"; shift 2 ;;
    --max-batch) max_batch="$2"; shift 2 ;;
    --config) m="$2"; shift 2 ;;
    *) echo "gpu_bench.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
out="${OUT:-bench}"
mkdir -p "$out"
py="${PYTHON:-python3}"
# The largest batch is what fits in the card, not in jax's default 75% preallocation.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
bench() {  # name, subcommand, config, extra args: one JSON line to $out/name.json
  local name="$1" what="$2" cfg="$3"; shift 3
  echo "[gpu_bench] $(date +%T) $name: bench $what --config $cfg $*" >&2
  "$py" -m mmar_jax bench "$what" --config "$cfg" "$@" > "$out/$name.out" 2> "$out/$name.err"
  local rc=$?
  tail -n 1 "$out/$name.out" > "$out/$name.json"
  [[ $rc -eq 0 ]] || { rm -f "$out/$name.json"; echo "[gpu_bench] $name failed (rc $rc): $(grep -m1 -E 'Error|error' "$out/$name.err")" >&2; }
  return $rc
}
bench train_bench train configs/bench.py --steps "$steps"
for attn in einsum cudnn; do
  bench "train_0_5b_$attn" train "$m" --steps "$steps" --profile 12 --config.model.attention=$attn
done
# The largest batch: cuDNN's attention doubling from 128 until a step does not fit (or
# --max-batch); then the einsum attention at that batch, the same step with the scores in HBM.
b=128 fits=""
while [[ $b -le $max_batch ]] && bench "train_0_5b_cudnn_b$b" train "$m" --steps 3 \
    --config.model.attention=cudnn --config.train.batch_size=$b; do
  fits=$b b=$((b * 2))
done
[[ -n "$fits" ]] && bench "train_0_5b_einsum_b$fits" train "$m" --steps 3 \
  --config.model.attention=einsum --config.train.batch_size=$fits
bench generate_0_5b generate "$m" --steps 3 --config.train.batch_size=16 --config.model.attention=cudnn
bench caption_0_5b caption "$m" --steps 3 --config.train.batch_size=16
echo "[gpu_bench] $(date +%T) bf16 numerics: diagnose numerics" >&2
"$py" -m mmar_jax diagnose numerics --out "$out/numerics" --overwrite > "$out/numerics.txt" 2>&1 \
  || echo "[gpu_bench] numerics check failed (exit $?): see $out/numerics.txt" >&2
"$py" - "$out" <<'PY'
import json, pathlib, sys
rows, profiles = [], []
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json"), key=lambda f: f.stat().st_mtime):
  try:
    d = json.loads(f.read_text())
  except ValueError:
    continue
  mfu = d.get("mfu")
  rows.append((f.stem, d.get("device", "?"), str(d.get("batch_size", "")), f"{d['median_step_s']:.4f}",
               f"{d.get('tokens_per_s') or 0:,.0f}", f"{d.get('images_per_s') or 0:,.1f}",
               "-" if mfu is None else f"{100 * mfu:.1f}%", f"{(d.get('peak_bytes') or 0) / 2**30:.1f}"))
  if "profile" in d:
    profiles.append((f.stem, d["profile"]))
head = ("benchmark", "device", "batch", "step s", "tokens/s", "images/s", "MFU", "peak GiB")
w = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
for r in [head] + rows:
  print("  ".join(c.ljust(n) for c, n in zip(r, w)))
for name, p in profiles:
  print(f"\n{name}: top operations ({p['source']}; {p['total_ms']:.1f} ms of op time per step)")
  for op in p["ops"]:
    print(f"  {100 * op['share']:5.1f}%  {op['ms_per_step']:8.2f} ms  x{op['count']:<4d} {op['name'][:110]}")
PY
