#!/usr/bin/env bash
# Launch NPROC ranks of a retrom3 command on this machine, one process per GPU, with the
# torchrun-style variables retrom3 reads (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
#
#   tools/launch.sh 8 -- target/release/retrom3 finetune --device cuda --model ... --output out
#   MASTER_PORT=29600 tools/launch.sh 2 -- retrom3 finetune --device cpu ...
#
# Rank r runs on GPU LOCAL_RANK = r (with --device cuda). Rank 0 writes the output and shows the
# progress bar; ranks 1.. write their stderr to $LOG_DIR/rank-r.log (default: the current dir).
# If any rank fails, the others are stopped and the script exits with that rank's status.
# Several machines: run this on each with NODE_RANK / NNODES set and MASTER_ADDR = node 0.
set -euo pipefail

if [[ $# -lt 3 || "$2" != "--" ]]; then
  echo "usage: $0 NPROC -- COMMAND [ARGS...]" >&2
  exit 2
fi
nproc="$1"
shift 2
nnodes="${NNODES:-1}"
node="${NODE_RANK:-0}"
# Whole numbers only (bash arithmetic would read "two" as an unset variable, 0 would run nothing).
for v in "NPROC=$nproc" "NNODES=$nnodes" "NODE_RANK=$node"; do
  if [[ ! "${v#*=}" =~ ^(0|[1-9][0-9]*)$ ]]; then # no leading zeros: bash reads them as octal
    echo "launch.sh: ${v%%=*} must be a whole number, got '${v#*=}'" >&2
    exit 2
  fi
done
if ((nproc < 1 || nnodes < 1 || node >= nnodes)); then
  echo "launch.sh: need NPROC >= 1, NNODES >= 1 and NODE_RANK < NNODES (got $nproc, $nnodes, $node)" >&2
  exit 2
fi
export WORLD_SIZE=$((nproc * nnodes))
export MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
export MASTER_PORT="${MASTER_PORT:-29500}"
log_dir="${LOG_DIR:-.}"
mkdir -p "$log_dir"

pids=()
stop_all() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
}
trap stop_all INT TERM

for ((i = 0; i < nproc; i++)); do
  rank=$((node * nproc + i))
  if [[ $rank -eq 0 ]]; then
    RANK=$rank LOCAL_RANK=$i "$@" &
  else
    RANK=$rank LOCAL_RANK=$i "$@" 2>"$log_dir/rank-$rank.log" &
  fi
  pids+=("$!")
done

status=0
for ((n = 0; n < nproc; n++)); do
  wait -n || status=$?
  if [[ $status -ne 0 ]]; then
    echo "launch.sh: a rank failed (exit $status); stopping the others (logs in $log_dir)" >&2
    stop_all
    wait || true
    exit "$status"
  fi
done
exit "$status"
