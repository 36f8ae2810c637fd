#!/usr/bin/env bash
# Static SASS statistics of the sm_90 kernels of one kernels/*.cu file, no GPU needed: per kernel
# the instructions, the 64-bit multiply pieces (IMAD.WIDE / IMAD.HI) and the branch-sync regions
# (BSSY) -- the counts docs/perf.md quotes for session 6's attention changes.
#
#   tools/sass-counts.sh [attention] [regex]     # after cargo build --release --features cuda
#
# cuobjdump and nvdisasm come from pinned NVIDIA PyPI wheels unpacked into .cuda/sass-tools
# (git-ignored; ~40 MB, once). The cubin is the release build's fatbin (target/release/build/*/out).
set -euo pipefail
cd "$(dirname "$0")/.."
STEM=${1:-attention}
PATTERN=${2:-.}
TOOLS=.cuda/sass-tools
if [ ! -x "$TOOLS/bin/nvdisasm" ] || [ ! -x "$TOOLS/bin/cuobjdump" ]; then
  mkdir -p "$TOOLS/dl" "$TOOLS/bin"
  python3 -m pip download -q --no-deps --disable-pip-version-check -d "$TOOLS/dl" \
    nvidia-cuda-cuobjdump==13.2.51 nvidia-cuda-nvdisasm==13.5.37
  for w in "$TOOLS"/dl/*.whl; do python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$w" "$TOOLS/x"; done
  cp "$(find "$TOOLS/x" -type f -name cuobjdump | head -1)" "$(find "$TOOLS/x" -type f -name nvdisasm | head -1)" "$TOOLS/bin/"
  chmod +x "$TOOLS/bin/"*
fi
FATBIN=$(ls -t target/release/build/retrom3-*/out/"$STEM".fatbin 2>/dev/null | head -1)
[ -n "$FATBIN" ] || { echo "no $STEM.fatbin: cargo build --release --features cuda first" >&2; exit 1; }
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
(cd "$WORK" && PATH="$OLDPWD/$TOOLS/bin:$PATH" cuobjdump -xelf "$STEM.sm_90.cubin" "$OLDPWD/$FATBIN" >/dev/null)
PATH="$TOOLS/bin:$PATH" cuobjdump -sass "$WORK/$STEM.sm_90.cubin" | python3 -c '
import re, sys
pat = re.compile(sys.argv[1])
rows, cur = {}, None
for line in sys.stdin:
    m = re.search(r"Function : (\S+)", line)
    if m:
        cur = m.group(1); rows[cur] = [0, 0, 0]; continue
    m = re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
    if m and cur:
        t = m.group(1); r = rows[cur]; r[0] += 1
        r[1] += ("IMAD.WIDE" in t) or ("IMAD.HI" in t)
        r[2] += t.startswith("BSSY")
print("%-48s %7s %7s %5s" % ("kernel", "instr", "imad64", "bssy"))
for k in sorted(rows):
    if pat.search(k):
        print("%-48s %7d %7d %5d" % (k, rows[k][0], rows[k][1], rows[k][2]))
' "$PATTERN"
