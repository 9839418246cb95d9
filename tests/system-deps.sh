#!/usr/bin/env bash
# The Debian packages the tests start (each test starts its own instance on loopback):
# install the missing ones with apt-get (as root, or through sudo), and stop the system
# instances their packages may have started. Idempotent and quick once all are there.
# `make test` runs it first; .ci/run runs `make test`.
set -euo pipefail

cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

# postfix, postfix-pcre: the differential tests. fail2ban (fail2ban-regex), docker-compose
# (`config` validates deploy/compose.yml without an engine) and systemd (systemd-analyze
# verify/security on deploy/smtpgate.service): tests/deploy/. rspamd, clamav-daemon,
# clamav-milter, opendkim, opendkim-tools: the real milters of tests/milter/ (each test
# starts its own on loopback; no virus database is fetched).
need_packages=()
for pkg in postfix postfix-pcre fail2ban docker-compose systemd \
    rspamd clamav-daemon clamav-milter opendkim opendkim-tools; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        need_packages+=("$pkg")
    fi
done

# The policy daemons of tests/delegation/, each started by its test on loopback:
# postgrey, postfwd (postfwd2), postfix-policyd-spf-python (policyd-spf) and socat, which
# serves policyd-spf (a standard-input program) on a TCP socket.
# redis-server: tests/shared_state/ (smtpgate_shared_state), started by each test on loopback
# (redis-cli, from redis-tools, comes with it).
for pkg in postgrey postfwd postfix-policyd-spf-python socat redis-server; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        need_packages+=("$pkg")
    fi
done

# haproxy: `haproxy -c` on deploy/haproxy/haproxy.cfg (tests/deploy/test_compose_ha.py) and
# two smtpgate behind it (tests/serve/test_haproxy.py: PROXY v2, SMTP checks).
# chromium, chromium-driver: the live view (/watch) in a headless browser, driven through
# Debian's chromedriver by selenium (tests/serve/test_watch.py).
# util-linux (unshare), mount: tests/postscreen_instance.py starts Postfix with postscreen in
# a mount namespace of its own, with the test's resolv.conf bind-mounted over
# /etc/resolv.conf there (dnsblog asks the C library's resolver, port 53); the machine's file
# is not touched. Needs root with CAP_SYS_ADMIN (a privileged container, or a machine).
for pkg in haproxy chromium chromium-driver util-linux mount; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        need_packages+=("$pkg")
    fi
done

if [ "${#need_packages[@]}" -gt 0 ]; then
    # postfix's postinst asks debconf questions; answer them up front.
    echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
    echo "postfix postfix/mailname string localhost.localdomain" | $SUDO debconf-set-selections
    $SUDO apt-get update
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        "${need_packages[@]}"
fi

# The system instance (if the package started one) is not needed and must not hold port 25
# or confuse anyone reading logs. `postfix status` exits non-zero when it is not running;
# a missing /etc/postfix/main.cf ("No configuration") also means it cannot be running.
if [ -f /etc/postfix/main.cf ] && $SUDO postfix status >/dev/null 2>&1; then
    $SUDO postfix stop
fi
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet postfix 2>/dev/null; then
    $SUDO systemctl stop postfix
fi

# The postgrey package may start a system instance (port 10023); the tests start their
# own on ports of their own, and nothing should answer on the system's.
if [ -x /etc/init.d/postgrey ]; then
    $SUDO /etc/init.d/postgrey stop >/dev/null 2>&1 || true
fi
# Nor are the milters' system instances (their packages may start them): the tests start
# their own, each on loopback with its own folders.
for svc in rspamd clamav-daemon clamav-freshclam clamav-milter opendkim; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
        $SUDO systemctl stop "$svc"
    fi
done

# The redis-server package starts a system instance on port 6379; the tests start their own.
if [ -x /etc/init.d/redis-server ]; then
    $SUDO /etc/init.d/redis-server stop >/dev/null 2>&1 || true
fi
# Nor HAProxy's (its package may start one with Debian's haproxy.cfg).
if [ -x /etc/init.d/haproxy ]; then
    $SUDO /etc/init.d/haproxy stop >/dev/null 2>&1 || true
fi

/usr/sbin/postconf -dh mail_version | sed 's/^/postfix version: /'
