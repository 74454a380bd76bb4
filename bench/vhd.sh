#!/usr/bin/env bash
# Dynamic-VHD write throughput: the `vhd` crate against `qemu-img convert -O vpc`, same data,
# same run, same disk.
#
#   bench/vhd.sh [MiB] [disk GiB]        (defaults: 1024 MiB of data, 8 GiB random-write disk)
#
# Run from the repository root. Builds vhd/examples/bench.rs in release mode. Work files go to
# $VHD_BENCH_DIR (default: a temporary directory under /var/tmp, removed afterwards); it needs
# about 6 × the data size free.
#
# Crate side: `seq` writes the data in 1 MiB calls, `rand` in 64 KiB calls at random aligned
# offsets; `convert-*` is `lifeboat vhd convert` of raw files holding the same data.
# qemu side: `qemu-img convert -f raw -O vpc -o subformat=dynamic,force_size=on -t writeback`
# of those raw files (input in the page cache for both). Every timing includes exactly one
# flush at the end (fdatasync); nothing is synced per block.
set -euo pipefail

MIB_TOTAL=${1:-1024}
DISK_GIB=${2:-8}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
command -v qemu-img >/dev/null || { echo "qemu-img not found: install qemu-utils" >&2; exit 1; }

if [[ -n ${VHD_BENCH_DIR:-} ]]; then
    WORK=$VHD_BENCH_DIR
    mkdir -p "$WORK"
else
    WORK=$(mktemp -d /var/tmp/vhd-bench.XXXXXX)
    trap 'rm -rf "$WORK"' EXIT
fi
rm -f "$WORK"/*.vhd "$WORK"/*.raw

echo "building the benchmark (release)..." >&2
cargo build --quiet --release --features cli --example bench --manifest-path "$ROOT/vhd/Cargo.toml"
BIN=${CARGO_TARGET_DIR:-$ROOT/vhd/target}/release/examples/bench
[[ -x $BIN ]] || BIN=$ROOT/target/release/examples/bench # once the crate joins the workspace

now() { date +%s.%N; }
mbps() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%8.1f", b / s / 1e6 }'; }

echo "crate: writing ${MIB_TOTAL} MiB sequentially and in random 64 KiB writes..." >&2
declare -A BYTES SECS
while read -r tag name bytes secs; do
    [[ $tag == RESULT ]] || continue
    BYTES[$name]=$bytes
    SECS[$name]=$secs
done < <("$BIN" "$WORK" "$MIB_TOTAL" "$DISK_GIB")

for name in seq rand; do
    echo "qemu-img: converting $name.raw..." >&2
    sync
    t0=$(now)
    qemu-img convert -t writeback -f raw -O vpc -o subformat=dynamic,force_size=on \
        "$WORK/$name.raw" "$WORK/$name-qemu.vhd"
    t1=$(now)
    BYTES[qemu-$name]=$(( $(stat -c %b "$WORK/$name.raw") * 512 ))
    SECS[qemu-$name]=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
    # Same content on both sides, or the figures mean nothing.
    for mine in "$name.vhd" "$name-convert.vhd"; do
        qemu-img compare -q -f vpc -F vpc "$WORK/$mine" "$WORK/$name-qemu.vhd" \
            || { echo "MISMATCH: $mine differs from qemu's image" >&2; exit 1; }
    done
done

row() { # label crate-key qemu-key
    local c q
    c=$(mbps "${BYTES[$2]}" "${SECS[$2]}")
    q=$(mbps "${BYTES[$3]}" "${SECS[$3]}")
    printf "%-34s %s MB/s   qemu-img convert %s MB/s   ratio %5.2f\n" "$1" "$c" "$q" \
        "$(awk -v c="$c" -v q="$q" 'BEGIN { print c / q }')"
}
echo
echo "dynamic VHD writes, ${MIB_TOTAL} MiB, one flush (fdatasync) at the end, none per block"
row "crate, sequential 1 MiB writes:" seq qemu-seq
row "crate, random 64 KiB writes:" rand qemu-rand
row "crate convert (raw→vhd), seq data:" convert-seq qemu-seq
row "crate convert (raw→vhd), rand data:" convert-rand qemu-rand
echo "(MB = 10^6 bytes; qemu-img compare: all images identical)"
