#!/usr/bin/env bash
# Run the test suite inside a private network namespace whose only interface is loopback, so no
# test can reach past 127.0.0.1 (servers the tests start live inside the same namespace).
# The arguments go to pytest, which picks the tests: `make test` passes -m "not slow" (the fast tier),
# `make test-all` nothing (every test); the markers are in pyproject.toml. Every run ends with its
# 20 slowest tests.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTEST=("$ROOT/.venv/bin/python" -m pytest --durations=20)  # the 20 slowest tests, to keep each tier in budget
export RAY_USAGE_STATS_ENABLED=0 AIM_UI_TELEMETRY_ENABLED=0 GLOO_SOCKET_IFNAME=lo

run() {
  set +e
  "$@"
  local rc=$?
  set -e
  # pytest exits 5 when it collected nothing: that is a failure of the suite, not a pass.
  if [ $rc -eq 5 ]; then echo "[tests] no tests were collected" >&2; fi
  return $rc
}

# Inside the namespace: loopback up, plus a veth pair whose ends both stay in the namespace, with a
# link-local address, so that getaddrinfo's AI_ADDRCONFIG sees an IPv4 address (Slurm resolves its
# host name with it). No route leads anywhere: every server still listens on 127.0.0.1.
NETNS_SETUP='ip link set lo up
ip link add mpq-veth0 type veth peer name mpq-veth1 2>/dev/null \
  && ip addr add 169.254.77.1/32 dev mpq-veth0 && ip link set mpq-veth0 up && ip link set mpq-veth1 up \
  || echo "[tests] no veth pair in the namespace: the Slurm tests cannot resolve the host name" >&2'

if [ "${MPQ_TEST_NETNS:-1}" = "1" ] && unshare -n true 2>/dev/null; then
  echo "[tests] running inside a loopback-only network namespace (unshare -n)"
  run unshare -n -- bash -c "$NETNS_SETUP"'
exec "$@"' _ "${PYTEST[@]}" "$@"
elif [ "${MPQ_TEST_NETNS:-1}" = "1" ] && unshare -rn true 2>/dev/null; then
  echo "[tests] running inside a loopback-only user+network namespace (unshare -rn)"
  run unshare -rn -- bash -c "$NETNS_SETUP"'
exec "$@"' _ "${PYTEST[@]}" "$@"
else
  echo "[tests] WARNING: cannot create a network namespace here; running on the host network" >&2
  run "${PYTEST[@]}" "$@"
fi
