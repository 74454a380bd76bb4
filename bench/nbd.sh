#!/usr/bin/env bash
# NBD write throughput: the `nbd` crate's FileBackend export against qemu-nbd, same client,
# same data, same kind of target file, same run.
#
#   bench/nbd.sh [MiB] [rounds]   (defaults: 1024 MiB, 5 rounds)
#
# Run from anywhere; builds nbd/examples/serve.rs in release mode. Work files go to
# $NBD_BENCH_DIR (default: a temporary directory under /var/tmp, removed afterwards); it needs
# about 4 × the data size free.
#
# Sources: two files of MiB random data (no zeros, so neither client can skip anything).
# Targets: one fully allocated raw file per server, overwritten in place by every run (as the
# agent overwrites a protected disk), alternately with each source so that the comparison
# after a run proves that run copied everything. Served as export `disk0` by
#   crate:    nbd/examples/serve.rs (FileBackend: pwrite on tokio's blocking pool, fdatasync
#             on flush)
#   qemu-nbd: qemu-nbd -f raw -t -e 8 (defaults otherwise: cache=writeback, aio=threads)
# Clients:
#   qemu-img convert -n -f raw -O raw SRC nbd://…  (flushes when it closes the export)
#   nbdcopy --flush SRC nbd://…                    (if installed; multi-conn on both servers)
# Each timing covers the client command only (servers are up before it starts), after a
# system-wide `sync`. One untimed warm-up run per client and server comes first (the first
# run after creating gigabytes of files is slow for whichever server gets it). Rounds
# alternate which server goes first; the median is reported.
set -euo pipefail

MIB_TOTAL=${1:-1024}
ROUNDS=${2:-5}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
for tool in qemu-img qemu-nbd python3; do
    command -v "$tool" >/dev/null || { echo "$tool not found (qemu-img and qemu-nbd: qemu-utils)" >&2; exit 1; }
done
CLIENTS=(qemu-img)
if command -v nbdcopy >/dev/null; then
    CLIENTS+=(nbdcopy)
else
    echo "nbdcopy not found (libnbd-bin): measuring qemu-img only" >&2
fi

if [[ -n ${NBD_BENCH_DIR:-} ]]; then
    WORK=$NBD_BENCH_DIR
    mkdir -p "$WORK"
else
    WORK=$(mktemp -d /var/tmp/nbd-bench.XXXXXX)
fi
SERVER_PID=
QEMU_PID_FILE=$WORK/qemu-nbd.pid
cleanup() {
    stop_server
    [[ -z ${NBD_BENCH_DIR:-} ]] && rm -rf "$WORK"
    return 0
}
trap cleanup EXIT

echo "building nbd/examples/serve.rs (release)..." >&2
cargo build --quiet --release --example serve --manifest-path "$ROOT/nbd/Cargo.toml"
BIN=${CARGO_TARGET_DIR:-$ROOT/nbd/target}/release/examples/serve
[[ -x $BIN ]] || BIN=$ROOT/target/release/examples/serve # once the crate joins the workspace
[[ -x $BIN ]] || { echo "cannot find the serve example binary" >&2; exit 1; }

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Starts server $1 on its target file; sets PORT.
start_server() {
    local target=$WORK/target-$1.img
    case $1 in
    crate)
        "$BIN" --port 0 "$target" >"$WORK/serve.out" 2>>"$WORK/serve.err" &
        SERVER_PID=$!
        for _ in $(seq 100); do
            grep -q '^listening on' "$WORK/serve.out" 2>/dev/null && break
            sleep 0.1
        done
        PORT=$(sed -n 's/^listening on .*:\([0-9]*\)$/\1/p' "$WORK/serve.out")
        [[ -n $PORT ]] || { echo "serve did not start" >&2; cat "$WORK/serve.err" >&2; exit 1; }
        ;;
    qemu-nbd)
        PORT=$(free_port)
        qemu-nbd -f raw -t -e 8 -b 127.0.0.1 -p "$PORT" -x disk0 --pid-file "$QEMU_PID_FILE" \
            --fork "$target"
        SERVER_PID=$(cat "$QEMU_PID_FILE")
        ;;
    esac
}

stop_server() {
    [[ -n ${SERVER_PID:-} ]] || return 0
    kill "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    SERVER_PID=
}

declare -A NEXT_SRC=([crate]=a [qemu-nbd]=a)

# One timed copy: client $1 into server $2; sets MBS. (Not run in a subshell: it keeps state.)
measure() {
    local src=$WORK/src-${NEXT_SRC[$2]}.img
    [[ ${NEXT_SRC[$2]} == a ]] && NEXT_SRC[$2]=b || NEXT_SRC[$2]=a
    start_server "$2"
    sync
    local t0 t1 url="nbd://127.0.0.1:$PORT/disk0"
    t0=$(date +%s.%N)
    case $1 in
    qemu-img) qemu-img convert -n -f raw -O raw "$src" "$url" ;;
    nbdcopy) nbdcopy --flush "$src" "$url" ;;
    esac
    t1=$(date +%s.%N)
    stop_server
    cmp -s "$src" "$WORK/target-$2.img" || { echo "MISMATCH: $1 via $2 did not copy the data" >&2; exit 1; }
    MBS=$(awk -v b="$BYTES" -v a="$t0" -v z="$t1" 'BEGIN { printf "%.1f", b / (z - a) / 1e6 }')
}

declare -A RUNS # "client server" → space-separated MB/s figures
median() { tr ' ' '\n' <<<"${RUNS[$1]}" | sed '/^$/d' | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

echo "preparing 2 × ${MIB_TOTAL} MiB of random data and two allocated targets (untimed)..." >&2
BYTES=$((MIB_TOTAL << 20))
for f in src-a src-b; do head -c "$BYTES" /dev/urandom >"$WORK/$f.img"; done
for server in crate qemu-nbd; do head -c "$BYTES" /dev/zero >"$WORK/target-$server.img"; done
sync

echo "warm-up (untimed)..." >&2
for client in "${CLIENTS[@]}"; do
    for server in crate qemu-nbd; do measure "$client" "$server"; done
done

for round in $(seq "$ROUNDS"); do
    echo "round $round/$ROUNDS..." >&2
    order=(crate qemu-nbd)
    ((round % 2 == 0)) && order=(qemu-nbd crate)
    for client in "${CLIENTS[@]}"; do
        for server in "${order[@]}"; do
            measure "$client" "$server"
            RUNS["$client $server"]="${RUNS["$client $server"]:-} $MBS"
        done
    done
done

echo
echo "NBD write throughput, ${MIB_TOTAL} MiB of random data, median of $ROUNDS rounds" \
    "(MB = 10^6 bytes; every run ends with a flush = fdatasync on the server)"
for client in "${CLIENTS[@]}"; do
    c=$(median "$client crate")
    q=$(median "$client qemu-nbd")
    label="qemu-img convert -n"
    [[ $client == nbdcopy ]] && label="nbdcopy --flush"
    printf "%-20s crate %7.1f MB/s | qemu-nbd %7.1f MB/s | ratio %5.2f\n" \
        "$label" "$c" "$q" "$(awk -v c="$c" -v q="$q" 'BEGIN { print c / q }')"
    printf "  per round: crate%s | qemu-nbd%s\n" "${RUNS["$client crate"]}" "${RUNS["$client qemu-nbd"]}"
done
echo "(each target compared with its source after every run: identical)"
