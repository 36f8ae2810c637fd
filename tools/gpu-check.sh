#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA driver, no Rust and no network (docs/gpu-log.md).
#
# Build here:   cargo build --release --features cuda      (ships as target/release/retrom3)
# Run there:    OUT=/some/dir bash tools/gpu-check.sh [path/to/retrom3]
#
# Steps (each with its own time limit; the whole run stays under 8 minutes):
#   env        nvidia-smi, the binary's libraries, where libcublas comes from
#   version    retrom3 --version (the kernel build: archs, nvcc)
#   selftest   retrom3 selftest --device cuda (full): every kernel + cuBLAS vs the CPU reference
#   memcheck   compute-sanitizer --tool memcheck on the quick selftest (if compute-sanitizer exists)
#   racecheck  compute-sanitizer --tool racecheck on the quick selftest (idem)
#   kernels    retrom3 bench kernels --device cuda: attention D=64 S=512..8192, GEMM, LayerNorm,
#              cross-entropy, AdamW vs the card's peak / the measured copy bandwidth
#   attn       (only when ONLY names it) the attention rows of `bench kernels` alone
#   model      retrom3 bench model --device cuda: bge-m3-sized random encoder (24 x 1024, vocab
#              250002), S=512, batch 32: encode, training forward+backward, one M3 step and one
#              RetroMAE step (the whole pre-training step on the device), tokens/s
#   model_tcbwd the same with RETROM3_ATTN_BWD=tc (tensor-core attention backward), if selftest passed
#   torch      tools/torch_baseline.py: PyTorch SDPA at D=64, S=512..4096, B*S=16k tokens
#   maxbatch   retrom3 bench max-batch --device cuda: largest M3 training batch, bge-m3 size,
#              S=1024/4096/8192, whole vs sub-batches of 16 (MAXBATCH_CELL_S=20 s per cell:
#              lower bounds when the time runs out; MAXBATCH_LIMIT=170 s for the step; the
#              tensor-core attention backward once the selftest passed); MAXBATCH=0 skips it
#   quickstart retrom3 quickstart --device cuda: RetroMAE pre-training (the whole step on the GPU)
#              and M3 fine-tuning (encoder + heads on the GPU, losses on the host), then
#              evaluation; QUICKSTART=0 skips it
#   profile    (PROFILE=1 only) ncu on the tensor-core attention kernels at S=512, one launch each
#   nsys       (PROFILE=1 only) Nsight Systems' kernel summary of one RetroMAE step (bge-m3 size);
#              nsys_encode the same for the encoder's inference forward
# Env: OUT (logs), SEED, BUDGET (seconds, default 470), SANITIZE=0 skips the two sanitizer steps
# (SANITIZE=memcheck or racecheck runs that one only), TORCH=0 skips the PyTorch baseline, QS_LIMIT
# caps the quickstart step (seconds, default 240), QS_PRETRAIN_STEPS / QS_FINETUNE_STEPS shorten it,
# ONLY=step,step,... runs just those steps (e.g. ONLY=version,maxbatch MAXBATCH_BWD=tc for a call
# of its own; env always runs).
# The sanitizers run last.
# Logs go to $OUT/<step>.log, the table to $OUT/summary.md (also printed). Exit status 0 when no
# step failed; otherwise 1 and a line naming the failed steps. A skipped step says why.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${1:-$ROOT/target/release/retrom3}
OUT=${OUT:-$ROOT/gpu-check-out}
SEED=${SEED:-$(date +%s)}
BUDGET=${BUDGET:-470}   # seconds for all steps together
mkdir -p "$OUT" || { echo "gpu-check: cannot create $OUT" >&2; exit 1; }
SUMMARY=$OUT/summary.md
T_START=$(date +%s)
FAILED=()
ROWS=()

note() { echo "gpu-check: $*"; }
row() { ROWS+=("| $1 | $2 | $3 | $4 |"); }

