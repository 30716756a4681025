#!/usr/bin/env bash
# A wsrelay fleet on one Linux machine (README, "A fleet › Try it: a fleet on
# one machine"): three hosts, each a network namespace with its own address,
# its own echo origin on its loopback and its own `wsrelay run` (2 workers),
# leasing one fleet limit from a Redis in a fourth namespace, behind HAProxy
# (mode tcp, balance leastconn, health check on each host's /readyz) in a
# fifth. Two bridges join them, and nothing else: the front network (HAProxy
# and the hosts' listeners) lives in the balancer's namespace, the back
# network (the hosts and Redis) in Redis's, so a host can be cut off from
# Redis alone ("cut") while it keeps serving. The machine's own namespace
# gets no address, no route and no interface of the fleet: traffic stays
# between the namespaces this script created.
#
#   deploy/fleet/fleet.sh up                 build it, start everything, wait until HAProxy sees 3 hosts up
#   deploy/fleet/fleet.sh status             leases in Redis, clients and limits per host
#   deploy/fleet/fleet.sh burst N [SECONDS]  N concurrent upgrades through HAProxy, held SECONDS (default 1)
#   deploy/fleet/fleet.sh kill I             SIGKILL host I's supervisor and workers
#   deploy/fleet/fleet.sh start I            start host I's wsrelay again
#   deploy/fleet/fleet.sh reload I           SIGHUP to host I (its env file: $FLEET_DIR/hI.env)
#   deploy/fleet/fleet.sh cut I | restore I  host I's link to Redis down / up
#   deploy/fleet/fleet.sh redis-kill | redis-start   Redis SIGKILLed / started again, empty
#   deploy/fleet/fleet.sh exec NS CMD...     run CMD in namespace NS (lb, redis, h1, h2, h3)
#   deploy/fleet/fleet.sh down               stop everything, delete the namespaces
#
# Root only (ip netns). Needs iproute2, redis-server, haproxy, and a Python
# with wsrelay's dependencies and the redis client (pip install -e '.[cluster]').
# Settings (environment): FLEET_NAME (wsfleet: namespace prefix), FLEET_DIR
# (/run/$FLEET_NAME: env files, logs, pids, redis.sock), FLEET_PYTHON
# (python3), FLEET_LIMIT (100), FLEET_TTL (10), FLEET_FALLBACK (hold),
# FLEET_LOCAL_LIMIT (0), FLEET_BLOCK (64), FLEET_WORKERS (2), FLEET_HOSTS (3).
set -euo pipefail

NAME=${FLEET_NAME:-wsfleet}
DIR=${FLEET_DIR:-/run/$NAME}
PY=${FLEET_PYTHON:-python3}
HOSTS=${FLEET_HOSTS:-3}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
# RFC 2544's benchmarking range: never routed, and here never on the machine's own interfaces.
FRONT=198.18.0   # .1 HAProxy, .1I host I
BACK=198.18.1    # .1 Redis, .1I host I
LB=$NAME-lb
REDIS=$NAME-redis

host_ns() { echo "$NAME-h$1"; }
say() { echo "fleet: $*"; }
die() { echo "fleet: $*" >&2; exit 1; }

# Start a command in namespace $1, detached in its own session (so its process
# group is its pid), output to log $2, pid to file $3.
spawn() {
    local ns=$1 log=$2 pidfile=$3
    shift 3
    setsid ip netns exec "$ns" "$@" >>"$log" 2>&1 </dev/null &
    echo $! >"$pidfile"
}

# Signal the process group recorded in pid file $2 (the session spawn made).
signal_group() {
    local sig=$1 pidfile=$2 pid
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    kill "-$sig" -- "-$pid" 2>/dev/null || true
}

wait_gone() {
    local pidfile=$1 pid i
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    for i in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; return 0; }
        sleep 0.1
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$pidfile"
}

probe() { ip netns exec "$LB" env PYTHONPATH="$ROOT" "$PY" "$ROOT/deploy/fleet/probe.py" "$@"; }

