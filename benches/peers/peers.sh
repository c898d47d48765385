#!/usr/bin/env bash
# Installs, starts and stops the brokers tidings-bench compares with, on loopback only,
# each with a temporary data dir under $TIDINGS_PEERS_DIR (default /tmp/tidings-peers).
#
#   benches/peers/peers.sh install            # apt-get install the four Debian packages
#   benches/peers/peers.sh start [PEER...]    # default: all of nats redis rabbitmq mosquitto
#   benches/peers/peers.sh status [PEER...]
#   benches/peers/peers.sh stop [PEER...]     # stops only what start started (pid files)
#
# Ports are the packages' defaults: nats 4222 (JetStream on), redis 6379 (no persistence),
# rabbitmq 5672, mosquitto 1883. Starting a peer whose port is taken fails instead of
# reusing whatever listens there.
set -euo pipefail

DIR="${TIDINGS_PEERS_DIR:-/tmp/tidings-peers}"
ALL=(nats redis rabbitmq mosquitto)

say() { printf '%s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

port_of() {
    case "$1" in
        nats) echo 4222 ;; redis) echo 6379 ;; rabbitmq) echo 5672 ;; mosquitto) echo 1883 ;;
        *) die "unknown peer '$1' (known: ${ALL[*]})" ;;
    esac
}

# True when something accepts TCP connections on 127.0.0.1:$1.
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Waits up to $2 seconds for port $1 to accept connections.
wait_port() {
    local port=$1 limit=$2 i
    for ((i = 0; i < limit * 10; i++)); do
        listening "$port" && return 0
        sleep 0.1
    done
    return 1
}

# The pid recorded for $1 if that process is still alive, else nothing.
live_pid() {
    local file="$DIR/$1.pid" pid
    [[ -s $file ]] || return 0
    pid=$(tr -dc '0-9' <"$file")
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then echo "$pid"; fi
}

install_peers() {
    command -v apt-get >/dev/null || die "apt-get not found: install nats-server, rabbitmq-server, redis-server and mosquitto by hand"
    # Package scripts must not start system-wide services: we start our own copies.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server rabbitmq-server redis-server mosquitto
}

start_nats() {
    mkdir -p "$DIR/nats"
    setsid nats-server -a 127.0.0.1 -p 4222 -js -sd "$DIR/nats" -l "$DIR/nats.log" \
        </dev/null >>"$DIR/nats.log" 2>&1 &
    echo $! >"$DIR/nats.pid"
    wait_port 4222 20
}

start_redis() {
    mkdir -p "$DIR/redis"
    setsid redis-server --bind 127.0.0.1 --port 6379 --save '' --appendonly no \
        --dir "$DIR/redis" --pidfile "$DIR/redis.pid" --logfile "$DIR/redis.log" \
        --daemonize no </dev/null >>"$DIR/redis.log" 2>&1 &
    echo $! >"$DIR/redis.pid"
    wait_port 6379 20
}

start_mosquitto() {
    mkdir -p "$DIR/mosquitto"
    cat >"$DIR/mosquitto/mosquitto.conf" <<CONF
listener 1883 127.0.0.1
allow_anonymous true
persistence true
persistence_location $DIR/mosquitto/
log_dest file $DIR/mosquitto.log
CONF
    setsid mosquitto -c "$DIR/mosquitto/mosquitto.conf" </dev/null >>"$DIR/mosquitto.log" 2>&1 &
    echo $! >"$DIR/mosquitto.pid"
    wait_port 1883 20
}

rabbit_env() {
    local base="$DIR/rabbitmq"
    export HOME="$base/home"  # the Erlang cookie lives here, not in root's home
    export RABBITMQ_NODENAME=tidings-bench@localhost
    export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT=5672
    export RABBITMQ_DIST_PORT=25672 ERL_EPMD_ADDRESS=127.0.0.1
    export RABBITMQ_MNESIA_BASE="$base/mnesia" RABBITMQ_LOG_BASE="$base/log"
    export RABBITMQ_PID_FILE="$DIR/rabbitmq.pid"
    export RABBITMQ_CONFIG_FILE="$base/rabbitmq"   # .conf is appended
    export RABBITMQ_ENABLED_PLUGINS_FILE="$base/enabled_plugins"
    export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
    export RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
}

