#!/usr/bin/env bash
# RetroMAE pre-training throughput on the CPU, side by side in one run on the same machine:
# `retrom3 pretrain` (release build) vs the PyTorch reference trainer step (FlagEmbedding 1.2.11
# retromae_pretrain, enhanced decoder), same model config, batch, lengths, texts and thread count.
#
#   tools/bench_retromae_cpu.sh [--threads N] [--steps N] [--warmup-steps N] [--batch-size N]
#                               [--max-len N] [--layers N] [--hidden N] [--heads N] [--ffn N]
#
# Defaults: all cores, 20 timed steps after 3 warm-up steps, batch 8 x 128 tokens, XLM-R 6 layers,
# hidden 384, 6 heads, FFN 1536 (the model of tools/compare_torch_encode.py), the tiny fixture's
# 1000-token tokenizer. Needs the reference env of docs/fixtures.md (PY, default
# /work/refenv/bin/python) and the FlagEmbedding 1.2.11 sdist (found like tools/dump_retromae.py:
# /tmp/fe, else `pip download`). Results: docs/perf.md, section "RetroMAE pre-training".
# RETROM3=path runs that binary instead of building this tree (a before/after row).
#
# retrom3 runs twice: default masking (in-kernel decoder mask) and --reference-compat (materialised
# [B, L, L] masks, as the reference collator builds them). Thread count: MATMUL_NUM_THREADS for our
# GEMMs and torch.set_num_threads for PyTorch; our attention uses one thread per available core, so
# with --threads below the core count both programs are pinned with taskset to the first N cores.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-/work/refenv/bin/python}"
THREADS="$(nproc)" STEPS=20 WARMUP=3 BATCH=8 MAXLEN=128 LAYERS=6 HIDDEN=384 HEADS=6 FFN=1536
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) THREADS="$2" ;; --steps) STEPS="$2" ;; --warmup-steps) WARMUP="$2" ;;
    --batch-size) BATCH="$2" ;; --max-len) MAXLEN="$2" ;; --layers) LAYERS="$2" ;;
    --hidden) HIDDEN="$2" ;; --heads) HEADS="$2" ;; --ffn) FFN="$2" ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift 2
done
PIN=()
if [ "$THREADS" -lt "$(nproc)" ]; then PIN=(taskset -c "0-$((THREADS - 1))"); fi
WORK="$(mktemp -d /tmp/r3-rmae-bench-XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
COMMON=(--dir "$WORK" --threads "$THREADS" --steps "$STEPS" --warmup-steps "$WARMUP" --batch-size "$BATCH"
        --max-len "$MAXLEN" --layers "$LAYERS" --hidden "$HIDDEN" --heads "$HEADS" --ffn "$FFN")
TOTAL=$((STEPS + WARMUP))

# RETROM3 names another binary (e.g. an older build, for a before/after row); else build this tree's.
BIN=${RETROM3:-$ROOT/target/release/retrom3}
[ -n "${RETROM3:-}" ] || (cd "$ROOT" && cargo build --release --bin retrom3 >&2)
"$PY" "$ROOT/tools/retromae_torch_step.py" prepare "${COMMON[@]}" --texts $((TOTAL * BATCH))
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
for variant in ours ours-compat; do
  extra=()
  [ "$variant" = ours-compat ] && extra=(--reference-compat)
  t0=$(date +%s%N)
  MATMUL_NUM_THREADS="$THREADS" RAYON_NUM_THREADS="$THREADS" "${PIN[@]}" "$BIN" pretrain \
    --config "$WORK/config.json" --tokenizer "$ROOT/tests/fixtures/tiny-xlmr" --data "$WORK/texts.txt" \
    --output "$WORK/$variant" --steps "$TOTAL" --batch-size "$BATCH" --max-len "$MAXLEN" --lr 1e-4 \
    --seed 42 "${extra[@]}" 2>/dev/null
  echo "$variant: $(( ($(date +%s%N) - t0) / 1000000 )) ms wall for $TOTAL steps (incl. start-up and final save)"
done
t0=$(date +%s%N)
"${PIN[@]}" "$PY" "$ROOT/tools/retromae_torch_step.py" torch "${COMMON[@]}" 2>/dev/null
echo "torch: $(( ($(date +%s%N) - t0) / 1000000 )) ms wall for $TOTAL steps (incl. import and model build)"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
"$PY" "$ROOT/tools/retromae_torch_step.py" report "${COMMON[@]}"
