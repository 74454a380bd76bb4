#!/usr/bin/env bash
# NBD write throughput: the `nbd` crate's FileBackend export against qemu-nbd, same client,
# same data, same kind of target file, same run.
#
#   bench/nbd.sh [MiB] [rounds]   (defaults: 1024 MiB, 3 rounds)
#
# Run from anywhere; builds nbd/examples/serve.rs in release mode. Work files go to
# $NBD_BENCH_DIR (default: a temporary directory under /var/tmp, removed afterwards); it needs
# about 2 × the data size free.
#
# Source: MiB of random data (no zeros, so neither client can skip anything). Target: a fresh
# sparse raw file of the same size for every run, served as export `disk0` by
#   crate:    nbd/examples/serve.rs (FileBackend: pwrite on tokio's blocking pool, fdatasync
#             on flush)
#   qemu-nbd: qemu-nbd -f raw -t -e 8 (defaults otherwise: cache=writeback, aio=threads)
# Clients:
#   qemu-img convert -n -f raw -O raw SRC nbd://…  (flushes when it closes the export)
#   nbdcopy --flush SRC nbd://…                    (if installed; multi-conn on both servers)
# Each timing covers the client command only (servers are up before it starts), after a
# system-wide `sync`. The target is compared with the source after every run. Rounds
# alternate which server goes first; the median is reported.
set -euo pipefail

MIB_TOTAL=${1:-1024}
ROUNDS=${2:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
for tool in qemu-img qemu-nbd python3; do
    command -v "$tool" >/dev/null || { echo "$tool not found (install qemu-utils)" >&2; exit 1; }
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

# Starts server $1 on $WORK/target.img; sets PORT.
start_server() {
    rm -f "$WORK/target.img"
    truncate -s "${MIB_TOTAL}M" "$WORK/target.img"
    case $1 in
    crate)
        "$BIN" --port 0 "$WORK/target.img" >"$WORK/serve.out" 2>>"$WORK/serve.err" &
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
            --fork "$WORK/target.img"
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

run_client() { # client url
    case $1 in
    qemu-img) qemu-img convert -n -f raw -O raw "$WORK/src.img" "$2" ;;
    nbdcopy) nbdcopy --flush "$WORK/src.img" "$2" ;;
    esac
}

declare -A RUNS # "client server" → space-separated MB/s figures
median() { tr ' ' '\n' <<<"${RUNS[$1]}" | sed '/^$/d' | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

echo "preparing ${MIB_TOTAL} MiB of random data (untimed)..." >&2
head -c "$((MIB_TOTAL << 20))" /dev/urandom >"$WORK/src.img"
BYTES=$((MIB_TOTAL << 20))

for round in $(seq "$ROUNDS"); do
    echo "round $round/$ROUNDS..." >&2
    order=(crate qemu-nbd)
    ((round % 2 == 0)) && order=(qemu-nbd crate)
    for client in "${CLIENTS[@]}"; do
        for server in "${order[@]}"; do
            start_server "$server"
            sync
            t0=$(date +%s.%N)
            run_client "$client" "nbd://127.0.0.1:$PORT/disk0"
            t1=$(date +%s.%N)
            stop_server
            cmp -s "$WORK/src.img" "$WORK/target.img" \
                || { echo "MISMATCH: $client via $server did not copy the data" >&2; exit 1; }
            mbs=$(awk -v b="$BYTES" -v a="$t0" -v z="$t1" 'BEGIN { printf "%.1f", b / (z - a) / 1e6 }')
            RUNS["$client $server"]="${RUNS["$client $server"]:-} $mbs"
        done
    done
done
rm -f "$WORK/target.img"

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
echo "(target compared with the source after every run: identical)"
