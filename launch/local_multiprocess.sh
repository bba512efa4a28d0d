#!/usr/bin/env bash
# Start N processes of the main job on this machine, joined by jax.distributed (CPU collectives: gloo).
#
#   launch/local_multiprocess.sh NUM_PROCESSES --config tiny --workdir /tmp/mp [more main flags]
#
# Variables (all optional):
#   PYTHON                   interpreter to run (default: python3)
#   PORT                     coordinator port on 127.0.0.1 (default: a free port)
#   CPU_DEVICES_PER_PROCESS  fake CPU devices per process (default: 1)
#   LOG_DIR                  per-process logs process_<i>.log (default: a new temporary directory)
#   TIMEOUT_S                kill every process after this many seconds (default: 0 = no limit)
# Exits 0 when every process exits 0; otherwise stops the others and exits with the first failure's status.
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NUM_PROCESSES [python -m mmdiff_jax.main flags...]" >&2
  exit 2
fi
num_processes=$1
shift
python=${PYTHON:-python3}
port=${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
devices=${CPU_DEVICES_PER_PROCESS:-1}
log_dir=${LOG_DIR:-$(mktemp -d -t mmdiff_mp.XXXXXX)}
timeout_s=${TIMEOUT_S:-0}
mkdir -p "$log_dir"

pids=()
stop_all() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < num_processes; i++)); do
  JAX_PLATFORMS=cpu timeout --signal=TERM --kill-after=30 "$timeout_s" \
    "$python" -m mmdiff_jax.main "$@" \
    --cpu_devices="$devices" --coordinator_address="127.0.0.1:$port" \
    --num_processes="$num_processes" --process_id="$i" >"$log_dir/process_$i.log" 2>&1 &
  pids+=("$!")
done
echo "started $num_processes processes (pids ${pids[*]}), coordinator 127.0.0.1:$port, logs in $log_dir"

status=0
running=("${pids[@]}")
while ((${#running[@]} > 0)); do
  finished_pid=""
  finished_status=0
  wait -n -p finished_pid "${running[@]}" || finished_status=$?
  still=()
  for pid in "${running[@]}"; do
    [[ "$pid" == "$finished_pid" ]] || still+=("$pid")
  done
  running=("${still[@]}")
  if ((finished_status != 0 && status == 0)); then
    status=$finished_status
    echo "process pid $finished_pid exited with status $status: stopping the others (see $log_dir)" >&2
    stop_all
  fi
done
for ((i = 0; i < num_processes; i++)); do
  echo "--- process $i: last lines of $log_dir/process_$i.log"
  tail -n 3 "$log_dir/process_$i.log"
done
exit "$status"
