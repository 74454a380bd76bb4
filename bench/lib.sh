# Shared by the benchmarks: builds the release binaries, starts a configuration server, a
# process server and a master target in a temporary directory, and defines helpers to start
# agents and wait for replication. Source it after checking the tools a benchmark needs.
cargo build --release --quiet --workspace --bins
# The interpreter itself: a version manager's shim costs ~0.1 s of CPU per call, which would
# compete with the pipeline being measured.
PYTHON=$(python3 -c 'import sys; print(sys.executable)')
python3() { "$PYTHON" "$@"; }
# PS_CONFIG and MT_CONFIG may name a process-server / master-target config file (e.g. with
# `cache_direct_io = false`, `replica_direct_io = true`).
# BIN may name another build of the binaries (for example one with frame pointers, to profile).
BIN=${BIN:-$PWD/target/release}
WORK=$(mktemp -d /tmp/lifeboat-bench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; if [ -n "${KEEP:-}" ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
rate() { python3 -c "print(f'{$1/1048576/($3-$2):.0f}')"; }

CS=127.0.0.1:$(port); export LIFEBOAT_CONTEXT=$WORK/cs/admin/context.toml
$BIN/config-server init --data-dir $WORK/cs --listen $CS --metrics-listen 127.0.0.1:$(port) --heartbeat-interval-secs 1 >/dev/null
$BIN/config-server run --data-dir $WORK/cs --listen $CS --metrics-listen 127.0.0.1:$(port) --heartbeat-interval-secs 1 2>$WORK/cs.log & PIDS+=($!)
for i in $(seq 50); do $BIN/lifeboat cluster status >/dev/null 2>&1 && break; sleep 0.2; done
PASS=$WORK/cs/private/connection.passphrase
declare -A METRICS COMPONENT_PID
MT_NBD=127.0.0.1:$(port)
for c in process-server master-target; do
  $BIN/$c register --data-dir $WORK/$c --cs $CS --passphrase-file $PASS --name $c >/dev/null
  METRICS[$c]=127.0.0.1:$(port)
  $BIN/$c run --data-dir $WORK/$c --listen 127.0.0.1:$(port) --metrics-listen ${METRICS[$c]} \
    $([ $c = master-target ] && echo --nbd-listen $MT_NBD) \
    $([ $c = process-server ] && [ -n "${PS_CONFIG:-}" ] && echo --config $PS_CONFIG) \
    $([ $c = master-target ] && [ -n "${MT_CONFIG:-}" ] && echo --config $MT_CONFIG) 2>$WORK/$c.log & PIDS+=($!)
  COMPONENT_PID[$c]=$!
done
# Before each timed step: write back what earlier steps left dirty, so no step pays for
# another's writeback. (Page caches are not dropped: on a VM whose memory the host backs
# lazily, memory the guest freed can be as slow to touch again as memory it never touched,
# so dropping caches makes figures vary more, not less.)
settle() { sync; }
# Sets the nice value of every thread of process $1 (threads started later inherit it).
renice_all() { for t in /proc/$1/task/*; do renice -n $2 -p ${t##*/} >/dev/null; done; }
# Prints the mean of a histogram/summary and a counter from a component's metrics.
pipeline_stats() {
  # KEEP=1 also keeps every component's metrics as they stood, to look into afterwards.
  if [ -n "${KEEP:-}" ]; then
    for c in process-server master-target; do curl -s http://${METRICS[$c]}/metrics > $WORK/$c.metrics; done
  fi
  python3 - "$(curl -s http://${METRICS[master-target]}/metrics)" "$(curl -s http://${METRICS[process-server]}/metrics)" <<'PY'
import sys, re
m, ps = sys.argv[1], sys.argv[2]
def val(name):
    x = re.search(r'^' + re.escape(name) + r'(?:\{[^}]*\})? ([0-9.e+]+)$', m, re.M)
    return float(x.group(1)) if x else 0.0
n, s = val("lifeboat_mt_apply_seconds_count"), val("lifeboat_mt_apply_seconds_sum")
print(f"  master target: {n:.0f} apply groups, mean {1000*s/max(n,1):.1f} ms per group (write + VHD flush + marker)")
m = ps
print(f"  process server: forwarded {val('lifeboat_ps_forwarded_bytes_total')/2**20:.0f} MiB, of which read back from its cache file {val('lifeboat_ps_cache_read_back_bytes_total')/2**20:.0f} MiB")
PY
  # User + system CPU seconds of each process still running, from /proc (to 1/100 s), and
  # its minor page faults in thousands (on a VM whose host backs memory lazily, touching
  # memory the process has not touched before is a large part of the cost).
  local tck; tck=$(getconf CLK_TCK)
  echo "  CPU seconds (minor faults, thousands; resident MiB) so far: $(for p in "${PIDS[@]}"; do
    [ -r /proc/$p/stat ] && awk -v t="$tck" -v n="$(cat /proc/$p/comm)" -v pg=$(getconf PAGESIZE) \
      '{printf "%s %.2f (%.0fk; %.0f MiB); ", n, ($14+$15)/t, $10/1000, $24*pg/1048576}' /proc/$p/stat
  done)"
}
$BIN/lifeboat policy create bench ${BENCH_POLICY_FLAGS:-} >/dev/null

