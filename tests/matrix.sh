#!/usr/bin/env bash
# The suite under each CPU kernel path torch can dispatch to (ATEN_CPU_CAPABILITY: default = scalar,
# avx2, avx512) and under 1 and 2 threads: every bound must hold on any machine's kernels.
#   bash tests/matrix.sh [pytest args...]              all six combinations (the whole suite: ~6x its time)
#   MATRIX="avx2:1 default:2" bash tests/matrix.sh tests/ops tests/hf     chosen combinations, chosen tests
# A capability this CPU lacks is skipped (torch would silently fall back to another one). Prints one
# line per combination and exits non-zero if any failed.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash launch/setup_env.sh >/dev/null || exit 1
VENV="${OUTEFF_VENV:-$ROOT/.venv}"
status=0
summary=()
for combo in ${MATRIX:-default:1 default:2 avx2:1 avx2:2 avx512:1 avx512:2}; do
  cap="${combo%%:*}" threads="${combo##*:}"
  got="$(ATEN_CPU_CAPABILITY="$cap" "$VENV/bin/python" -c 'import torch; print(torch.backends.cpu.get_cpu_capability())' 2>/dev/null)"
  if [ "${got,,}" != "${cap,,}" ]; then
    summary+=("ATEN_CPU_CAPABILITY=$cap OMP_NUM_THREADS=$threads: skipped (this CPU runs $got)")
    continue
  fi
  echo "== ATEN_CPU_CAPABILITY=$cap OMP_NUM_THREADS=$threads" >&2
  start=$SECONDS
  if ATEN_CPU_CAPABILITY="$cap" OMP_NUM_THREADS="$threads" bash tests/run.sh -q -p no:cacheprovider "$@"; then
    result=passed
  else
    result=FAILED
    status=1
  fi
  summary+=("ATEN_CPU_CAPABILITY=$cap OMP_NUM_THREADS=$threads: $result in $((SECONDS - start)) s")
done
printf '%s\n' "${summary[@]}"
exit $status
