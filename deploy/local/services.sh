#!/usr/bin/env bash
# Make sure Postgres and RabbitMQ are installed and running on this machine (Debian, as root),
# and that promtool (Debian's prometheus package: the alert rules' tests) and amtool (its
# prometheus-alertmanager package: the alert routing's tests) are there.
# Starts whichever is stopped; installs whichever is missing. Safe to run again and again.
set -euo pipefail

log() { printf '[services] %s\n' "$*" >&2; }

apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  if [ -z "${_APT_UPDATED:-}" ]; then apt-get update -qq; _APT_UPDATED=1; fi
  apt-get install -y -qq "$@" >/dev/null
}

ensure_postgres() {
  if ! command -v pg_lsclusters >/dev/null 2>&1; then
    log "installing PostgreSQL"
    apt_install postgresql
  fi
  local version
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  if ! pg_lsclusters -h | awk '{print $4}' | grep -q online; then
    log "starting PostgreSQL $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
  fi
  for _ in $(seq 1 60); do
    pg_isready -q -h 127.0.0.1 -p 5432 && break
    sleep 0.5
  done
  if ! psql -h 127.0.0.1 -U postgres -d postgres -tAc 'SELECT 1' >/dev/null 2>&1; then
    # A fresh Debian install asks for passwords on TCP; this machine's convention is trust
    # on loopback only.
    log "allowing trusted loopback connections for user postgres"
    local hba="/etc/postgresql/$version/main/pg_hba.conf"
    sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
    pg_ctlcluster --skip-systemctl-redirect "$version" main reload
    sleep 1
  fi
  psql -h 127.0.0.1 -U postgres -d postgres -tAc 'SELECT 1' >/dev/null
}

ensure_rabbitmq() {
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    log "installing RabbitMQ"
    apt_install rabbitmq-server
  fi
  if ! rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
    log "starting RabbitMQ"
    rabbitmq-server -detached
    rabbitmqctl -q await_startup --timeout 120 >/dev/null 2>&1 || true
  fi
  for _ in $(seq 1 120); do
    rabbitmq-diagnostics -q check_port_connectivity >/dev/null 2>&1 && return 0
    sleep 1
  done
  log "RabbitMQ did not come up"
  return 1
}

ensure_rabbitmq_prometheus() {
  # RabbitMQ's own metrics endpoint (:15692), as deployed: the dashboard's queue panels and
  # the dead-letter alert read it, and a test scrapes it with a real Prometheus.
  if ! rabbitmq-plugins -q is_enabled rabbitmq_prometheus >/dev/null 2>&1; then
    log "enabling RabbitMQ's Prometheus plugin"
    rabbitmq-plugins -q enable rabbitmq_prometheus >/dev/null
  fi
}

ensure_chromium() {
  # The console's browser tests drive Debian's Chromium (through Playwright).
  if ! command -v chromium >/dev/null 2>&1; then
    log "installing Chromium (the console's browser tests)"
    apt_install --no-install-recommends chromium
  fi
}

ensure_promtool() {
  if ! command -v promtool >/dev/null 2>&1; then
    log "installing promtool (Debian's prometheus package; its server is not started)"
    apt_install --no-install-recommends prometheus
  fi
  if ! command -v amtool >/dev/null 2>&1; then
    log "installing amtool (Debian's prometheus-alertmanager package: the routing's tests)"
    apt_install --no-install-recommends prometheus-alertmanager
  fi
}

ensure_postgres
ensure_rabbitmq
ensure_rabbitmq_prometheus
ensure_promtool
ensure_chromium
log "Postgres and RabbitMQ are up"
