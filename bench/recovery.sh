#!/usr/bin/env bash
# Recovery benchmarks (issue: recovery points, test failover, failover), in one run:
#  (a) test-failover start time for a 1 GiB and a 16 GiB disk (same amount of data and
#      history on both): the job's own duration and the CLI's wall time;
#  (b) reading the whole 1 GiB disk through a point-in-time view over NBD (a point with 256 MiB
#      of newer writes after it, read from the journal) versus reading the replica VHD file
#      directly, both with `qemu-img convert` into qemu's null driver;
#  (c) time to fail over to a point BACK_SECS back (default 600 s: ten minutes) while fio
#      writes 20 MB/s of 64 KiB random blocks.
# Usage: bench/recovery.sh [BACK_SECS (default 600)]
# SECTIONS="a b" runs only some of them; KEEP=1 keeps the work directory.
set -euo pipefail
cd "$(dirname "$0")/.."
want() { [[ " ${SECTIONS:-a b c} " == *" $1 "* ]]; }
BACK_SECS=${1:-600}
for tool in qemu-img qemu-io python3 curl fio; do
  command -v $tool >/dev/null || { echo "needs $tool (Debian: qemu-utils python3 curl fio)"; exit 1; }
done
BENCH_POLICY_FLAGS="--crash-consistent-every 5s --app-consistent-every 0s --retention 2h"
source bench/lib.sh

# Runs a recovery command; prints "JOB_MS WALL_MS" and leaves its output in $WORK/last.txt.
timed() {
  local t0 t1 job
  t0=$(now)
  $BIN/lifeboat "$@" > $WORK/last.txt 2>&1 || { cat $WORK/last.txt; exit 1; }
  t1=$(now)
  job=$(grep -o 'job-[0-9a-f-]*' $WORK/last.txt | head -1)
  $BIN/lifeboat job show $job --json | python3 -c "
import json,sys; j=json.load(sys.stdin)
print(j['updated_at_unix_ms']-j['created_at_unix_ms'], round(($t1-$t0)*1000))"
}
uri() { grep -o 'nbd://[^ ]*' $WORK/last.txt | head -1; }
# The newest point of machine $1 (any kind) taken before Unix ms $2.
point_before() {
  $BIN/lifeboat recovery-points $1 --json | python3 -c "
import json,sys; p=[x for x in json.load(sys.stdin)['points'] if x['time_unix_ms'] <= $2]
print(p[-1]['id'] if p else '')"
}
now_ms() { python3 -c 'import time; print(int(time.time()*1000))'; }
# Writes $3 MiB of random data in 1 MiB pieces at random places of machine $1's export $2.
scatter() {
  python3 - "$3" "$4" <<'PY' > $WORK/writes.txt
import random, sys
n, size_mib = int(sys.argv[1]), int(sys.argv[2])
for i in range(n):
    print(f"write -P {random.randrange(1,255)} {random.randrange(size_mib)}M 1M")
PY
  local args=(); while read -r l; do args+=(-c "$l"); done < $WORK/writes.txt
  qemu-io -f raw "${args[@]}" nbd://$2/disk0 >/dev/null
}

if want a; then
echo "== (a) test-failover start: 1 GiB vs 16 GiB disk, 512 MiB written to each (256 MiB before the point, 256 MiB after)"
for g in 1 16; do
  truncate -s ${g}G $WORK/a$g.img
  NBD=127.0.0.1:$(port)
  protect bench-a$g $WORK/a$g.img $NBD
  caught_up bench-a$g
  scatter bench-a$g $NBD 256 $((g * 1024))
  sleep 6; caught_up bench-a$g
  P=$(point_before bench-a$g $(now_ms))
  scatter bench-a$g $NBD 256 $((g * 1024))
  caught_up bench-a$g
  JOBS=()
  for round in 1 2 3 4 5; do
    [ $round = 1 ] || $BIN/lifeboat test-failover cleanup bench-a$g >/dev/null
    read JOB WALL < <(timed test-failover bench-a$g --point $P)
    JOBS+=($JOB)
  done
  MED=$(printf '%s\n' "${JOBS[@]}" | sort -n | sed -n 3p)
  echo "${g} GiB disk: test failover to $P: median ${MED} ms of 5 (${JOBS[*]} ms; job duration: choose the point, open the views, record them), CLI ${WALL} ms (it polls the job every second)"
  eval "JOB_$g=$MED"
  cp $WORK/last.txt $WORK/a$g-view.txt
