#!/usr/bin/env bash
# The benchmark suite: freshd side by side with Redis and etcd, in the same
# run, on loopback.
#
#   scripts/bench.sh [quick|full]
#
# Installs what is missing (Debian: redis-server, etcd-server, etcd-client),
# builds freshd and freshd-load in release, starts each server fresh for each
# workload (freshd memory-only, redis-server without persistence, etcd with
# its data in a tmpfs directory), pins the servers to one core and the load
# generator to another with taskset, runs every workload against freshd and
# its peer (the notice cases also against the loopback floor, `freshd-load
# floor-server`: a server that only writes each subscriber's socket), and
# writes:
#
#   $BENCH_RESULTS (default bench-results/<time>-<mode>/): results.jsonl
#     (one JSON report per measurement, CDF series included), machine.txt
#     (machine, versions, load averages), the load tool's output, summary.md
#   docs/bench/*.png: latency CDFs and throughput bars (BENCH_PLOTS=0: none)
#
# quick finishes in under 3 minutes once built; full runs longer windows,
# more rates and 1M keys for memory.
#
# Environment: BENCH_ROUNDS (turns freshd and Redis take at the checks, the
# notice latencies and the fan-out: 1 in quick mode, 3 in full), BENCH_SERVER_CPU (0),
# BENCH_LOAD_CPU (1), BENCH_RESULTS,
# BENCH_PLOTS (1), BENCH_VENV (a Python venv for matplotlib, created when
# missing; default $CARGO_TARGET_DIR/bench-venv), CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

MODE=${1:-quick}
case "$MODE" in
  quick)
    CHECK_KEYS=50000; CHECK_RUNS="1@0,1@4000,64@0,1000@0"; CHECK_SECS=2; CHECK_WARMUP=1
    NOTICE_CASES="1@200 100@100 1000@20"; NOTICE_SECS=3; NOTICE_WARMUP=1
    FANOUT_SECS=3; DEPS_ROUNDS=5; MEMORY_KEYS=200000; ROUNDS=${BENCH_ROUNDS:-1}
    ;;
  full)
    CHECK_KEYS=100000; CHECK_RUNS="1@0,1@2000,1@4000,1@8000,64@0,64@200,1000@0,1000@20"; CHECK_SECS=10; CHECK_WARMUP=2
    NOTICE_CASES="1@200 100@100 1000@20 1000@100"; NOTICE_SECS=10; NOTICE_WARMUP=2
    FANOUT_SECS=10; DEPS_ROUNDS=20; MEMORY_KEYS=1000000; ROUNDS=${BENCH_ROUNDS:-3}
    ;;
  *)
    echo "usage: $0 [quick|full]" >&2
    exit 64
    ;;
esac

SERVER_CPU=${BENCH_SERVER_CPU:-0}
LOAD_CPU=${BENCH_LOAD_CPU:-1}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
RESULTS=${BENCH_RESULTS:-$ROOT/bench-results/$(date -u +%Y%m%dT%H%M%SZ)-$MODE}
VENV=${BENCH_VENV:-$TARGET_DIR/bench-venv}
mkdir -p "$RESULTS"
JSON=$RESULTS/results.jsonl
: > "$JSON"