start_rabbitmq() {
    rabbit_env
    mkdir -p "$HOME" "$RABBITMQ_MNESIA_BASE" "$RABBITMQ_LOG_BASE"
    printf 'listeners.tcp.1 = 127.0.0.1:5672\nloopback_users.guest = true\n' >"$DIR/rabbitmq/rabbitmq.conf"
    printf '[].\n' >"$RABBITMQ_ENABLED_PLUGINS_FILE"
    # epmd outlives the node: start our own on loopback only if none runs, and remember it.
    if ! listening 4369; then
        epmd -address 127.0.0.1 -daemon
        touch "$DIR/rabbitmq.epmd-ours"
    fi
    # The Debian wrapper would switch to the rabbitmq user; run the server itself.
    setsid /usr/lib/rabbitmq/bin/rabbitmq-server </dev/null >"$DIR/rabbitmq.log" 2>&1 &
    echo $! >"$DIR/rabbitmq.launcher"
    wait_port 5672 90
}

start_one() {
    local peer=$1 port pid
    port=$(port_of "$peer")
    pid=$(live_pid "$peer")
    if [[ -n $pid ]]; then say "$peer: already running (pid $pid)"; return 0; fi
    if listening "$port"; then die "$peer: port $port is taken by a process we did not start"; fi
    local program
    case "$peer" in
        nats) program=nats-server ;; redis) program=redis-server ;;
        rabbitmq) program=rabbitmq-server ;; mosquitto) program=mosquitto ;;
    esac
    command -v "$program" >/dev/null || die "$peer is not installed: run '$0 install'"
    mkdir -p "$DIR"
    if "start_$peer"; then
        say "$peer: listening on 127.0.0.1:$port (pid $(live_pid "$peer"), data in $DIR/$peer)"
    else
        say "$peer: did not come up; its log is in $DIR/"
        stop_one "$peer"
        return 1
    fi
}

stop_one() {
    local peer=$1 pid i
    port_of "$peer" >/dev/null
    pid=$(live_pid "$peer")
    if [[ $peer == rabbitmq && -n $pid ]]; then
        (rabbit_env && rabbitmqctl -n tidings-bench@localhost stop >/dev/null 2>&1) || true
    fi
    if [[ -n $pid ]]; then
        kill "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
        say "$peer: stopped (pid $pid)"
    else
        say "$peer: not running"
    fi
    if [[ $peer == rabbitmq ]]; then
        if [[ -e $DIR/rabbitmq.launcher ]]; then
            pid=$(tr -dc '0-9' <"$DIR/rabbitmq.launcher")
            [[ -n $pid ]] && kill "$pid" 2>/dev/null || true
            rm -f "$DIR/rabbitmq.launcher"
        fi
        if [[ -e $DIR/rabbitmq.epmd-ours ]]; then
            epmd -kill >/dev/null 2>&1 || true
            rm -f "$DIR/rabbitmq.epmd-ours"
        fi
    fi
    rm -f "$DIR/$peer.pid"
    rm -rf "${DIR:?}/$peer"
}

status_one() {
    local peer=$1 port pid
    port=$(port_of "$peer")
    pid=$(live_pid "$peer")
    if [[ -n $pid ]]; then
        say "$peer: running (pid $pid) on 127.0.0.1:$port"
    elif listening "$port"; then
        say "$peer: not started by us, but something listens on 127.0.0.1:$port"
    else
        say "$peer: not running"
    fi
}

command=${1:-}
shift || true
peers=("$@")
[[ ${#peers[@]} -eq 0 ]] && peers=("${ALL[@]}")
case "$command" in
    install) install_peers ;;
    start) status=0; for p in "${peers[@]}"; do start_one "$p" || status=1; done; exit $status ;;
    stop) for p in "${peers[@]}"; do stop_one "$p"; done ;;
    status) for p in "${peers[@]}"; do status_one "$p"; done ;;
    *) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
