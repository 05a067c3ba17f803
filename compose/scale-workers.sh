#!/bin/sh
# Usage: compose/scale-workers.sh N     (make scale-workers N=...)
#
# The compose stack has a fixed partition count: PARTITIONS=4, one service
# per partition (worker-0 .. worker-3). A fifth worker cannot take a share of
# the work, because the events are hashed into 4 partitions. So N means:
#
#   N = 0   stop every worker (before changing the partition count, say).
#   N < 4   run the partition services worker-0 .. worker-(N-1) and stop the
#           others. The stopped partitions are NOT processed: their lag grows
#           (see "Partition coverage" in Grafana) until you scale back up.
#           Their checkpoints stay, so nothing is lost or replayed.
#   N = 4   one process per partition: the normal state.
#   N > 4   every partition runs, and the N-4 extra processes are hot
#           standbys, spread round-robin over the partitions. A standby waits
#           on the partition's ownership lock and takes over within about a
#           second when the owner dies. Standbys add availability, not
#           throughput.
#
# More throughput needs more partitions: see "Changing the partition count"
# in the scaling runbook (README, "Production deployment").
#
# Elastic mode (WORKER_MODE=elastic, in the environment or compose/.env):
# N is the replica count of the one service worker-elastic, whose processes
# share the group's partitions among themselves; the per-partition services
# stop. Processes beyond the partition count are members that own nothing.
#
# COMPOSE overrides the compose command (the tests set it to `echo`).
set -eu

PARTITIONS=4
ENV_FILE=${ENV_FILE:-compose/.env}
if [ -z "${WORKER_MODE:-}" ] && [ -f "$ENV_FILE" ]; then
    WORKER_MODE=$(sed -n 's/^WORKER_MODE=//p' "$ENV_FILE" | tail -n 1)
fi
WORKER_MODE=${WORKER_MODE:-static}
case $WORKER_MODE in
    elastic) DEFAULT_COMPOSE="docker compose -f compose/docker-compose.yml -f compose/docker-compose.elastic.yml" ;;
    static) DEFAULT_COMPOSE="docker compose -f compose/docker-compose.yml" ;;
    *) echo "WORKER_MODE=$WORKER_MODE must be static or elastic" >&2; exit 2 ;;
esac
COMPOSE=${COMPOSE:-$DEFAULT_COMPOSE}

usage() {
    echo "usage: $0 N   (N >= 0: processes to run for the $PARTITIONS partitions)" >&2
    exit 2
}

[ $# -eq 1 ] || usage
case $1 in
    '' | *[!0-9]*) usage ;;
esac
N=$1

if [ "$WORKER_MODE" = elastic ]; then
    echo "elastic: $N worker process(es) share the group's partitions; none runs per partition"
    # shellcheck disable=SC2086  # word splitting of the compose command is intended
    $COMPOSE up --detach --no-recreate \
        --scale worker-0=0 --scale worker-1=0 --scale worker-2=0 --scale worker-3=0 \
        --scale worker-elastic="$N" worker-elastic
    exit 0
fi

scale_args=""
services=""
k=0
while [ "$k" -lt "$PARTITIONS" ]; do
    if [ "$N" -ge "$PARTITIONS" ]; then
        replicas=$((N / PARTITIONS))
        [ "$k" -lt $((N % PARTITIONS)) ] && replicas=$((replicas + 1))
    elif [ "$k" -lt "$N" ]; then
        replicas=1
    else
        replicas=0
    fi
    case $replicas in
        0) echo "partition $k: stopped (not processed until scaled back up)" ;;
        1) echo "partition $k: 1 process" ;;
        *) echo "partition $k: $replicas processes (1 owner, $((replicas - 1)) standby)" ;;
    esac
    scale_args="$scale_args --scale worker-$k=$replicas"
    services="$services worker-$k"
    k=$((k + 1))
done

# --no-recreate: running workers keep running; only the difference changes.
# shellcheck disable=SC2086  # word splitting of the argument lists is intended
$COMPOSE up --detach --no-recreate $scale_args $services