say() { printf '[bench %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

# --- peers ---------------------------------------------------------------
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || missing+=(etcd-client)
if ((${#missing[@]})); then
  say "installing ${missing[*]}"
  SUDO=; [[ $(id -u) -eq 0 ]] || SUDO=sudo
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v taskset >/dev/null 2>&1 || { echo "taskset (util-linux) is required" >&2; exit 1; }

# --- build ---------------------------------------------------------------
say "building freshd and freshd-load (release)"
cargo build --release --locked -p freshd -p freshd-load --bin freshd --bin freshd-load >&2
FRESHD=$TARGET_DIR/release/freshd
LOAD=$TARGET_DIR/release/freshd-load

# --- processes -----------------------------------------------------------
PIDS=()
# Scratch space for the servers (etcd's data directory), on tmpfs when there is one.
SCRATCH=$(mktemp -d /dev/shm/freshd-bench.XXXXXX 2>/dev/null || mktemp -d)
cleanup() {
  for pid in "${PIDS[@]:-}"; do
    [[ -n "$pid" ]] && kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]:-}"; do
    [[ -n "$pid" ]] && wait "$pid" 2>/dev/null || true
  done
  rm -rf "$SCRATCH"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_port() { # port [seconds]
  local deadline=$((SECONDS + ${2:-20}))
  until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do
    ((SECONDS < deadline)) || { echo "nothing listens on 127.0.0.1:$1" >&2; return 1; }
    sleep 0.05
  done
}

stop_servers() {
  for pid in "${PIDS[@]:-}"; do
    [[ -n "$pid" ]] && kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]:-}"; do
    [[ -n "$pid" ]] && wait "$pid" 2>/dev/null || true
  done
  PIDS=()
  rm -rf "${SCRATCH:?}"/etcd
}

start_freshd() {
  FRESHD_PORT=$(free_port)
  taskset -c "$SERVER_CPU" "$FRESHD" --listen "127.0.0.1:$FRESHD_PORT" --admin-listen off \
    >>"$RESULTS/freshd.log" 2>&1 &
  FRESHD_PID=$!
  PIDS+=("$FRESHD_PID")
  wait_port "$FRESHD_PORT"
}

start_redis() {
  REDIS_PORT=$(free_port)
  taskset -c "$SERVER_CPU" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 \
    --save '' --appendonly no --daemonize no --loglevel warning \
    >>"$RESULTS/redis.log" 2>&1 &
  REDIS_PID=$!
  PIDS+=("$REDIS_PID")
  wait_port "$REDIS_PORT"
}

# The loopback floor for the notice workload: freshd-load's own server that
# only copies each change to every subscriber's socket (tools/load/src/floor.rs).
start_floor() {
  FLOOR_PORT=$(free_port)
  taskset -c "$SERVER_CPU" "$LOAD" floor-server --listen "127.0.0.1:$FLOOR_PORT" \
    >>"$RESULTS/floor.log" 2>&1 &
  FLOOR_PID=$!
  PIDS+=("$FLOOR_PID")
  wait_port "$FLOOR_PORT"
}

start_etcd() {
  ETCD_PORT=$(free_port)
  local peer
  peer=$(free_port)
  mkdir -p "$SCRATCH/etcd"
  taskset -c "$SERVER_CPU" etcd --name bench --data-dir "$SCRATCH/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$peer" \
    --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
    --initial-cluster "bench=http://127.0.0.1:$peer" \
    --log-level error >>"$RESULTS/etcd.log" 2>&1 &
  ETCD_PID=$!
  PIDS+=("$ETCD_PID")
  wait_port "$ETCD_PORT"
  local deadline=$((SECONDS + 20))
  until ETCDCTL_API=3 etcdctl --endpoints "127.0.0.1:$ETCD_PORT" endpoint health >/dev/null 2>&1; do
    ((SECONDS < deadline)) || { echo "etcd is not healthy" >&2; return 1; }
    sleep 0.1
  done
}

FAILED=()
load() { # label target addr workload args...
  local label=$1 target=$2 addr=$3
  shift 3
  say "$label: $target (load average $(cut -d' ' -f1 /proc/loadavg))"
  local pid
  case $target in
    freshd) pid=$FRESHD_PID ;;
    redis) pid=$REDIS_PID ;;
    etcd) pid=$ETCD_PID ;;
    floor) pid=$FLOOR_PID ;;
  esac
  # A failed run is reported at the end; the others still run.
  if ! taskset -c "$LOAD_CPU" "$LOAD" --target "$target" --addr "$addr" --json "$JSON" \
    --server-pid "$pid" \
    --label "$label" "$@" 2>&1 | tee -a "$RESULTS/load.txt"; then
    FAILED+=("$label/$target")
  fi
}

# --- machine -------------------------------------------------------------
{
  echo "mode: $MODE"
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
  echo "cpu: $(nproc) x $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
  echo "memory: $(free -h | awk '/^Mem:/ {print $2}')"
  echo "os: $(. /etc/os-release && echo "$PRETTY_NAME"), kernel $(uname -r)"
  echo "rustc: $(rustc --version)"
  echo "redis: $(redis-server --version)"
  echo "etcd: $(etcd --version | head -1)"
  echo "pinning: servers on CPU $SERVER_CPU, freshd-load on CPU $LOAD_CPU"
  echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} >"$RESULTS/machine.txt"
cat "$RESULTS/machine.txt" >&2

# --- workloads -----------------------------------------------------------
# Single-key and batched checks: the same keys, connections and runs.
# Throughputs swing run to run on a shared machine, peers' as much as
# freshd's: with ROUNDS > 1, freshd and Redis take turns ROUNDS times and the
# report gives the median round's ratio and the range (labels check, check@2..).
start_freshd; start_redis
for round in $(seq 1 "$ROUNDS"); do
  label=check; ((round == 1)) || label=check@$round
  load "$label" freshd "127.0.0.1:$FRESHD_PORT" check --conns 16 --keys "$CHECK_KEYS" \
    --runs "$CHECK_RUNS" --warmup "$CHECK_WARMUP" --secs "$CHECK_SECS"
  # The same 16 requests in flight, as HTTP/2 streams on 2 connections.
  load "$label" freshd "127.0.0.1:$FRESHD_PORT" check --conns 2 --streams 8 --keys "$CHECK_KEYS" \
    --runs 1@0 --warmup "$CHECK_WARMUP" --secs "$CHECK_SECS"
  load "$label" redis "127.0.0.1:$REDIS_PORT" check --conns 16 --keys "$CHECK_KEYS" \
    --runs "$CHECK_RUNS" --warmup "$CHECK_WARMUP" --secs "$CHECK_SECS" --redis-batch mget,pipeline