# run_step NAME LIMIT_S CMD...: runs CMD with a time limit (capped by what is left of BUDGET),
# output to $OUT/NAME.log; sets STEP_RC and records a row (detail from $DETAIL if set).
run_step() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - T_START) ))
  (( limit > left )) && limit=$left
  STEP_SKIPPED=0 STEP_SECS=0
  # A skipped step leaves an empty log, so the summaries that read it find nothing quietly.
  if [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$name,"* ]]; then
    row "$name" SKIP 0 "not in ONLY=$ONLY"; STEP_SKIPPED=1; STEP_RC=0; : >"$OUT/$name.log"; return
  fi
  if (( limit < 10 )); then
    row "$name" "SKIP" 0 "out of time budget (${BUDGET}s)"; STEP_SKIPPED=1; STEP_RC=0
    : >"$OUT/$name.log"; return
  fi
  note "[$name] $* (limit ${limit}s)"
  local t0=$(date +%s)
  { echo "\$ $*"; echo; } >"$OUT/$name.log"
  timeout -k 5 "$limit" "$@" >>"$OUT/$name.log" 2>&1
  STEP_RC=$?
  STEP_SECS=$(( $(date +%s) - t0 ))
}

finish_step() { # NAME DETAIL: record ok/FAIL/TIMEOUT from STEP_RC
  local name=$1 detail=$2 status
  (( STEP_SKIPPED )) && return
  case $STEP_RC in
    0) status=ok ;;
    124|137) status=TIMEOUT; FAILED+=("$name") ;;
    *) status="FAIL (exit $STEP_RC)"; FAILED+=("$name") ;;
  esac
  row "$name" "$status" "$STEP_SECS" "$detail"
  note "[$name] $status in ${STEP_SECS}s: $detail"
}

last_match() { grep -E "$1" "$2" 2>/dev/null | tail -1 | cut -c1-140; }

# ---- env: the GPU, the driver, the binary and libcublas ------------------------------------
{
  echo "date: $(date -u +%FT%TZ)  host: $(hostname)  seed: $SEED"
  uname -a
  nvidia-smi || echo "nvidia-smi FAILED"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv
} >"$OUT/env.log" 2>&1
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  row env "FAIL" 0 "nvidia-smi missing or sees no GPU"; FAILED+=(env)
else
  row env ok 0 "$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)"
fi
if [ ! -x "$BIN" ]; then
  echo "gpu-check: no retrom3 binary at $BIN (build it with cargo build --release --features cuda and carry it)" >&2
  exit 1
fi
# libcublas.so.13: the system's, else the CUDA toolkit's lib64, else PyTorch's pip wheel.
if ! ldconfig -p 2>/dev/null | grep -q 'libcublas\.so\.13'; then
  for d in /usr/local/cuda/lib64 /usr/local/cuda-13*/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
           $(python3 -c 'import nvidia.cublas as m, os; print(os.path.join(list(m.__path__)[0], "lib"))' 2>/dev/null); do
    if ls "$d"/libcublas.so.13* >/dev/null 2>&1; then
      export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; break
    fi
  done
