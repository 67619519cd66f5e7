#!/usr/bin/env bash
# A real node for the local cluster of hack/cluster.sh, on this machine:
#
#   hack/node.sh install   Debian's containerd, runc, containernetworking-plugins, docker.io,
#                          debootstrap, iptables, conntrack (apt-get; nothing when installed)
#   hack/node.sh net       the bridge sgdjob0 with NODE_IP/16 (the pods' gateway, and the
#                          address the API server serves on so pods can reach it), and a
#                          FORWARD guard: pod traffic may not leave the machine
#   hack/node.sh up        net, then a containerd of its own (CRI, cgroupfs,
#                          restrict_oom_score_adj; its own socket, config and state under
#                          $CLUSTER_DIR/containerd, its image store under .tools/containerd),
#                          CNI bridge + host-local + loopback, the pause image, a kubelet of
#                          the control plane's release, kube-proxy (iptables mode) for the
#                          `kubernetes` Service, CoreDNS on NODE_IP:53 serving cluster.local,
#                          and local PersistentVolumes (StorageClass sgdjob-local)
#   hack/node.sh down      kills the node's pods (through containerd), stops exactly what `up`
#                          started (by PID, checked against the command line), unmounts what
#                          the kubelet mounted under $CLUSTER_DIR, removes the bridge, the
#                          guard and kube-proxy's rules
#   hack/node.sh status    says what runs
#
# `up` and `down` are idempotent. The control plane (hack/cluster.sh up) must be running for
# `up`: this script reads its CA from $CLUSTER_DIR/pki and signs the node's identities with it.
#
# CoreDNS runs on the host, not as a pod: it needs no image, it is up before the first pod,
# and pods reach it on their gateway address (kubelet clusterDNS = NODE_IP).
#
# Env: CLUSTER_DIR (.tools/cluster), KUBE_VERSION (v1.34.4), COREDNS_VERSION (v1.14.7),
#      NODE_NAME (sgdjob-node), NODE_IP (10.88.0.1), APISERVER_PORT (6443),
#      PERSISTENT_VOLUMES (16), KUBECTL
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TOOLS_DIR="${TOOLS_DIR:-$ROOT/.tools}"
CLUSTER_DIR="${CLUSTER_DIR:-$TOOLS_DIR/cluster}"
KUBE_VERSION="${KUBE_VERSION:-v1.34.4}"
COREDNS_VERSION="${COREDNS_VERSION:-v1.14.7}"
NODE_NAME="${NODE_NAME:-sgdjob-node}"
NODE_IP="${NODE_IP:-10.88.0.1}"
POD_CIDR="${POD_CIDR:-${NODE_IP%.*.*}.0.0/16}"
BRIDGE="${BRIDGE:-sgdjob0}"
APISERVER_PORT="${APISERVER_PORT:-6443}"
PERSISTENT_VOLUMES="${PERSISTENT_VOLUMES:-16}"
KUBECTL="${KUBECTL:-$TOOLS_DIR/bin/kubectl}"
PYTHON="${PYTHON:-python3}"
# A relative interpreter path (make passes .venv/bin/python) must survive a cd.
if [[ "$PYTHON" == */* && "$PYTHON" != /* ]]; then PYTHON="$PWD/$PYTHON"; fi
KUBE_BIN="$TOOLS_DIR/kube/$KUBE_VERSION/bin"
COREDNS_BIN="$TOOLS_DIR/coredns/$COREDNS_VERSION/bin/coredns"
PKI="$CLUSTER_DIR/pki"
RUN="$CLUSTER_DIR/run"
LOGS="$CLUSTER_DIR/logs"
NODE_DIR="$CLUSTER_DIR/node"
CTRD_DIR="$CLUSTER_DIR/containerd"
CONTAINERD_SOCK="$CTRD_DIR/containerd.sock"
# The image store outlives `down`, so a second `up` does not re-import gigabytes of images.
CTRD_ROOT="$TOOLS_DIR/containerd"
VOLUMES="$CLUSTER_DIR/volumes"
ADMIN_KUBECONFIG="$CLUSTER_DIR/kubeconfig"
GUARD=SGDJOB-NODE
PACKAGES=(containerd runc containernetworking-plugins docker.io debootstrap iptables conntrack)
CNI_BIN=/usr/lib/cni
export CONTAINERD_SOCK CLUSTER_DIR

log() { printf 'node: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

# Processes by PID (alive, start, stop, wait_for): shared with the other hack script.
# shellcheck source=hack/lib.sh
source "$ROOT/hack/lib.sh"

kc() { "$KUBECTL" --kubeconfig "$ADMIN_KUBECONFIG" "$@"; }

# write FILE < CONTENT: replace FILE only when the content differs (kube-proxy exits when its
# configuration file changes under it, so an idempotent `up` must not touch an equal file).
# write FILE [COMPONENT]: ... and a changed file restarts COMPONENT if it runs (re-read).
write() {
  local tmp="$1.tmp"
  cat >"$tmp"
  if cmp -s "$tmp" "$1"; then rm -f "$tmp"; return 0; fi
  mv "$tmp" "$1"
  if [[ -n "${2:-}" ]] && alive "$2"; then
    log "$(basename "$1") changed: restarting $2"
    stop "$2"
  fi
}

# --- install ----------------------------------------------------------------------------------

install() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    grep -q 'install ok installed' <<<"$(dpkg-query -W -f '${Status}' "$p" 2>/dev/null)" || missing+=("$p")
  done
  [[ ${#missing[@]} -eq 0 ]] && return
  [[ $(id -u) -eq 0 ]] || die "installing ${missing[*]} needs root"
  log "apt-get install ${missing[*]}"
  apt-get update -q >"$TOOLS_DIR/apt.log" 2>&1
  # policy-rc.d keeps the packages from starting system services of their own.
  local policy=/usr/sbin/policy-rc.d created=0
  if [[ ! -e $policy ]]; then printf '#!/bin/sh\nexit 101\n' >$policy; chmod +x $policy; created=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" \
    >>"$TOOLS_DIR/apt.log" 2>&1 || { [[ $created -eq 1 ]] && rm -f $policy; tail -20 "$TOOLS_DIR/apt.log" >&2; die "apt-get failed"; }
  [[ $created -eq 1 ]] && rm -f $policy
  return 0
}

# --- network ----------------------------------------------------------------------------------

net() {
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    log "created bridge $BRIDGE"
  fi
  local addrs
  addrs="$(ip -4 addr show dev "$BRIDGE")"
  [[ "$addrs" == *"inet $NODE_IP/"* ]] || ip addr add "$NODE_IP/16" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  # Pod traffic stays on this machine: nothing from the bridge is forwarded elsewhere (pods
  # reach each other over the bridge, the host and the API server directly), whatever else
  # turns IP forwarding on.
  iptables -w -N "$GUARD" 2>/dev/null || true
  iptables -w -F "$GUARD"
  iptables -w -A "$GUARD" -i "$BRIDGE" -o "$BRIDGE" -j RETURN
  iptables -w -A "$GUARD" -i "$BRIDGE" -j DROP
  iptables -w -A "$GUARD" -o "$BRIDGE" -j DROP
  iptables -w -C FORWARD -j "$GUARD" 2>/dev/null || iptables -w -I FORWARD 1 -j "$GUARD"
}

net_down() {
  if iptables -w -C FORWARD -j "$GUARD" 2>/dev/null; then iptables -w -D FORWARD -j "$GUARD"; fi
  iptables -w -F "$GUARD" 2>/dev/null || true
  iptables -w -X "$GUARD" 2>/dev/null || true
  if ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link del "$BRIDGE"
    log "removed bridge $BRIDGE"
  fi
}

# --- identities -------------------------------------------------------------------------------

cert() {  # cert NAME SUBJECT: a client key and certificate signed by the cluster CA
  local name="$1" subj="$2"
  [[ -f "$PKI/$name.crt" ]] && return
  openssl genrsa -out "$PKI/$name.key" 2048 2>/dev/null
  openssl req -new -key "$PKI/$name.key" -subj "$subj" -out "$PKI/$name.csr" 2>/dev/null
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' \
    >"$PKI/$name.ext"
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" \
    -CAcreateserial -days 3650 -sha256 -extfile "$PKI/$name.ext" -out "$PKI/$name.crt" 2>/dev/null
  rm -f "$PKI/$name.csr" "$PKI/$name.ext"
}

kubeconfig() {  # kubeconfig FILE CERT-NAME USER
  local file="$1" name="$2" user="$3"
  write "$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: sgdjob-local
  cluster:
    server: https://$NODE_IP:$APISERVER_PORT
    certificate-authority: $PKI/ca.crt
users:
- name: $user
  user:
    client-certificate: $PKI/$name.crt
    client-key: $PKI/$name.key
contexts:
- name: sgdjob-local
  context: {cluster: sgdjob-local, user: $user}
current-context: sgdjob-local
EOF
  chmod 0600 "$file"
}

identities() {
  [[ -f "$PKI/ca.key" ]] || die "no cluster CA in $PKI: run hack/cluster.sh up first"
  # The Node authorizer and NodeRestriction know a kubelet by this name and group.
  cert kubelet "/O=system:nodes/CN=system:node:$NODE_NAME"
  cert kube-proxy "/CN=system:kube-proxy"   # bound to system:node-proxier by default
  cert coredns "/CN=sgdjob:coredns"
  kubeconfig "$NODE_DIR/kubelet.kubeconfig" kubelet "system:node:$NODE_NAME"
  kubeconfig "$NODE_DIR/kube-proxy.kubeconfig" kube-proxy system:kube-proxy
  kubeconfig "$NODE_DIR/coredns.kubeconfig" coredns sgdjob:coredns
}

coredns_rbac() {
  kc apply -f - >/dev/null <<'EOF'
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "sgdjob:coredns"}
rules:
- apiGroups: [""]
  resources: [services, namespaces, endpoints, pods]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "sgdjob:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "sgdjob:coredns"}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: "sgdjob:coredns"}
EOF
}

# --- containerd -------------------------------------------------------------------------------

containerd_up() {
  local pause="$1"
  (( ${#CONTAINERD_SOCK} < 100 )) || die "socket path too long for a unix socket: $CONTAINERD_SOCK"
  mkdir -p "$CTRD_DIR/state" "$CTRD_ROOT" "$NODE_DIR/cni/net.d" "$NODE_DIR/cni/ipam"
  write "$NODE_DIR/cni/net.d/10-sgdjob.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "sgdjob",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": false,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$NODE_DIR/cni/ipam",
        "ranges": [[{"subnet": "$POD_CIDR", "rangeStart": "${NODE_IP%.*.*}.1.2", "gateway": "$NODE_IP"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    }
  ]
}
EOF
  # isGateway false: the bridge plugin would turn on IP forwarding; the bridge already holds
  # the gateway address (net), and the route above points the pods at it.
  write "$CTRD_DIR/config.toml" containerd <<EOF
version = 2
root = "$CTRD_ROOT"
state = "$CTRD_DIR/state"
[grpc]
  address = "$CONTAINERD_SOCK"
[ttrpc]
  address = "$CONTAINERD_SOCK.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$pause"
  # No CAP_SYS_RESOURCE here: a negative oom_score_adj would fail every container.
  restrict_oom_score_adj = true
  enable_selinux = false
  # Pod network namespaces under our state dir, not /run/netns: there, an "ip netns add" by
  # anyone else bind-mounts /run/netns over itself, hides the sandboxes' nsfs mounts, and
  # every sandbox removal then fails with EBUSY.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$CNI_BIN"
    conf_dir = "$NODE_DIR/cni/net.d"
    max_conf_num = 1
EOF
  start containerd containerd --config "$CTRD_DIR/config.toml"
  wait_for containerd 30 ctr --address "$CONTAINERD_SOCK" version
}

ctr_() { ctr --address "$CONTAINERD_SOCK" --namespace k8s.io "$@"; }

# Every container of this containerd, killed and removed; the network namespaces of its pod
# sandboxes unmounted. For `down` when the kubelet is gone (or would take too long).
containers_down() {
  [[ -S "$CONTAINERD_SOCK" ]] && alive containerd || return 0
  local ids id netns=()
  ids="$(ctr_ containers ls -q 2>/dev/null || true)"
  [[ -n "$ids" ]] || return 0
  for id in $ids; do
    # A pod sandbox's network namespace, as the CRI plugin made it (<state>/.../netns/cni-*).
    # shellcheck disable=SC2207  # paths without spaces, one a line
    netns+=($(ctr_ containers info "$id" 2>/dev/null | "$PYTHON" -c '
import json, sys
try:
    spec = json.load(sys.stdin)["Spec"]
except Exception:
    sys.exit(0)
for ns in spec.get("linux", {}).get("namespaces", []):
    if ns.get("type") == "network" and "/netns/cni-" in ns.get("path", ""):
        print(ns["path"])
' || true))
    ctr_ tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true
  done
  sleep 1
  for id in $ids; do
    ctr_ tasks delete -f "$id" >/dev/null 2>&1 || true
    ctr_ containers delete "$id" >/dev/null 2>&1 || true
  done
  local n
  for n in "${netns[@]}"; do
    [[ -e "$n" ]] || continue
    umount "$n" 2>/dev/null || true
    # Still busy if it was hidden under someone's bind mount of its directory: leave it.
    rm -f "$n" 2>/dev/null || log "cannot remove $n (still mounted elsewhere)"
  done
  log "removed $(wc -w <<<"$ids") container(s)"
}

# --- kubelet, kube-proxy, CoreDNS -------------------------------------------------------------

kubelet_up() {
  mkdir -p "$NODE_DIR/kubelet"
  write "$NODE_DIR/resolv.conf" </dev/null  # pods get only the cluster's DNS, no host search paths
  write "$NODE_DIR/kubelet.yaml" kubelet <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
cgroupDriver: cgroupfs
failSwapOn: false
# No CAP_SYS_RESOURCE: a negative oom_score_adj (the default -999) fails.
oomScoreAdj: 0
clusterDNS: [$NODE_IP]
clusterDomain: cluster.local
resolvConf: $NODE_DIR/resolv.conf
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization:
  mode: Webhook
rotateCertificates: false
serverTLSBootstrap: false
registerNode: true
maxPods: 110
podPidsLimit: -1
# A shared development machine: evict only when the disk is really full, and never delete
# the locally built images for space (they cannot be pulled again: a removed pause image
# stops every new pod).
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: 100Mi
  nodefs.available: 500Mi
  imagefs.available: 500Mi
  nodefs.inodesFree: 1%
evictionPressureTransitionPeriod: 10s
enforceNodeAllocatable: [pods]
syncFrequency: 10s
fileCheckFrequency: 10s
nodeStatusUpdateFrequency: 5s
shutdownGracePeriod: 0s
EOF
  start kubelet "$KUBE_BIN/kubelet" \
    --config "$NODE_DIR/kubelet.yaml" \
    --kubeconfig "$NODE_DIR/kubelet.kubeconfig" \
    --hostname-override "$NODE_NAME" --node-ip "$NODE_IP" \
    --root-dir "$NODE_DIR/kubelet" --cert-dir "$NODE_DIR/kubelet/pki" \
    --v 1
  wait_for "node $NODE_NAME Ready" 120 \
    kc wait --for condition=Ready --timeout 2s "node/$NODE_NAME"
}

kube_proxy_up() {
  write "$NODE_DIR/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: $NODE_DIR/kube-proxy.kubeconfig
mode: iptables
clusterCIDR: $POD_CIDR
hostnameOverride: $NODE_NAME
bindAddress: $NODE_IP
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: [$NODE_IP/32]
conntrack:
  maxPerCore: 0
EOF
  start kube-proxy "$KUBE_BIN/kube-proxy" --config "$NODE_DIR/kube-proxy.yaml"
  wait_for kube-proxy 60 curl -fsS http://127.0.0.1:10256/healthz
}

coredns_up() {
  coredns_rbac
  write "$NODE_DIR/Corefile" coredns <<EOF
cluster.local in-addr.arpa ip6.arpa {
    bind $NODE_IP
    errors
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $NODE_DIR/coredns.kubeconfig sgdjob-local
        pods disabled
        ttl 5
    }
    cache 5
}
. {
    bind $NODE_IP
    errors
    # Nothing leaves this machine: names outside the cluster do not exist for pods.
    template ANY ANY {
        rcode NXDOMAIN
    }
}
EOF
  start coredns "$COREDNS_BIN" -conf "$NODE_DIR/Corefile" -dns.port 53
  wait_for CoreDNS 30 "$PYTHON" - "$NODE_IP" <<'PY'
import socket, struct, sys
q = struct.pack(">HHHHHH", 1, 0x0100, 1, 0, 0, 0)
for label in "kubernetes.default.svc.cluster.local".split("."):
    q += bytes([len(label)]) + label.encode()
q += b"\x00" + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1)
s.sendto(q, (sys.argv[1], 53))
reply = s.recv(512)
sys.exit(0 if reply[3] & 0x0F == 0 and struct.unpack(">H", reply[6:8])[0] > 0 else 1)
PY
}

coredns_build() {
  [[ -x "$COREDNS_BIN" ]] && grep -q "${COREDNS_VERSION#v}" <<<"$("$COREDNS_BIN" -version 2>/dev/null)" && return
  command -v go >/dev/null || die "go is not installed: cannot build CoreDNS"
  log "building CoreDNS $COREDNS_VERSION from its Go module"
  mkdir -p "$(dirname "$COREDNS_BIN")"
  (cd "$TOOLS_DIR" && GOBIN="$(dirname "$COREDNS_BIN")" CGO_ENABLED=0 \
    go install -trimpath -ldflags '-s -w' "github.com/coredns/coredns@$COREDNS_VERSION")
}

# --- storage ----------------------------------------------------------------------------------

storage_up() {
  # `local` volumes (unlike hostPath) honour the pod's fsGroup, so a root-owned 0755 directory
  # becomes writable by the trainer's group. Pre-made, one per directory, bound on first use.
  mkdir -p "$VOLUMES"
  local i manifest="$NODE_DIR/volumes.yaml"
  {
    cat <<EOF
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: sgdjob-local
  annotations: {storageclass.kubernetes.io/is-default-class: "true"}
provisioner: kubernetes.io/no-provisioner
volumeBindingMode: WaitForFirstConsumer
reclaimPolicy: Retain
EOF
    for i in $(seq -w 1 "$PERSISTENT_VOLUMES"); do
      mkdir -p "$VOLUMES/pv-$i"
      chmod 0755 "$VOLUMES/pv-$i"
      cat <<EOF
---
apiVersion: v1
kind: PersistentVolume
metadata:
  name: sgdjob-local-$i
  labels: {sgdjob.dev/local-volume: "true"}
spec:
  capacity: {storage: 10Gi}
  accessModes: [ReadWriteOnce, ReadWriteMany]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: sgdjob-local
  volumeMode: Filesystem
  local: {path: $VOLUMES/pv-$i}
  nodeAffinity:
    required:
      nodeSelectorTerms:
      - matchExpressions:
        - {key: kubernetes.io/hostname, operator: In, values: [$NODE_NAME]}
EOF
    done
  } >"$manifest"
  kc apply -f "$manifest" >/dev/null
}

# --- up / down --------------------------------------------------------------------------------

up() {
  local t0=$SECONDS
  install
  mkdir -p "$RUN" "$LOGS" "$NODE_DIR"
  net
  PYTHON="$PYTHON" "$ROOT/hack/build-kube.sh" kubelet kube-proxy
  coredns_build
  identities
  eval "$(PYTHON="$PYTHON" "$ROOT/hack/images.sh" tags)"
  containerd_up "$PAUSE_IMAGE"
  PYTHON="$PYTHON" "$ROOT/hack/images.sh" pause >/dev/null
  kubelet_up
  kube_proxy_up
  coredns_up
  storage_up
  log "node $NODE_NAME up in $((SECONDS - t0)) s (pods on $POD_CIDR, DNS and API at $NODE_IP)"
}

unmount_under() {  # every mount point below DIR, deepest first
  local dir="$1" m
  [[ -d "$dir" ]] || return 0
  while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done < <(awk -v d="$dir/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r)
}

down() {
  mkdir -p "$RUN"
  stop coredns
  stop kubelet
  containers_down
  stop kube-proxy
  if [[ -x "$KUBE_BIN/kube-proxy" ]]; then "$KUBE_BIN/kube-proxy" --cleanup >/dev/null 2>&1 || true; fi
  stop containerd
  stop dockerd
  unmount_under "$CLUSTER_DIR"
  net_down
  rm -rf "$NODE_DIR" "$CTRD_DIR" "$VOLUMES"
  log "node down"
}

status() {
  local name
  for name in containerd kubelet kube-proxy coredns dockerd; do
    if alive "$name"; then
      echo "$name: running (pid $(cat "$RUN/$name.pid"))"
    else
      echo "$name: stopped"
    fi
  done
}

case "${1:-}" in
  install) install ;;
  net) mkdir -p "$RUN" "$LOGS"; net ;;
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 install|net|up|down|status" >&2; exit 2 ;;
esac