declare -A AGENT_PID AGENT_METRICS
# Starts an agent for machine $1 with disk file $2 on NBD address $3 (registers it first).
start_agent() {
  $BIN/mobility-agent register --data-dir $WORK/$1 --cs $CS --passphrase-file $PASS --name $1 --disk disk0=$2 >/dev/null
  AGENT_METRICS[$1]=127.0.0.1:$(port)
  run_agent "$@"
  for i in $(seq 100); do $BIN/lifeboat servers list --json | grep "\"name\": \"$1\"" >/dev/null && break; sleep 0.1; done
  sleep 1.5
}
run_agent() {
  $BIN/mobility-agent run --data-dir $WORK/$1 --disk disk0=$2 --nbd-listen $3 --metrics-listen ${AGENT_METRICS[$1]} ${AGENT_FLAGS:-} 2>>$WORK/$1.log & PIDS+=($!)
  AGENT_PID[$1]=$!
}
# A metric's value on an agent (0 if absent).
agent_metric() { metric ${AGENT_METRICS[$1]} $2; }
# A metric's value (summed over its labels; 0 if absent) at the metrics address $1.
metric() {
  curl -s http://$1/metrics | awk -v m="$2" '$1 ~ "^"m"({|$)" {s+=$2} END {print s+0}'
}
protect() { start_agent "$@"; $BIN/lifeboat protect $1 --policy bench >/dev/null; }
# Waits until machine $1's disk is Protected with nothing pending (one process polling the
# configuration server, not a shell loop that would steal CPU from the pipeline).
caught_up() {
  $BIN/lifeboat wait $1 --caught-up --timeout-secs 300 >/dev/null || { echo "timed out waiting for $1"; exit 1; }
}

# TIMELINE=1: where the bytes of a sync are, every 100 ms — shipped by the agent of machine
# $1, stored by the process server, forwarded and read back from its cache file, applied on
# the master target — to see which stage sets the pace (the one the others wait behind).
# Sampling costs a little CPU (three metric scrapes per sample), so it is off by default.
timeline_start() {
  local agent=${AGENT_METRICS[$1]} ps=${METRICS[process-server]} mt=${METRICS[master-target]}
  ( while :; do
      echo "$(now) $(metric $agent lifeboat_agent_shipped_bytes_total) \
$(metric $ps lifeboat_ps_ingest_bytes_total) $(metric $ps lifeboat_ps_forwarded_bytes_total) \
$(metric $ps lifeboat_ps_cache_read_back_bytes_total) $(metric $mt lifeboat_mt_apply_bytes_total)"
      sleep 0.1
    done ) > $WORK/timeline.txt 2>/dev/null &
  TIMELINE_PID=$!
}
# Stops the sampler and prints MiB moved since the first sample, from $1 (the start time).
timeline_print() {
  kill $TIMELINE_PID 2>/dev/null; wait $TIMELINE_PID 2>/dev/null || true
  python3 - "$1" $WORK/timeline.txt <<'PY'
import sys
t0, rows = float(sys.argv[1]), []
for line in open(sys.argv[2]):
    f = line.split()
    if len(f) == 6:
        rows.append([float(x) for x in f])
if rows:
    base = rows[0]
    print("  timeline (MiB):   s  shipped  stored  forwarded  read-back  applied")
    for r in rows:
        d = [(r[i] - base[i]) / 2**20 for i in range(1, 6)]
        print(f"               {r[0] - t0:5.2f} {d[0]:8.0f} {d[1]:7.0f} {d[2]:10.0f} {d[3]:10.0f} {d[4]:8.0f}")
PY
}