fi
{ echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"; echo "ldd $BIN:"; ldd "$BIN"; } >>"$OUT/env.log" 2>&1

# ---- version -----------------------------------------------------------------------------
run_step version 15 "$BIN" --version
finish_step version "$(last_match '^kernels' "$OUT/version.log")"

# ---- selftest (full) -----------------------------------------------------------------------
run_step selftest 120 "$BIN" selftest --device cuda --seed "$SEED"
finish_step selftest "$(last_match 'rows passed|rows FAILED|error' "$OUT/selftest.log")"

# ---- kernel microbenchmarks and the bge-m3-sized encoder ------------------------------------------
run_step kernels 90 "$BIN" bench kernels --device cuda --iters 10 --json "$OUT/kernels.jsonl"
finish_step kernels "$(grep -E 'attention_fwd_bf16_b32_s512|copy' "$OUT/kernels.log" | awk '{printf "%s %s %s; ", $1, $3, $4}' | cut -c1-140)"
# The attention rows alone (a short call that measures a kernel change: ONLY=version,selftest,attn).
if [[ ",${ONLY:-}," == *",attn,"* ]]; then
  run_step attn 60 "$BIN" bench kernels --device cuda --attention-only --iters 10 \
    --json "$OUT/attn.jsonl"
  finish_step attn "$(grep -cE '^cuda_attention' "$OUT/attn.log" 2>/dev/null) attention rows"
fi
# Issue 4's target: the two-stream (RetroMAE decoder) attention at >= 85% of the plain one's
# throughput at the same shapes, as plain time / two-stream time. "keypad" is the plain kernel
# reading a key-padding mask of ones (the issue's padding-mask attention), "plain" reads none;
# tcdb the double-buffered forward (the default at D 32 / 64), tc the single-buffered one; the
# plain rows name each kernel's default heads per block, hpbN the others (the two-stream mask
# drawn once per block of N heads; kernels::TC_MASK_CACHE_BY_DEFAULT).
for LOG in "$OUT/attn.log" "$OUT/kernels.log"; do
  [ -s "$LOG" ] || continue
  TS=$(awk '{ if ($1 ~ /attention_fwd_/ && match($1, /_s[0-9]+_h/)) {
        s = substr($1, RSTART + 2, RLENGTH - 4); v = $1; sub(/.*attention_fwd_/, "", v); sub(/_bf16_.*/, "", v);
        t[v, s] = $2; if (!(s in seen)) { seen[s] = 1; order[++n] = s } } }
    function r(a, b, s) { return (t[a, s] > 0 && t[b, s] > 0) ? sprintf("%.2f", t[a, s] / t[b, s]) : "-" }
    END { for (k = 1; k <= n; k++) { s = order[k];
        printf "S=%s: tcdb keypad/2s %s (plain/2s %s; hpb1 %s, hpb2 %s, hpb4 %s), tc keypad/2s %s (hpb1 %s, hpb2 %s, hpb4 %s), f+b %s; ", s,
          r("tcdb_keypad", "tcdb_twostream", s), r("tcdb", "tcdb_twostream", s), r("tcdb_keypad", "tcdb_twostream_hpb1", s),
          r("tcdb_keypad", "tcdb_twostream_hpb2", s), r("tcdb_keypad", "tcdb_twostream_hpb4", s), r("tc_keypad", "tc_twostream", s),
          r("tc_keypad", "tc_twostream_hpb1", s), r("tc_keypad", "tc_twostream_hpb2", s), r("tc_keypad", "tc_twostream_hpb4", s),
          r("tc_bwd", "tc_bwd_twostream", s) } }' "$LOG")
  row two_stream INFO 0 "two-stream / plain throughput (target >= 0.85), $(basename "$LOG"): ${TS:-no rows}"
  break
done
if [ -f "$OUT/kernels.log" ]; then
  # Issue 5's target: the ColBERT inference scan (maxsim_docs) at >= 75% of HBM bandwidth.
  MS=$(awk '$1 ~ /_maxsim_docs_/ {printf "%s %s GB/s %s; ", $1, $4, $5}' "$OUT/kernels.log" | sed 's/cuda_maxsim_docs_bf16_//g')
  row maxsim INFO 0 "maxsim_docs GB/s and of copy bandwidth (target >= 75%): ${MS:-no rows}"
fi
run_step model 80 "$BIN" bench model --device cuda --batch 32 --seq 512 --iters 3 --json "$OUT/model.jsonl"
finish_step model "$(grep -E '^cuda_' "$OUT/model.log" | awk '{printf "%s %s tok/s; ", $1, $NF}' | sed 's/_l24_h1024//g' | cut -c1-300)"
# The same with the tensor-core attention backward (RETROM3_ATTN_BWD=tc), once the selftest (whose
# rows include the tensor-core backward kernels) passed in this call: side by side with `model`.
if grep -q "rows passed" "$OUT/selftest.log" 2>/dev/null; then
  run_step model_tcbwd 80 env RETROM3_ATTN_BWD=tc "$BIN" bench model --device cuda --batch 32 \
    --seq 512 --iters 3 --json "$OUT/model_tcbwd.jsonl"
  finish_step model_tcbwd "$(grep -E '^cuda_' "$OUT/model_tcbwd.log" | awk '{printf "%s %s tok/s; ", $1, $NF}' | sed 's/_l24_h1024//g' | cut -c1-300)"
