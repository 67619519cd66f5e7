#!/usr/bin/env bash
# The images the local cluster runs, built for real and imported into the node's containerd:
#
#   sgdjob/base:<hash>      Debian bookworm from `debootstrap --variant=minbase`, plus python3
#                           and a venv at /opt/venv on PATH (so `python` and `pip` exist, as in
#                           python:*-slim), imported with `docker import`
#   sgdjob/pause:<hash>     a static pause binary built here with gcc (the pod sandbox)
#   sgdjob/sgdjob-operator:<hash>  operator/Dockerfile on the base image (`docker build`)
#   sgdjob/sgdjob:<hash>    trainer/Dockerfile, VARIANT=cpu, on the base image
#
# <hash> is a content hash of everything that goes into the image (Dockerfile, sources, base,
# wheel pins), so an unchanged tree is not rebuilt or re-imported: a warm run costs seconds.
#
# The Dockerfile builds are offline: pip gets `--no-index --find-links` to a wheelhouse under
# .tools/wheels (filled once from PyPI by the host's pip, which has the host's CA bundle), served
# on 127.0.0.1 for the length of the build (`docker build --network host`). So no TLS happens
# inside a build and no CA bundle needs mounting into one. torch: PyPI has only the CUDA build of
# torch 2.13.0 and download.pytorch.org (the CPU index) is not reachable here, so the "cpu"
# variant's torch is PyPI's wheel with its CUDA runtime libraries, unused on CPU (several GB).
#
# dockerd: the system one if it answers; otherwise one started here (no iptables, no bridge,
# cgroupfs) whose PID goes to $CLUSTER_DIR/run/dockerd.pid, and `hack/node.sh down` stops it.
#
# Usage: hack/images.sh            build what is missing, import into containerd, print tags
#        hack/images.sh tags       print the tags (KEY=VALUE lines) without building
# Env:   CLUSTER_DIR, CONTAINERD_SOCK, TORCH_VERSION (2.13.0), PYTHON
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TOOLS_DIR="${TOOLS_DIR:-$ROOT/.tools}"
CLUSTER_DIR="${CLUSTER_DIR:-$TOOLS_DIR/cluster}"
CONTAINERD_SOCK="${CONTAINERD_SOCK:-$CLUSTER_DIR/containerd/containerd.sock}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PYTHON="${PYTHON:-python3}"
# A relative interpreter path (make passes .venv/bin/python) must survive a cd.
if [[ "$PYTHON" == */* && "$PYTHON" != /* ]]; then PYTHON="$PWD/$PYTHON"; fi
SUITE=bookworm
# Debian's docker.io CLI (20.10) has BuildKit built in; a newer CLI on PATH may want buildx.
DOCKER="${DOCKER:-/usr/bin/docker}"
IMAGES_DIR="$TOOLS_DIR/images"
WHEELS="$TOOLS_DIR/wheels/cp$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')"
RUN="$CLUSTER_DIR/run"
LOGS="$CLUSTER_DIR/logs"
BASE_PACKAGES="python3,python3-venv,passwd,ca-certificates"

log() { printf 'images: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

hash_of() {  # hash_of PATH...: a content hash of files (sorted, names included)
  (cd "$ROOT" && find "$@" -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 \
    | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-12)
}

# Bump BASE_RECIPE when build_base changes what goes into the base image.
BASE_RECIPE=1
BASE_HASH="$(printf '%s %s %s' "$SUITE" "$BASE_PACKAGES" "$BASE_RECIPE" | sha256sum | cut -c1-12)"
PAUSE_HASH="$(hash_of hack/pause.c)"
SRC_HASH="$(hash_of pyproject.toml README.md trainer operator examples)"
OPERATOR_HASH="$(printf '%s %s %s' "$BASE_HASH" "$SRC_HASH" "$(hash_of operator/Dockerfile)" | sha256sum | cut -c1-12)"
TRAINER_HASH="$(printf '%s %s %s %s' "$BASE_HASH" "$SRC_HASH" "$TORCH_VERSION" "$(hash_of trainer/Dockerfile)" | sha256sum | cut -c1-12)"
BASE_IMAGE="sgdjob/base:$BASE_HASH"
PAUSE_IMAGE="sgdjob/pause:$PAUSE_HASH"
OPERATOR_IMAGE="sgdjob/sgdjob-operator:$OPERATOR_HASH"
TRAINER_IMAGE="sgdjob/sgdjob:$TRAINER_HASH"

print_tags() {
  printf 'PAUSE_IMAGE=docker.io/%s\nOPERATOR_IMAGE=docker.io/%s\nTRAINER_IMAGE=docker.io/%s\n' \
    "$PAUSE_IMAGE" "$OPERATOR_IMAGE" "$TRAINER_IMAGE"
}

# --- dockerd --------------------------------------------------------------------------------

ensure_docker() {
  "$DOCKER" info >/dev/null 2>&1 && return
  command -v dockerd >/dev/null || die "dockerd missing: run hack/node.sh install"
  mkdir -p "$RUN" "$LOGS"
  # No iptables/bridge: builds use the host network (offline anyway), and nothing here may
  # turn on IP forwarding or NAT. dockerd runs its own containerd child, not the node's.
  setsid dockerd --iptables=false --ip-forward=false --ip-masq=false --bridge=none \
    --exec-opt native.cgroupdriver=cgroupfs --pidfile "$RUN/dockerd.docker-pid" \
    >"$LOGS/dockerd.log" 2>&1 </dev/null &
  echo $! >"$RUN/dockerd.pid"
  for _ in $(seq 150); do
    "$DOCKER" info >/dev/null 2>&1 && { log "started dockerd (pid $(cat "$RUN/dockerd.pid"))"; return; }
    sleep 0.2
  done
  die "dockerd did not start; see $LOGS/dockerd.log"
}

has_docker_image() { "$DOCKER" image inspect "$1" >/dev/null 2>&1; }

ctr_() { ctr --address "$CONTAINERD_SOCK" --namespace k8s.io "$@"; }

in_containerd() {  # (no `| grep -q`: under pipefail its early exit would fail the pipe)
  local refs
  refs="$(ctr_ images ls -q 2>/dev/null || true)"
  grep -qxF "docker.io/$1" <<<"$refs"
}

import_image() {  # import_image TAG: docker -> the node's containerd, once per tag
  if in_containerd "$1"; then
    log "$1 already in containerd"
    return
  fi
  [[ -S "$CONTAINERD_SOCK" ]] || die "the node's containerd is not running ($CONTAINERD_SOCK)"
  log "importing $1 into containerd"
  "$DOCKER" save "$1" | ctr_ images import - >/dev/null
  in_containerd "$1" || die "$1 did not arrive in containerd"
}

# --- base and pause ---------------------------------------------------------------------------

build_base() {
  has_docker_image "$BASE_IMAGE" && return
  command -v debootstrap >/dev/null || die "debootstrap missing: run hack/node.sh install"
  local tarball="$IMAGES_DIR/base-$BASE_HASH.tar"
  mkdir -p "$IMAGES_DIR"
  if [[ ! -f "$tarball" ]]; then
    local dir="$IMAGES_DIR/rootfs-$BASE_HASH"
    rm -rf "$dir"
    log "debootstrap --variant=minbase $SUITE (with $BASE_PACKAGES)"
    debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$dir" \
      http://deb.debian.org/debian >"$IMAGES_DIR/debootstrap.log" 2>&1 \
      || { tail -20 "$IMAGES_DIR/debootstrap.log" >&2; die "debootstrap failed"; }
    # A venv gives `python` and `pip` on PATH, like python:*-slim, and keeps pip away from
    # Debian's externally managed system Python.
    chroot "$dir" /usr/bin/python3 -m venv /opt/venv
    chroot "$dir" /bin/sh -c 'apt-get clean; rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin'
    tar -C "$dir" --numeric-owner -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$dir"
  fi
  log "docker import $BASE_IMAGE"
  "$DOCKER" import \
    --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' \
    "$tarball" "$BASE_IMAGE" >/dev/null
}

build_pause() {
  has_docker_image "$PAUSE_IMAGE" && return
  local dir
  dir="$(mktemp -d)"
  gcc -static -O2 -o "$dir/pause" "$ROOT/hack/pause.c"
  strip "$dir/pause"
  tar -C "$dir" --owner=0 --group=0 -cf "$dir/pause.tar" pause
  "$DOCKER" import --change 'ENTRYPOINT ["/pause"]' --change 'USER 65535:65535' \
    "$dir/pause.tar" "$PAUSE_IMAGE" >/dev/null
  rm -rf "$dir"
  log "built $PAUSE_IMAGE"
}

# --- the wheelhouse and the Dockerfile builds -------------------------------------------------

fill_wheelhouse() {  # everything pip needs inside the builds, downloaded once by the host
  local reqs stamp
  reqs="$("$PYTHON" - "$ROOT/pyproject.toml" <<'PY'
import sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))
proj = p["project"]
reqs = list(proj["dependencies"]) + p["build-system"]["requires"]
for extra in ("trainer", "operator"):
    reqs += proj["optional-dependencies"][extra]
print("\n".join(reqs))
PY
)"
  reqs+=$'\n'"torch==$TORCH_VERSION"$'\n'"wheel"
  stamp="$WHEELS/.stamp-$(sha256sum <<<"$reqs" | cut -c1-12)"
  [[ -f "$stamp" ]] && return
  mkdir -p "$WHEELS"
  log "filling the wheelhouse $WHEELS (once; torch $TORCH_VERSION is large)"
  # Earlier torch downloads anywhere under .tools/wheels count (no second multi-GB fetch).
  local links=()
  for d in "$TOOLS_DIR"/wheels/*/; do links+=(--find-links "$d"); done
  printf '%s\n' "$reqs" >"$WHEELS/requirements.txt"
  "$PYTHON" -m pip download -q --only-binary=:all: -d "$WHEELS" "${links[@]}" \
    -r "$WHEELS/requirements.txt"
  touch "$stamp"
}

SERVER_PID=""
serve_wheels() {  # a directory listing of the wheelhouse on 127.0.0.1, for pip --find-links
  # A fixed port: the URL is a build argument, so a new one would miss Docker's layer cache
  # (the multi-GB torch layer). A busy port falls back to a free one (and a cold layer).
  local port="${WHEEL_PORT:-18791}"
  if ! "$PYTHON" -c 'import socket,sys; socket.socket().bind(("127.0.0.1", int(sys.argv[1])))' "$port" 2>/dev/null; then
    port="$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  fi
  "$PYTHON" -m http.server --bind 127.0.0.1 --directory "$WHEELS" "$port" \
    >"$IMAGES_DIR/wheel-server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 50); do
    curl -fsS "http://127.0.0.1:$port/" >/dev/null 2>&1 && break
    sleep 0.1
  done
  WHEEL_URL="http://127.0.0.1:$port/"
}
stop_server() { [[ -n "$SERVER_PID" ]] && kill "$SERVER_PID" 2>/dev/null || true; }
trap stop_server EXIT

docker_build() {  # docker_build TAG DOCKERFILE [BUILD-ARG...]
  local tag="$1" file="$2"
  shift 2
  has_docker_image "$tag" && return
  local args=() a
  for a in "$@"; do args+=(--build-arg "$a"); done
  log "docker build $tag ($file)"
  local t0=$SECONDS
  DOCKER_BUILDKIT=1 "$DOCKER" build --network host --progress plain -f "$ROOT/$file" \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" "${args[@]}" -t "$tag" "$ROOT" \
    >"$IMAGES_DIR/build-${tag//[:\/]/_}.log" 2>&1 \
    || { tail -30 "$IMAGES_DIR/build-${tag//[:\/]/_}.log" >&2; die "docker build $tag failed"; }
  log "built $tag in $((SECONDS - t0)) s"
}

build_all() {
  mkdir -p "$IMAGES_DIR"
  ensure_docker
  build_base
  build_pause
  if ! has_docker_image "$OPERATOR_IMAGE" || ! has_docker_image "$TRAINER_IMAGE"; then
    fill_wheelhouse
    serve_wheels
    local offline="--no-index --find-links $WHEEL_URL"
    docker_build "$OPERATOR_IMAGE" operator/Dockerfile "PIP_ARGS=$offline"
    docker_build "$TRAINER_IMAGE" trainer/Dockerfile VARIANT=cpu "TORCH_VERSION=$TORCH_VERSION" \
      "TORCH_PIP_ARGS=$offline" "PIP_ARGS=$offline"
    stop_server
    # BuildKit's cache grows by gigabytes a build; keep the recent part (the torch layer).
    "$DOCKER" builder prune -f --keep-storage 6GB >/dev/null 2>&1 || true
  fi
  import_image "$PAUSE_IMAGE"
  import_image "$OPERATOR_IMAGE"
  import_image "$TRAINER_IMAGE"
  prune_old
}

prune_old() {  # older builds of our images (other hashes): gigabytes each, never used again
  local keep="$BASE_IMAGE $PAUSE_IMAGE $OPERATOR_IMAGE $TRAINER_IMAGE" ref refs
  refs="$(ctr_ images ls -q 2>/dev/null || true)"
  for ref in $refs; do
    [[ "$ref" == docker.io/sgdjob/* && " $keep " != *" ${ref#docker.io/} "* ]] || continue
    ctr_ images rm "$ref" >/dev/null 2>&1 && log "removed $ref from containerd"
  done
  refs="$("$DOCKER" images --format '{{.Repository}}:{{.Tag}}' 'sgdjob/*' 2>/dev/null || true)"
  for ref in $refs; do
    [[ " $keep " != *" $ref "* ]] || continue
    "$DOCKER" image rm "$ref" >/dev/null 2>&1 && log "removed $ref from docker"
  done
  return 0
}

case "${1:-build}" in
  build) build_all; print_tags ;;
  tags) print_tags ;;
  pause)  # just the pause image (containerd's sandbox image), built and imported
    mkdir -p "$IMAGES_DIR"; ensure_docker; build_pause; import_image "$PAUSE_IMAGE"; print_tags ;;
  *) echo "usage: $0 [build|tags|pause]" >&2; exit 2 ;;
esac