done
stop_servers

# Write-to-notice latency, fresh servers for every case. The p99 swings run
# to run as much as the throughputs do: freshd and Redis take ROUNDS turns at
# every case (labels notice-<subs>, notice-<subs>@2..), and the report gives
# the median round's ratio and the range. The loopback floor takes its turn
# in every round too; etcd, a reference without a goal, runs in the first
# round only.
for round in $(seq 1 "$ROUNDS"); do
  for case in $NOTICE_CASES; do
    subs=${case%@*} rate=${case#*@}
    label=notice-$subs; ((round == 1)) || label=notice-$subs@$round
    targets="freshd redis floor"; ((round == 1)) && targets="freshd redis floor etcd"
    start_freshd; start_redis; start_floor
    ((round == 1)) && start_etcd
    for t in $targets; do
      case $t in
        freshd) addr=127.0.0.1:$FRESHD_PORT ;;
        redis) addr=127.0.0.1:$REDIS_PORT ;;
        etcd) addr=127.0.0.1:$ETCD_PORT ;;
        floor) addr=127.0.0.1:$FLOOR_PORT ;;
      esac
      load "$label" "$t" "$addr" notice --subscribers "$subs" --rate "$rate" \
        --warmup "$NOTICE_WARMUP" --secs "$NOTICE_SECS"
    done
    # freshd's 1,000 subscribers again, on a fresh server, 100 Watch streams
    # to a connection (as subscribers in one process share a gRPC channel),
    # and the floor's on as many connections (each change written to a
    # connection once per subscriber there, in one write).
    if ((subs >= 1000)); then
      stop_servers
      start_freshd; start_floor
      load "$label" freshd "127.0.0.1:$FRESHD_PORT" notice --subscribers "$subs" \
        --per-conn 100 --rate "$rate" --warmup "$NOTICE_WARMUP" --secs "$NOTICE_SECS"
      load "$label" floor "127.0.0.1:$FLOOR_PORT" notice --subscribers "$subs" \
        --per-conn 100 --rate "$rate" --warmup "$NOTICE_WARMUP" --secs "$NOTICE_SECS"
    fi
    stop_servers
  done
done

# Notices per second to 1,000 subscribers.
for round in $(seq 1 "$ROUNDS"); do
  label=fanout; ((round == 1)) || label=fanout@$round
  start_freshd; start_redis
  load "$label" freshd "127.0.0.1:$FRESHD_PORT" fanout --subscribers 1000 --secs "$FANOUT_SECS"
  load "$label" redis "127.0.0.1:$REDIS_PORT" fanout --subscribers 1000 --secs "$FANOUT_SECS"
  stop_servers
done

# One write invalidating 10,000 dependents.
start_freshd; start_redis
load deps freshd "127.0.0.1:$FRESHD_PORT" deps --dependents 10000 --subscribers 10 --rounds "$DEPS_ROUNDS"
load deps redis "127.0.0.1:$REDIS_PORT" deps --dependents 10000 --subscribers 10 --rounds "$DEPS_ROUNDS"
stop_servers

# Memory per key, fresh servers.
start_freshd; start_redis
load memory freshd "127.0.0.1:$FRESHD_PORT" memory --keys "$MEMORY_KEYS" --pid "$FRESHD_PID"
load memory redis "127.0.0.1:$REDIS_PORT" memory --keys "$MEMORY_KEYS"
stop_servers

echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$RESULTS/machine.txt"

# --- report --------------------------------------------------------------
PLOT_ARGS=()
if [[ ${BENCH_PLOTS:-1} != 0 ]]; then
  if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c 'import matplotlib' 2>/dev/null; then
    say "creating $VENV with matplotlib"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q matplotlib
  fi
  PLOT_ARGS=(--plots "$ROOT/docs/bench")
  PY=$VENV/bin/python
else
  PY=python3
fi
"$PY" scripts/bench_report.py "$JSON" --machine "$RESULTS/machine.txt" "${PLOT_ARGS[@]}" \
  | tee "$RESULTS/summary.md"
say "results in $RESULTS"
if ((${#FAILED[@]})); then
  echo "failed runs: ${FAILED[*]}" >&2
  exit 1
fi