write_env() {
    local i=$1
    cat >"$DIR/h$i.env" <<EOF
# host $i of fleet $NAME (deploy/fleet/fleet.sh); edit, then: fleet.sh reload $i
RELAY_LISTEN=$FRONT.1$i:8080
RELAY_ORIGIN=127.0.0.1:9000
RELAY_WORKERS=${FLEET_WORKERS:-2}
RELAY_METRICS_LISTEN=$FRONT.1$i:9108
RELAY_ACCESS_LOG=0
RELAY_DRAIN_TIMEOUT=5
RELAY_PID_FILE=$DIR/h$i.pid
RELAY_CLUSTER_REDIS=redis://$BACK.1:6379
RELAY_CLUSTER_NAME=$NAME
RELAY_CLUSTER_LIMIT=${FLEET_LIMIT:-100}
RELAY_CLUSTER_LEASE_TTL=${FLEET_TTL:-10}
RELAY_CLUSTER_FALLBACK=${FLEET_FALLBACK:-hold}
RELAY_CLUSTER_LOCAL_LIMIT=${FLEET_LOCAL_LIMIT:-0}
RELAY_CLUSTER_BLOCK=${FLEET_BLOCK:-64}
EOF
}

start_host() {
    local i=$1
    spawn "$(host_ns "$i")" "$DIR/h$i.log" "$DIR/h$i.group" \
        env -i PATH="$PATH" PYTHONPATH="$ROOT" PYTHONUNBUFFERED=1 "$PY" -m relay run --env-file "$DIR/h$i.env"
}

start_redis() {
    spawn "$REDIS" "$DIR/redis.log" "$DIR/redis.group" \
        redis-server --bind "$BACK.1" --port 6379 --unixsocket "$DIR/redis.sock" --unixsocketperm 700 \
        --save "" --appendonly no --protected-mode no --dir "$DIR"
    for _ in $(seq 1 100); do
        redis-cli -s "$DIR/redis.sock" ping >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    die "redis-server did not answer (log: $DIR/redis.log)"
}

link() {   # link BRIDGE_NS BRIDGE PORT_NAME HOST_NS HOST_IF ADDRESS
    ip -n "$1" link add "$3" type veth peer name "$5" netns "$4"
    ip -n "$1" link set "$3" master "$2" up
    ip -n "$4" addr add "$6/24" dev "$5"
    ip -n "$4" link set "$5" up
}

