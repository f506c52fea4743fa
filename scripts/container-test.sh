#!/usr/bin/env bash
# Builds the Dockerfile for real and runs the image: no Docker engine or image registry is
# reachable here, so the base image (python:3.11-slim-bookworm) is made from a Debian rootfs
# with debootstrap and imported under that name; buildah builds, podman runs.
# Checks: the image runs the demo and serves balances on /metrics, runs as UID 10001 (non-root),
# has no compiler, and keeps its HEALTHCHECK. Needs root, buildah, podman and debootstrap.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in buildah podman debootstrap curl; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    if [ -n "${CI:-}" ]; then
      echo "container test: $tool is missing (CI installs it: see .ci/run)" >&2
      exit 1
    fi
    echo "container test SKIPPED: $tool is not installed (apt-get install buildah podman debootstrap curl)"
    exit 0
  fi
done

work=$(mktemp -d /var/tmp/balance-exporter-container.XXXXXX)
image=localhost/balance-exporter:test
base=docker.io/library/python:3.11-slim-bookworm
container=balance-exporter-test-$$

# Storage, runtime and limits of our own, so that nothing outside $work is touched.
nofile=$(ulimit -Hn)
cat > "$work/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=${nofile}:${nofile}", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
cat > "$work/storage.conf" <<CONF
[storage]
driver = "overlay"
graphroot = "$work/storage"
runroot = "$work/run"
CONF
export CONTAINERS_CONF="$work/containers.conf" CONTAINERS_STORAGE_CONF="$work/storage.conf"
export BUILDAH_ISOLATION=chroot

cleanup() {
  podman rm -f "$container" >/dev/null 2>&1 || true
  podman system reset --force >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n 1)
mirror=${mirror:-http://deb.debian.org/debian}
echo "== base image from debootstrap ($mirror)"
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
  bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
  || { tail -20 "$work/debootstrap.log"; exit 1; }
# pip inside the build must trust what this machine trusts (its registry access may go through
# a TLS-intercepting proxy).
cp /etc/ssl/certs/ca-certificates.crt "$work/rootfs/etc/ssl/certs/ca-certificates.crt"
tar -C "$work/rootfs" -c . | podman import - "$base" >/dev/null

echo "== build"
buildah bud --format docker --layers=false \
  --build-arg PIP_CERT=/etc/ssl/certs/ca-certificates.crt -t "$image" . >"$work/build.log" 2>&1 \
  || { tail -40 "$work/build.log"; exit 1; }

echo "== image config"
user=$(podman image inspect --format '{{.Config.User}}' "$image")
health=$(podman image inspect --format '{{json .Config.Healthcheck}}' "$image")
entrypoint=$(podman image inspect --format '{{json .Config.Entrypoint}}' "$image")
[ "$user" = "10001:10001" ] || { echo "image user is '$user', expected 10001:10001"; exit 1; }
case "$health" in *healthy*) ;; *) echo "no HEALTHCHECK in the image: $health"; exit 1 ;; esac
[ "$entrypoint" = '["balance-exporter"]' ] || { echo "entrypoint is $entrypoint"; exit 1; }
if podman run --rm --network host --entrypoint sh "$image" -c 'command -v gcc cc' ; then
  echo "the image has a compiler"; exit 1
fi

echo "== run the demo"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
podman run -d --name "$container" --network host "$image" \
  demo --web.listen-address "127.0.0.1:$port" >/dev/null
echo "   waiting up to 60 s for the demo's balances on http://127.0.0.1:$port/metrics"
for _ in $(seq 1 120); do
  if curl -fsS "http://127.0.0.1:$port/metrics" 2>/dev/null | grep -q '^gemini_balance_amount{account="savings",currency="BTC"} 12.5'; then
    break
  fi
  sleep 0.5
done
metrics=$(curl -fsS "http://127.0.0.1:$port/metrics")
echo "$metrics" | grep -q '^gemini_balance_amount{account="savings",currency="BTC"} 12.5' \
  || { echo "no balances on /metrics"; podman logs "$container" | tail -20; exit 1; }
echo "$metrics" | grep '^gemini_account_up'
uid=$(podman exec "$container" id -u)
[ "$uid" = 10001 ] || { echo "the exporter runs as UID $uid"; exit 1; }
# The HEALTHCHECK's own command, run inside the container.
podman inspect --format '{{json .Config.Healthcheck.Test}}' "$container" | grep -q healthy
podman exec "$container" python3 -c \
  "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/-/healthy', timeout=4)"
podman stop --time 10 "$container" >/dev/null
code=$(podman inspect --format '{{.State.ExitCode}}' "$container")
[ "$code" = 0 ] || { echo "the exporter exited $code on SIGTERM"; exit 1; }
echo "container test: 1 passed, 0 failed"
