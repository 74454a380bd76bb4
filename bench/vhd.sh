#!/usr/bin/env bash
# Dynamic-VHD write throughput: the `vhd` crate against `qemu-img convert -O vpc`, same data,
# same run, same disk.
#
#   bench/vhd.sh [MiB] [disk GiB] [rounds]   (defaults: 1024 MiB, 8 GiB random-write disk, 3)
#
# Run from the repository root. Builds vhd/examples/bench.rs in release mode. Work files go to
# $VHD_BENCH_DIR (default: a temporary directory under /var/tmp, removed afterwards); it needs
# about 7 × the data size free.
#
# Crate side: `seq` writes the data in 1 MiB calls, `rand` in 64 KiB calls at random aligned
# offsets (both through Image::write_at); `convert-*` is `lifeboat vhd convert` of raw files
# holding the same data. Each crate run flushes once at the end (two fdatasyncs), never per
# block.
# qemu side: `qemu-img convert -f raw -O vpc -o subformat=dynamic,force_size=on` of those raw
# files, twice: with `-t writeback` (qemu's vpc driver then syncs three times per allocated
# block: bitmap, footer, BAT entry), and with `-t unsafe` (flushes ignored) followed by one
# fdatasync of the image (`sync --data`), which is the like-for-like figure: one flush at the
# end. Ratios are against the faster of the two.
# Every timing starts after a system-wide `sync`; measurements are interleaved over the rounds
# and the median is reported.
set -euo pipefail

MIB_TOTAL=${1:-1024}
DISK_GIB=${2:-8}
ROUNDS=${3:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
command -v qemu-img >/dev/null || { echo "qemu-img not found: install qemu-utils" >&2; exit 1; }

if [[ -n ${VHD_BENCH_DIR:-} ]]; then
    WORK=$VHD_BENCH_DIR
    mkdir -p "$WORK"
else
    WORK=$(mktemp -d /var/tmp/vhd-bench.XXXXXX)
    trap 'rm -rf "$WORK"' EXIT
fi

echo "building the benchmark (release)..." >&2
cargo build --quiet --release --features cli --example bench --manifest-path "$ROOT/vhd/Cargo.toml"
BIN=${CARGO_TARGET_DIR:-$ROOT/vhd/target}/release/examples/bench
[[ -x $BIN ]] || BIN=$ROOT/target/release/examples/bench # once the crate joins the workspace
bench() { "$BIN" "$1" "$WORK" "$MIB_TOTAL" "$DISK_GIB"; }

declare -A RUNS # name → space-separated MB/s figures
record() { RUNS[$1]="${RUNS[$1]:-} $(awk -v b="$2" -v s="$3" 'BEGIN { printf "%.1f", b / s / 1e6 }')"; }
median() { tr ' ' '\n' <<<"${RUNS[$1]}" | sed '/^$/d' | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

echo "preparing ${MIB_TOTAL} MiB of data (untimed)..." >&2
bench prepare
for round in $(seq "$ROUNDS"); do
    echo "round $round/$ROUNDS..." >&2
    for name in seq rand; do
        while read -r tag mode bytes secs flush; do
            [[ $tag == RESULT ]] && record "$mode" "$bytes" "$secs"
        done < <(bench "$name"; bench "convert-$name")
        bytes=$(( $(stat -c %b "$WORK/$name.raw") * 512 ))
        for cache in writeback unsafe; do
            rm -f "$WORK/$name-qemu.vhd"
            sync
            t0=$(date +%s.%N)
            qemu-img convert -t "$cache" -f raw -O vpc -o subformat=dynamic,force_size=on \
                "$WORK/$name.raw" "$WORK/$name-qemu.vhd"
            [[ $cache == unsafe ]] && sync --data "$WORK/$name-qemu.vhd"
            t1=$(date +%s.%N)
            record "qemu-$cache-$name" "$bytes" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')"
        done
        # Same content on both sides, or the figures mean nothing.
        for mine in "$name.vhd" "$name-convert.vhd"; do
            qemu-img compare -q -f vpc -F vpc "$WORK/$mine" "$WORK/$name-qemu.vhd" \
                || { echo "MISMATCH: $mine differs from qemu's image" >&2; exit 1; }
        done
    done
done

row() { # label crate-key name
    local c w u q
    c=$(median "$2")
    w=$(median "qemu-writeback-$3")
    u=$(median "qemu-unsafe-$3")
    q=$(awk -v w="$w" -v u="$u" 'BEGIN { print (w > u ? w : u) }')
    printf "%-36s %7.1f MB/s | qemu-img %7.1f (writeback) %7.1f (unsafe+1 sync) MB/s | ratio %5.2f\n" \
        "$1" "$c" "$w" "$u" "$(awk -v c="$c" -v q="$q" 'BEGIN { print c / q }')"
}
echo
echo "dynamic VHD writes, ${MIB_TOTAL} MiB, median of $ROUNDS rounds. Crate: one flush" \
    "(fdatasync) at the end of each run, none per block."
row "crate API, sequential 1 MiB writes:" seq seq
row "crate API, random 64 KiB writes:" rand rand
row "crate convert raw→vhd, seq data:" convert-seq seq
row "crate convert raw→vhd, rand data:" convert-rand rand
for k in seq rand convert-seq convert-rand qemu-writeback-seq qemu-unsafe-seq \
    qemu-writeback-rand qemu-unsafe-rand; do
    printf "  %-20s MB/s per round:%s\n" "$k" "${RUNS[$k]}"
done
echo "(MB = 10^6 bytes; ratio = crate / faster qemu variant; qemu-img compare: images identical)"
