#!/usr/bin/env bash
# What the multi-host test (tests/test_deploy.py) needs from the system: an sshd for each test
# host (Debian's openssh-server) and iproute2's `ip netns`. Installs openssh-server when it is
# missing and this is root on Debian/Ubuntu; otherwise says why the test will skip, and exits 0:
# the rest of the suite does not need it.
#
# The package's own service is not started: a policy-rc.d denies it for the install, so no sshd
# listens on this machine's port 22. The test starts its own sshd inside each network namespace
# it makes, on a port and with keys of its own, and stops them at the end.
#
# Usage: scripts/setup_test_hosts.sh
set -uo pipefail

say() { echo "setup_test_hosts: $*"; }

if [ -x /usr/sbin/sshd ] && command -v ip >/dev/null 2>&1; then
  say "ok: $(/usr/sbin/sshd -V 2>&1 | head -1 || true)"
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  say "no sshd or ip here and not root with apt-get: the multi-host horovodrun test will skip (apt-get install openssh-server iproute2 to run it)"
  exit 0
fi

say "installing Debian's openssh-server and iproute2 (service not started)"
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=1
fi
export DEBIAN_FRONTEND=noninteractive
status=0
{ apt-get update -qq && apt-get install -y -qq --no-install-recommends openssh-server iproute2; } \
  >/tmp/setup_test_hosts.log 2>&1 || status=$?
[ "$own_policy" = 1 ] && rm -f "$policy"
if [ "$status" != 0 ]; then
  tail -5 /tmp/setup_test_hosts.log >&2
  say "WARNING: apt-get failed (log: /tmp/setup_test_hosts.log): the multi-host horovodrun test will skip"
  exit 0
fi
say "ok: $(/usr/sbin/sshd -V 2>&1 | head -1 || true)"