up() {
    [ "$(id -u)" = 0 ] || die "needs root (ip netns)"
    for cmd in ip redis-server redis-cli haproxy "$PY"; do
        command -v "$cmd" >/dev/null || die "$cmd not found"
    done
    ip netns list | grep -q "^$LB\b" && die "fleet $NAME exists: fleet.sh down first"
    mkdir -p "$DIR"
    rm -f "$DIR"/*.log
    local i ns
    for ns in "$LB" "$REDIS"; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
    ip -n "$LB" link add br-front type bridge && ip -n "$LB" addr add "$FRONT.1/24" dev br-front
    ip -n "$LB" link set br-front up
    ip -n "$REDIS" link add br-back type bridge && ip -n "$REDIS" addr add "$BACK.1/24" dev br-back
    ip -n "$REDIS" link set br-back up
    for i in $(seq 1 "$HOSTS"); do
        ns=$(host_ns "$i")
        ip netns add "$ns"
        ip -n "$ns" link set lo up
        link "$LB" br-front "f$i" "$ns" front0 "$FRONT.1$i"
        link "$REDIS" br-back "b$i" "$ns" back0 "$BACK.1$i"
    done
    start_redis
    for i in $(seq 1 "$HOSTS"); do
        spawn "$(host_ns "$i")" "$DIR/origin$i.log" "$DIR/origin$i.group" \
            env PYTHONPATH="$ROOT" "$PY" -m bench.origin --listen 127.0.0.1:9000
        write_env "$i"
        start_host "$i"
    done
    # HAProxy needs two descriptors per connection and refuses to start past its limit.
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    local fds maxconn
    fds=$(ulimit -n)
    [ "$fds" != unlimited ] || fds=1000000
    maxconn=$(( (fds - 100) / 2 ))
    [ "$maxconn" -le 4000 ] || maxconn=4000
    {
        echo "global"
        echo "    maxconn $maxconn"
        echo "    stats socket $DIR/haproxy.sock mode 600 level admin"
        echo "defaults"
        echo "    mode tcp"
        echo "    timeout connect 2s"
        echo "    timeout client 1h"
        echo "    timeout server 1h"
        echo "    retries 2"
        echo "    option redispatch"
        echo "frontend fleet"
        echo "    bind $FRONT.1:8080"
        echo "    default_backend hosts"
        echo "backend hosts"
        echo "    balance leastconn"
        echo "    option httpchk"
        echo "    http-check send meth GET uri /readyz"
        echo "    default-server check port 9108 inter 500ms fall 2 rise 1"
        for i in $(seq 1 "$HOSTS"); do echo "    server h$i $FRONT.1$i:8080"; done
    } >"$DIR/haproxy.cfg"
    spawn "$LB" "$DIR/haproxy.log" "$DIR/haproxy.group" haproxy -db -f "$DIR/haproxy.cfg"
    probe wait-up "$DIR" "$HOSTS" 60 || die "the fleet did not come up; logs in $DIR"
    say "$HOSTS hosts up: HAProxy on $FRONT.1:8080 (namespace $LB), Redis on $BACK.1:6379 (namespace $REDIS, socket $DIR/redis.sock)"
    for i in $(seq 1 "$HOSTS"); do
        say "host $i: namespace $(host_ns "$i"), wsrelay on $FRONT.1$i:8080, metrics on $FRONT.1$i:9108, env file $DIR/h$i.env, log $DIR/h$i.log"
    done
    say "fleet limit ${FLEET_LIMIT:-100}, lease TTL ${FLEET_TTL:-10}s, fallback ${FLEET_FALLBACK:-hold}"
}

down() {
    local i pf
    for pf in "$DIR"/*.group; do
        [ -e "$pf" ] && signal_group TERM "$pf"
    done
    for pf in "$DIR"/*.group; do
        [ -e "$pf" ] && wait_gone "$pf"
    done
    # Anything still inside the fleet's namespaces is the fleet's.
    for ns in "$LB" "$REDIS" $(for i in $(seq 1 "$HOSTS"); do host_ns "$i"; done); do
        if ip netns list | grep -q "^$ns\b"; then
            for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
            ip netns del "$ns"
        fi
    done
    rm -f "$DIR"/*.group "$DIR"/*.pid "$DIR"/redis.sock "$DIR"/haproxy.sock
    say "fleet $NAME is down"
}

host_arg() {
    [[ "${1:-}" =~ ^[0-9]+$ ]] && [ "$1" -ge 1 ] && [ "$1" -le "$HOSTS" ] || die "expected a host number 1-$HOSTS"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) probe status "$DIR" "$HOSTS" "$NAME" ;;
    burst) probe burst "$FRONT.1:8080" "${2:?burst N}" "${3:-1}" ;;
    kill) host_arg "${2:-}"; signal_group KILL "$DIR/h$2.group"; wait_gone "$DIR/h$2.group"; rm -f "$DIR/h$2.pid"
          say "host $2: supervisor and workers SIGKILLed" ;;
    start) host_arg "${2:-}"; start_host "$2"; probe wait-host "$FRONT.1$2:9108" 30 && say "host $2: started" ;;
    reload) host_arg "${2:-}"; kill -HUP "$(cat "$DIR/h$2.pid")"; say "host $2: SIGHUP" ;;
    cut) host_arg "${2:-}"; ip -n "$(host_ns "$2")" link set back0 down; say "host $2: link to Redis down" ;;
    restore) host_arg "${2:-}"; ip -n "$(host_ns "$2")" link set back0 up; say "host $2: link to Redis up" ;;
    redis-kill) signal_group KILL "$DIR/redis.group"; wait_gone "$DIR/redis.group"; say "Redis SIGKILLed" ;;
    redis-start) start_redis; say "Redis started, empty" ;;
    exec) ns=${2:?exec NS CMD}; shift 2
          case "$ns" in lb|redis) ns=$NAME-$ns ;; h*) ns=$NAME-$ns ;; esac
          exec ip netns exec "$ns" "$@" ;;
    *) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
