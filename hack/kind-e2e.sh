#!/usr/bin/env bash
# Opt-in end-to-end test on a throw-away kind cluster (`make e2e-kind`). Needs docker, kind,
# kubectl and helm on PATH (or DOCKER/KIND/KUBECTL/HELM pointing at them). It:
#   1. creates a kind cluster,
#   2. builds the operator image and the CPU trainer image and `kind load`s both,
#   3. `helm install`s charts/sgdjob-operator with those images,
#   4. applies an example SGDJob (workers slowed down with spec.debug.slowWorkers so the run
#      lasts long enough to be interrupted),
#   5. deletes a worker pod mid-run and checks the operator restarted it (status.restarts >= 1),
#   6. waits for phase Succeeded and prints `kubectl get sgdj` and the job's status.
# The cluster is deleted on exit, success or not (KEEP_CLUSTER=1 keeps it for debugging);
# on failure the operator's logs and the job's pods are printed first.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

CLUSTER="${KIND_CLUSTER:-sgdjob-e2e}"
RELEASE="${RELEASE:-sgdjob}"
OPERATOR_NS="${OPERATOR_NAMESPACE:-sgdjob-system}"
JOB_NS="${JOB_NAMESPACE:-default}"
EXAMPLE="${EXAMPLE:-examples/digits-sync.yaml}"
TAG="${TAG:-e2e}"
OPERATOR_IMAGE="sgdjob/sgdjob-operator"
TRAINER_IMAGE="sgdjob/sgdjob"
SLOW_MS="${SLOW_MS:-100}"          # extra ms per step for workers 0 and 1
TIMEOUT_S="${TIMEOUT_S:-900}"      # for the whole job to succeed
KEEP_CLUSTER="${KEEP_CLUSTER:-0}"
DOCKER="${DOCKER:-docker}"
KIND="${KIND:-kind}"
KUBECTL="${KUBECTL:-kubectl}"
HELM="${HELM:-helm}"

log() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'kind-e2e: FAILED: %s\n' "$*" >&2; exit 1; }

for tool in "$DOCKER" "$KIND" "$KUBECTL" "$HELM"; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is not installed"
done
[[ -f "$EXAMPLE" ]] || die "no example $EXAMPLE"
JOB="$(sed -n 's/^  name: *//p' "$EXAMPLE" | head -n 1)"
[[ -n "$JOB" ]] || die "cannot read metadata.name from $EXAMPLE"

CREATED=0
cleanup() {
  local status=$?
  if [[ $status -ne 0 && $CREATED -eq 1 ]]; then
    log "diagnostics (exit $status)"
    "$KUBECTL" get sgdj,pods -A -o wide || true
    "$KUBECTL" -n "$JOB_NS" describe sgdj "$JOB" || true
    "$KUBECTL" -n "$OPERATOR_NS" logs deploy/"$RELEASE"-sgdjob-operator --tail=200 || true
    "$KUBECTL" -n "$JOB_NS" logs -l sgdjob.dev/job="$JOB" --tail=50 --prefix || true
  fi
  if [[ $CREATED -eq 1 && "$KEEP_CLUSTER" != 1 ]]; then
    log "deleting kind cluster $CLUSTER"
    "$KIND" delete cluster --name "$CLUSTER" || true
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "creating kind cluster $CLUSTER"
"$KIND" create cluster --name "$CLUSTER" --wait 180s
CREATED=1
KCTX=(--context "kind-$CLUSTER")
kc() { "$KUBECTL" "${KCTX[@]}" "$@"; }

log "building images (trainer: CPU variant)"
"$DOCKER" build -f operator/Dockerfile -t "$OPERATOR_IMAGE:$TAG" .
"$DOCKER" build -f trainer/Dockerfile --build-arg VARIANT=cpu -t "$TRAINER_IMAGE:$TAG" .
"$KIND" load docker-image --name "$CLUSTER" "$OPERATOR_IMAGE:$TAG" "$TRAINER_IMAGE:$TAG"

log "installing the chart"
"$HELM" --kube-context "kind-$CLUSTER" install "$RELEASE" charts/sgdjob-operator \
  --namespace "$OPERATOR_NS" --create-namespace \
  --set image.repository="$OPERATOR_IMAGE" --set image.tag="$TAG" \
  --set image.pullPolicy=Never \
  --set trainerImage.repository="$TRAINER_IMAGE" --set trainerImage.tag="$TAG" \
  --wait --timeout 5m
kc wait --for condition=established --timeout 60s crd/sgdjobs.sgdjob.dev

log "applying $EXAMPLE (workers 0 and 1 slowed by ${SLOW_MS} ms a step)"
kc -n "$JOB_NS" patch --local -f "$EXAMPLE" --type merge -o yaml \
  -p "{\"spec\":{\"debug\":{\"slowWorkers\":{\"0\":$SLOW_MS,\"1\":$SLOW_MS}}}}" \
  | kc -n "$JOB_NS" apply -f -

field() { kc -n "$JOB_NS" get sgdj "$JOB" -o "jsonpath={.status.$1}" 2>/dev/null || true; }

wait_for() {  # wait_for DESCRIPTION SECONDS COMMAND...: poll until COMMAND succeeds
  local what="$1" limit="$2"
  shift 2
  local deadline=$((SECONDS + limit))
  until "$@"; do
    [[ "$(field phase)" == Failed ]] && die "job $JOB failed: $(field message)"
    ((SECONDS < deadline)) || die "timed out after ${limit}s waiting for $what"
    sleep 2
  done
}

running_with_progress() { [[ "$(field phase)" == Running && "$(field step)" -ge 10 ]]; }
restarted() { [[ "$(field restarts)" -ge 1 ]]; }
succeeded() { [[ "$(field phase)" == Succeeded ]]; }

wait_for "the job to run and make progress" 600 running_with_progress
VICTIM="$JOB-worker-1"
OLD_UID="$(kc -n "$JOB_NS" get pod "$VICTIM" -o 'jsonpath={.metadata.uid}')"
log "killing $VICTIM at step $(field step)"
kc -n "$JOB_NS" delete pod "$VICTIM" --wait=false
recreated() {
  local uid
  uid="$(kc -n "$JOB_NS" get pod "$VICTIM" -o 'jsonpath={.metadata.uid}' 2>/dev/null || true)"
  [[ -n "$uid" && "$uid" != "$OLD_UID" ]]
}
wait_for "the operator to recreate $VICTIM" 300 recreated
wait_for "status.restarts to count the restart" 300 restarted

wait_for "phase Succeeded" "$TIMEOUT_S" succeeded

log "kubectl get sgdj"
kc -n "$JOB_NS" get sgdj -o wide
log "status of $JOB"
kc -n "$JOB_NS" get sgdj "$JOB" -o jsonpath='{.status}'
echo
RESTARTS="$(field restarts)"
[[ "$RESTARTS" -ge 1 ]] || die "expected status.restarts >= 1, got $RESTARTS"
log "PASSED: $JOB succeeded with $RESTARTS restart(s)"
