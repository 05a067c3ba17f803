#!/bin/sh
# Prints where the compose stack's services are (run by `make up`).
# Reads ports from compose/.env without sourcing it, so any password is safe there.
set -eu
ENV_FILE=${ENV_FILE:-compose/.env}

get() {
    value=""
    [ -f "$ENV_FILE" ] && value=$(sed -n "s/^$1=//p" "$ENV_FILE" | tail -n 1)
    echo "${value:-$2}"
}

echo ""
echo "Grafana     http://127.0.0.1:$(get GRAFANA_PORT 3000)/  (Projectionist folder; admin login in $ENV_FILE)"
echo "Prometheus  http://127.0.0.1:$(get PROMETHEUS_PORT 9090)/  (alert rules: /alerts)"
echo "Append API  http://127.0.0.1:$(get API_PORT 8000)/  (health: /healthz, metrics: /metrics)"
echo "Tempo       http://127.0.0.1:$(get TEMPO_PORT 3200)/  (search traces in Grafana: Explore > Tempo)"
echo "PostgreSQL  postgresql://$(get POSTGRES_USER projectionist)@127.0.0.1:$(get POSTGRES_PORT 5432)/$(get POSTGRES_DB projectionist)"
echo "Locust      http://127.0.0.1:$(get LOCUST_PORT 8089)/  (only with COMPOSE_PROFILES=load make up)"
