#!/usr/bin/env bash
# The whole suite under every ATen CPU capability this CPU has (default, avx2, avx512) and with
# 1 and 2 threads: a float check that holds only for one kernel family's rounding fails here.
# Usage: [SWEEP_THREADS="1 2"] scripts/test_sweep.sh [PYTHON] [pytest args...]; a summary line per
# run, exit 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${1:-.venv/bin/python}"
shift || true
best=$("$PYTHON" -c "import torch; print(torch.backends.cpu.get_cpu_capability().lower())")
caps=(default)
case "$best" in
  avx2) caps+=(avx2) ;;
  avx512*) caps+=(avx2 avx512) ;;
esac
logs=$(mktemp -d)
status=0
summary=()
for cap in "${caps[@]}"; do
  for threads in ${SWEEP_THREADS:-1 2}; do
    log="$logs/$cap-$threads.log"
    start=$SECONDS
    ATEN_CPU_CAPABILITY=$cap CONSISTENCY_LENS_TEST_THREADS=$threads \
      "$PYTHON" -m pytest tests -p no:cacheprovider -o addopts="" -q "$@" >"$log" 2>&1
    rc=$?
    line="ATEN_CPU_CAPABILITY=$cap threads=$threads: $(tail -n 1 "$log") (exit $rc, $((SECONDS - start)) s)"
    echo "$line"
    summary+=("$line")
    [ "$rc" -eq 0 ] || { status=1; grep -E "^(FAILED|ERROR) " "$log"; }
  done
done
echo "logs in $logs"
printf '%s\n' "${summary[@]}"
exit $status