done
echo "ratio 16 GiB / 1 GiB: $(python3 -c "print(f'{$JOB_16/max($JOB_1,1):.2f}')")   (goal: about 1)"
fi

if want b; then
echo "== (b) reading a point-in-time view over NBD vs the replica VHD file"
if ! want a; then echo "needs section a"; exit 1; fi
VIEW=$(grep -o 'nbd://[^ ]*' $WORK/a1-view.txt | head -1)
D=$(python3 -c "print('$VIEW'.rsplit('test-',1)[1])")
SIZE=$((1 << 30))
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
t0=$(now); qemu-img convert -n -f raw "$VIEW" --target-image-opts driver=null-co,size=$SIZE; t1=$(now)
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
t2=$(now); qemu-img convert -n -f vpc $WORK/master-target/replicas/$D/disk.vhd --target-image-opts driver=null-co,size=$SIZE; t3=$(now)
V=$(rate $SIZE $t0 $t1); R=$(rate $SIZE $t2 $t3)
echo "view over NBD: $(python3 -c "print(f'{$t1-$t0:.2f}')") s ($V MB/s)   replica VHD file: $(python3 -c "print(f'{$t3-$t2:.2f}')") s ($R MB/s)   ratio: $(python3 -c "print(f'{$V/$R:.2f}')")"
echo "(NBD carries the zeros of unallocated ranges; qemu reading the VHD skips them)"
$BIN/lifeboat test-failover cleanup bench-a16 >/dev/null
$BIN/lifeboat test-failover cleanup bench-a1 >/dev/null
fi

if want c; then
echo "== (c) failover to a point ${BACK_SECS} s back while fio writes 20 MB/s"
truncate -s 4G $WORK/c.img
NBD=127.0.0.1:$(port)
protect bench-c $WORK/c.img $NBD
caught_up bench-c
fio --name=load --ioengine=nbd --uri=nbd://$NBD/disk0 --rw=randwrite --bs=64k --iodepth=4 \
    --rate=20000000 --time_based --runtime=$((BACK_SECS + 60)) --size=4g --randrepeat=0 \
    --output=$WORK/fio-c.txt >/dev/null 2>&1 & FIO=$!
sleep 20
START=$(now_ms)
sleep $BACK_SECS
P=$(point_before bench-c $((START + 6000)))
JOURNAL=$($BIN/lifeboat recovery-points bench-c --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["journal_bytes"]>>20)')
read JOB WALL < <(timed failover bench-c --point $P)
echo "failover to $P (${BACK_SECS} s back, journal ${JOURNAL} MiB): ${JOB} ms (job), ${WALL} ms (CLI)"
curl -s http://${METRICS[master-target]}/metrics | python3 -c '
import re, sys
m = sys.stdin.read()
def val(name):
    x = re.search(r"^" + re.escape(name) + r"(?:\{[^}]*\})? ([0-9.e+]+)$", m, re.M)
    return float(x.group(1)) if x else 0.0
n, s = val("lifeboat_mt_view_open_seconds_count"), val("lifeboat_mt_view_open_seconds_sum")
print(f"  of which the master target opening views: {1000*s/max(n,1):.0f} ms per view (mean of {n:.0f}, section a included)")'
$BIN/lifeboat job show $(grep -o 'job-[0-9a-f-]*' $WORK/last.txt | head -1) | sed 's/^/  /' 
FAILED_OVER=$(uri)
kill -INT $FIO 2>/dev/null || true; wait $FIO 2>/dev/null || true
echo "fio: $(grep -o 'WRITE: bw=[^,]*, [^,]*, io=[^ ]*' $WORK/fio-c.txt 2>/dev/null || echo 'no summary')"
t0=$(now); $BIN/lifeboat failover commit bench-c >/dev/null; t1=$(now)
echo "commit (point folded into the replica): $(python3 -c "print(f'{$t1-$t0:.1f}')") s"
fi
