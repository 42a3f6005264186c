#!/usr/bin/env bash
# Run the test suite inside a private network namespace whose only interface is loopback, so no
# test can reach past 127.0.0.1 (servers the tests start live inside the same namespace).
# The arguments go to pytest, which picks the tests: `make test` passes -m "not slow" (the fast tier),
# `make test-all` nothing (every test); the markers are in pyproject.toml. Every run ends with its
# 20 slowest tests and its 20 slowest test files (from outputs/tests/junit.xml, scripts/test_file_totals.py).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
JUNIT="$ROOT/outputs/tests/junit.xml"
mkdir -p "$(dirname "$JUNIT")" && rm -f "$JUNIT"  # no stale report from an earlier run
# the 20 slowest tests, and every test's time in the JUnit report, to keep each tier in budget
PYTEST=("$ROOT/.venv/bin/python" -m pytest --durations=20 --junitxml="$JUNIT")
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

tests() {
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
}

set +e
tests "$@"
rc=$?
set -e
if [ -s "$JUNIT" ]; then
  echo "[tests] the 20 slowest test files:"
  "$ROOT/.venv/bin/python" "$ROOT/scripts/test_file_totals.py" "$JUNIT" --top 20 || true
fi
exit $rc
