#!/usr/bin/env bash
# CPU throughput of M3 unified fine-tuning: `retrom3 finetune` (release build) vs one PyTorch training step built from
# FlagEmbedding's own M3 model and loss code (tools/m3_torch_step.py), side by side on this machine, same model
# directory, same batch (B queries, G passages each), same max lengths, same thread count. Every text is longer than its
# max length, so every batch of both sides has exactly B*Lq + B*G*Lp tokens (checked).
#
#   tools/bench_m3_cpu.sh [--threads 2] [--steps 20] [--warmup 2] [--size tiny|small|both]
#
# Sizes: tiny  = tests/fixtures/tiny-xlmr (2 layers, hidden 32, 4 heads, FFN 64), B 4, G 8, Lq 16, Lp 32;
#        small = random XLM-R, 6 layers, hidden 384, 6 heads, FFN 1536 (1000-token tokenizer), B 4, G 8, Lq 32, Lp 128.
# Both: unified loss + self-distillation, temperature 0.02, dropout on, AdamW, grad clip 1.0, no sub-batching.
# Environment: PYTHON (default /work/refenv/bin/python: torch + FlagEmbedding 1.4.2, SPEC section 12),
# RETROM3 (default target/release/retrom3, built with `cargo build --release` when missing).
# Timing: wall time of each step after --warmup steps; retrom3's from its metrics.jsonl (tokens / tokens_per_s, the
# step's own timer: batch sampling + tokenization + forward + backward + AdamW), PyTorch's from the same span
# (collation + forward + backward + clip + AdamW).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=2 STEPS=20 WARMUP=2 SIZE=both
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) THREADS=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --warmup) WARMUP=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-/work/refenv/bin/python}
BIN=${RETROM3:-target/release/retrom3}
[ -x "$BIN" ] || cargo build --release --bin retrom3
CORES=$(nproc --all)
TMP=$(mktemp -d /tmp/r3-m3bench.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
export MATMUL_NUM_THREADS=$THREADS RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS

run_size() {  # name, make-model args, B, G, Lq, Lp
  local name=$1 margs=$2 B=$3 G=$4 LQ=$5 LP=$6 dir=$TMP/$1
  mkdir -p "$dir"
  # shellcheck disable=SC2086
  "$PY" tools/m3_torch_step.py make-model --out "$dir/model" $margs
  "$PY" tools/m3_torch_step.py make-data --model "$dir/model" --out "$dir/train.jsonl" \
    --query-max-len "$LQ" --passage-max-len "$LP"
  "$BIN" finetune --model "$dir/model" --train "$dir/train.jsonl" --output "$dir/out" \
    --batch-size "$B" --group-size "$G" --query-max-len "$LQ" --passage-max-len "$LP" \
    --steps $((STEPS + WARMUP)) --lr 1e-5 --temperature 0.02 --seed 42 >/dev/null 2>"$dir/finetune.log" \
    || { cat "$dir/finetune.log" >&2; exit 1; }
  local ours torch
  ours=$("$PY" - "$dir/out/metrics.jsonl" "$WARMUP" "$B" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])][int(sys.argv[2]):]
secs = sum(r["tokens"] / r["tokens_per_s"] for r in rows)
print(json.dumps({"steps": len(rows), "seconds": secs, "examples_per_s": int(sys.argv[3]) * len(rows) / secs,
                  "tokens_per_s": sum(r["tokens"] for r in rows) / secs,
                  "tokens_per_step": sorted({r["tokens"] for r in rows}), "last_loss": rows[-1]["loss"]}))
EOF
)
  torch=$("$PY" tools/m3_torch_step.py bench --model "$dir/model" --train "$dir/train.jsonl" --steps "$STEPS" \
    --warmup "$WARMUP" --threads "$THREADS" --batch-size "$B" --group-size "$G" --query-max-len "$LQ" \
    --passage-max-len "$LP")
  "$PY" - "$name" "$B" "$G" "$LQ" "$LP" "$THREADS" "$ours" "$torch" <<'EOF'
import json, sys
name, B, G, LQ, LP, T = sys.argv[1:7]
ours, torch = json.loads(sys.argv[7]), json.loads(sys.argv[8])
want = int(B) * int(LQ) + int(B) * int(G) * int(LP)
assert ours["tokens_per_step"] == [want] and torch["tokens_per_step"] == [want], (want, ours, torch)
print(f"== {name}: B {B}, G {G}, Lq {LQ}, Lp {LP} ({want} tokens/step), {T} threads, {ours['steps']} timed steps")
print(f"retrom3 finetune (CPU f32)          : {ours['examples_per_s']:8.2f} examples/s {ours['tokens_per_s']:10.1f} tokens/s"
      f"  ({1000 * ours['seconds'] / ours['steps']:.1f} ms/step)")
print(f"PyTorch {torch['torch']} FlagEmbedding {torch['flagembedding']}: {torch['examples_per_s']:8.2f} examples/s "
      f"{torch['tokens_per_s']:10.1f} tokens/s  ({1000 * torch['seconds'] / torch['steps']:.1f} ms/step)")
print(f"ratio retrom3 / PyTorch             : {ours['examples_per_s'] / torch['examples_per_s']:.3f}")
EOF
}

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $CORES cores; load $(cut -d' ' -f1-3 /proc/loadavg)"
case "$SIZE" in
  tiny|both) run_size tiny "--fixture" 4 8 16 32 ;;
esac
case "$SIZE" in
  small|both) run_size small "--layers 6 --hidden 384 --heads 6 --ffn 1536 --max-pos 514" 4 8 32 128 ;;
esac
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