else
  row model_tcbwd SKIP 0 "the selftest did not pass in this call"
fi

# ---- optional: Nsight Compute on the tensor-core attention kernels (PROFILE=1) --------------------
# One launch of each at S = 512 after its warm-up: plain and two-stream forward (4-head blocks and
# one head per block), dQ and dK/dV backward. Clocks are left alone (--clock-control none).
if [ "${PROFILE:-0}" = 1 ]; then
  NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  if [ -z "$NCU" ]; then
    row profile SKIP 0 "ncu not found"
  else
    run_step profile 150 "$NCU" --clock-control none \
      --kernel-name regex:'attention_(fwd|bwd_dq|bwd_dkdv)_tc' --launch-count 14 \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section InstructionStats --section MemoryWorkloadAnalysis \
      "$BIN" bench kernels --device cuda --attention-only --seq-lens 512 --iters 1
    finish_step profile "$(grep -cE '^  attention_' "$OUT/profile.log" 2>/dev/null) kernel reports in profile.log"
  fi
fi

# ---- optional: Nsight Systems on one RetroMAE step (PROFILE=1) ------------------------------------
# Where the RetroMAE step's time goes beyond the encoder's (0.9 s vs 0.54 s per step at B32 S512 in
# session 5): the per-kernel summary of one `bench model --rows retromae` run goes to nsys.log.
if [ "${PROFILE:-0}" = 1 ]; then
  NSYS=$(command -v nsys || ls /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1)
  if [ -z "$NSYS" ]; then
    row nsys SKIP 0 "nsys not found"
  else
    # nsys: the RetroMAE step; nsys_encode: the encoder's inference forward (0.49x of HF's SDPA
    # encoder in session 4), each with its own kernel summary.
    for what in nsys:retromae nsys_encode:encode; do
      step=${what%%:*} rows=${what#*:}
      run_step "$step" 120 "$NSYS" profile --trace=cuda --stats=true --force-overwrite=true \
        -o "$OUT/$step" "$BIN" bench model --device cuda --batch 32 --seq 512 --iters 1 \
        --rows "$rows"
      rm -f "$OUT/$step.nsys-rep" "$OUT/$step.sqlite"
      finish_step "$step" "$(grep -A6 'cuda_gpu_kern_sum' "$OUT/$step.log" 2>/dev/null | tail -3 | awk '{printf "%s%% %s; ", $1, $NF}' | cut -c1-200)"
    done
  fi
fi

# ---- PyTorch SDPA baseline --------------------------------------------------------------------------
if [ "${TORCH:-1}" = 0 ]; then
  row torch SKIP 0 "TORCH=0"
elif python3 -c 'import torch' >/dev/null 2>&1; then
  run_step torch 100 python3 "$ROOT/tools/torch_baseline.py" --json "$OUT/torch_sdpa.jsonl"
  finish_step torch "$(grep -E '^(flash|cudnn)' "$OUT/torch.log" | awk '$3==512||$3==4096{printf "%s S=%s fwd %s f+b %s TF/s; ", $1, $3, $5, $7}')"
else
  row torch SKIP 0 "python3 cannot import torch"
fi

# ---- largest training batch per device (issue 5, the paper's Table 10) -----------------------------
if [ "${MAXBATCH:-1}" = 0 ]; then
  row maxbatch SKIP 0 "MAXBATCH=0"
else
  # Memory, not speed, is measured, but each probe is a full step: the tensor-core attention
  # backward (once this call's selftest passed) makes the large ones several times shorter.
  # MAXBATCH_BWD=tc|cc picks it outright (a call that runs maxbatch alone, ONLY=maxbatch, after
  # an earlier call's selftest passed).
  MB_ENV=()
  if [ -n "${MAXBATCH_BWD:-}" ]; then
    MB_ENV=(RETROM3_ATTN_BWD="$MAXBATCH_BWD")
  elif grep -q "rows passed" "$OUT/selftest.log" 2>/dev/null; then
    MB_ENV=(RETROM3_ATTN_BWD=tc)
  fi
  run_step maxbatch "${MAXBATCH_LIMIT:-170}" env "${MB_ENV[@]}" "$BIN" bench max-batch --device cuda \
    --seq-lens 1024,4096,8192 --sub-batch 0,16 --budget-s "${MAXBATCH_CELL_S:-20}" \
    --json "$OUT/max_batch.jsonl"
  finish_step maxbatch "$(awk '$1 ~ /^[0-9]+$/ {printf "S=%s sub %s: %s; ", $1, $2, $3}' "$OUT/maxbatch.log")"
fi

# ---- the device trainers end to end (quickstart --device cuda: RetroMAE + M3 on the GPU encoder) ----
if [ "${QUICKSTART:-1}" = 0 ]; then
  row quickstart SKIP 0 "QUICKSTART=0"
else
  QS_DIR=$(mktemp -d /tmp/retrom3-qs.XXXXXX)
  QS_ARGS=()
  [ -n "${QS_PRETRAIN_STEPS:-}" ] && QS_ARGS+=(--pretrain-steps "$QS_PRETRAIN_STEPS")
  [ -n "${QS_FINETUNE_STEPS:-}" ] && QS_ARGS+=(--finetune-steps "$QS_FINETUNE_STEPS")
  run_step quickstart "${QS_LIMIT:-240}" "$BIN" quickstart --device cuda --data "$ROOT/data/demo" \
    --output "$QS_DIR" "${QS_ARGS[@]}"
  cp "$QS_DIR/summary.md" "$OUT/quickstart_summary.md" 2>/dev/null
  finish_step quickstart "$(grep -E 'test queries|error' "$OUT/quickstart.log" 2>/dev/null | tail -1 | cut -c1-140)"
fi

# ---- compute-sanitizer on the quick selftest ----------------------------------------------------
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer 2>/dev/null | head -1)
for tool in memcheck racecheck; do
  if [ "${SANITIZE:-1}" = 0 ] || { [ "${SANITIZE:-1}" != 1 ] && [ "${SANITIZE}" != "$tool" ]; }; then
    row "$tool" SKIP 0 "SANITIZE=0 (short lease)"; continue
  fi
  if [ -z "$SANITIZER" ]; then
    row "$tool" SKIP 0 "compute-sanitizer not found"; continue
  fi
  run_step "$tool" "${SAN_LIMIT:-60}" "$SANITIZER" --tool "$tool" --error-exitcode 97 --print-limit 20 \
    "$BIN" selftest --device cuda --quick --seed "$SEED"
  finish_step "$tool" "$(last_match 'ERROR SUMMARY|RACECHECK SUMMARY|rows passed|rows FAILED' "$OUT/$tool.log")"
done

# ---- summary ------------------------------------------------------------------------------------
TOTAL=$(( $(date +%s) - T_START ))
{
  echo "# gpu-check $(date -u +%FT%TZ) on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1) (seed $SEED, ${TOTAL}s)"
  echo
  echo "| step | status | s | detail |"
  echo "|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
  echo
  if [ -f "$OUT/torch.log" ]; then echo '```'; grep -vE '^\$|^$' "$OUT/torch.log"; echo '```'; fi
} >"$SUMMARY"
cat "$SUMMARY"
if (( ${#FAILED[@]} > 0 )); then
  echo "gpu-check: FAILED steps: ${FAILED[*]} (logs in $OUT)" >&2
  exit 1
fi
echo "gpu-check: all steps passed or were skipped with a reason (logs in $OUT)"
