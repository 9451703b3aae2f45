#!/usr/bin/env bash
# Starts N local processes of one multi-process run on this machine, for trying it and for the tests.
#
#   scripts/launch_local.sh N [--devices=D] -- COMMAND [ARGS...]
#   scripts/launch_local.sh 2 -- python -m mmard_jax.train --config=configs/demo.py --workdir=/tmp/run
#
# Process I runs `COMMAND ARGS --coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=I` on the
# CPU (JAX_PLATFORMS=cpu unless set) with D simulated CPU devices (XLA_FLAGS
# --xla_force_host_platform_device_count=D, default 1; any such flag already in XLA_FLAGS is replaced).
# PORT is a free local port (or $LAUNCH_PORT). Each output line is prefixed with "[I] "; the process ids
# go to stderr as "launch_local: process I of N is pid P". SIGTERM/SIGINT are passed on to every process.
# Exit status: the first non-zero status in process order (0 if all succeeded).
set -u

usage() {
    echo "usage: $0 N [--devices=D] -- COMMAND [ARGS...]" >&2
    exit 2
}

[ $# -ge 1 ] || usage
n=$1
shift
[[ "$n" =~ ^[1-9][0-9]*$ ]] || usage
devices=1
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    case "$1" in
        --devices=*) devices=${1#--devices=} ;;
        *) usage ;;
    esac
    shift
done
[[ "$devices" =~ ^[1-9][0-9]*$ ]] || usage
[ "${1:-}" = "--" ] || usage
shift
[ $# -ge 1 ] || usage

python=${PYTHON:-python3}
port=${LAUNCH_PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
xla_flags="$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g') --xla_force_host_platform_device_count=$devices"

pids=()
for ((i = 0; i < n; i++)); do
    XLA_FLAGS="$xla_flags" JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}" PYTHONUNBUFFERED=1 \
        "$@" --coordinator_address="127.0.0.1:$port" --num_processes="$n" --process_id="$i" \
        > >(sed -u "s/^/[$i] /") 2> >(sed -u "s/^/[$i] /" >&2) &
    pids+=("$!")
    echo "launch_local: process $i of $n is pid $! (127.0.0.1:$port, $devices CPU device(s))" >&2
done

forward() {
    kill "-$1" "${pids[@]}" 2>/dev/null
}
trap 'forward TERM' TERM
trap 'forward INT' INT

status=0
for pid in "${pids[@]}"; do
    while true; do
        wait "$pid"
        code=$?
        kill -0 "$pid" 2>/dev/null || break  # `wait` also returns when a trapped signal arrives
    done
    if [ "$code" -ne 0 ] && [ "$status" -eq 0 ]; then
        status=$code
    fi
done
exit "$status"
