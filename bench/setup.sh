#!/usr/bin/env bash
# Install what the benchmark needs from packages, idempotently:
# - Debian's postfix (smtp-source, smtp-sink, and the Postfix the benchmark compares with);
#   the system instance is left unconfigured and stopped (the benchmark runs its own);
# - gcc (bench/bindsrc.c, the LD_PRELOAD shim that gives smtp-source a source address);
# - Debian's rspamd (the milter row); its system service is stopped (the benchmark starts
#   its own on loopback);
# - with --profile: py-spy in the venv (python -m bench --profile).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"

if [ "$(id -u)" -ne 0 ]; then
    echo "bench/setup.sh: run as root (the benchmark starts its own Postfix)" >&2
    exit 1
fi

if ! dpkg-query -W -f='${Status}' postfix 2>/dev/null | grep -q "install ok installed"; then
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    echo "postfix postfix/mailname string localhost.localdomain" | debconf-set-selections
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postfix
fi
if [ -f /etc/postfix/main.cf ] && postfix status >/dev/null 2>&1; then
    postfix stop
fi
if ! dpkg-query -W -f='${Status}' rspamd 2>/dev/null | grep -q "install ok installed"; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends rspamd
fi
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet rspamd 2>/dev/null; then
    systemctl stop rspamd
fi

# a C compiler for bench/bindsrc.c (the source-address shim for smtp-source)
if ! command -v cc >/dev/null 2>&1; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev
fi

if [ "${1:-}" = "--profile" ] && [ ! -x "$VENV/bin/py-spy" ]; then
    "$VENV/bin/pip" install -q py-spy
fi
