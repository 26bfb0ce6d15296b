#!/usr/bin/env bash
# Runs every fuzz target for SECS seconds (default 600), one job each, sequentially, under nice.
#   fuzz/run-all.sh [SECS] [target...]
set -uo pipefail
cd "$(dirname "$0")"
secs="${1:-600}"
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(probe open_vhd open_vhdx open_qcow2 vhdx_log_replay ops_vhd ops_vhdx ops_qcow2 convert_roundtrip)
mkdir -p logs
common=(-malloc_limit_mb=256 -rss_limit_mb=2048 -timeout=5 -report_slow_units=1 -print_final_stats=1 "-max_total_time=$secs")
for t in "${targets[@]}"; do
  extra=()
  seeds=()
  case "$t" in
    probe) extra=(-max_len=1048576) ;;
    open_vhd) extra=(-max_len=1048576 -dict=dictionaries/vhd.dict -use_value_profile=1) ;;
    open_vhdx) extra=(-max_len=1048576 -dict=dictionaries/vhdx.dict -use_value_profile=1) ;;
    open_qcow2) extra=(-max_len=1048576 -dict=dictionaries/qcow2.dict -use_value_profile=1) ;;
    vhdx_log_replay) extra=(-max_len=65536 -len_control=0) ;;
    *) extra=(-max_len=4096 -len_control=0) ;;
  esac
  [ -d "seeds/$t" ] && seeds=("seeds/$t")
  mkdir -p "corpus/$t"
  echo "== $t ($secs s)"
  # CPU seconds (user + system) of the whole run go to the end of the log: the done-when
  # counts CPU time, which is less than the wall time on a busy machine.
  /usr/bin/time -a -o "logs/$t.log" -f "cpu seconds: %U user + %S system" \
    nice -n 10 cargo +nightly fuzz run "$t" "corpus/$t" "${seeds[@]}" -- "${common[@]}" "${extra[@]}" \
    > "logs/$t.log" 2>&1
  echo "exit $? ; $(grep -E '^#[0-9]+' "logs/$t.log" | tail -1)"
  grep -E '^cpu seconds' "logs/$t.log"
  grep -E 'stat::number_of_executed_units|stat::peak_rss_mb|SUMMARY|ERROR' "logs/$t.log" | head -5
done
