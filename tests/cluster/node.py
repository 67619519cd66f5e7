"""What the real-pod tests do to the local cluster: kubectl, the node's containerd, the claims.

Everything goes through the real tools a user has: ``kubectl`` with the admin kubeconfig, and
``ctr`` against the node's containerd for what only the host can do (kill a container's
process with SIGKILL).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tests.kube_cluster import CHART_NAMESPACE, KubeCluster

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
CLUSTER_DIR = ROOT / ".tools" / "cluster"
CONTAINERD_SOCK = CLUSTER_DIR / "containerd" / "containerd.sock"
NODE_NAME = "sgdjob-node"
OPERATOR = "deploy/sgdjob-sgdjob-operator"
STORAGE_CLASS = "sgdjob-local"
# Generous: a 2-core machine shared with other work runs 4-5 torch processes per job.
JOB_TIMEOUT_S = 900.0

T = TypeVar("T")


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, recursively for mappings (a copy)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def example(name: str, **spec: Any) -> dict[str, Any]:
    """An SGDJob from examples/, with ``spec`` merged into its spec."""
    doc = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    doc["spec"] = merge(doc["spec"], spec)
    return dict(doc)


class Node:
    """The local cluster with its node, as the tests drive it."""

    def __init__(self, cluster: KubeCluster) -> None:
        self.cluster = cluster

    # --- kubectl ----------------------------------------------------------------------------

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        return self.cluster.kubectl(*args, input=input, check=check)

    def get(self, ns: str, kind: str, name: str = "") -> dict[str, Any]:
        args = ["-n", ns, "get", kind, *([name] if name else []), "-o", "json"]
        return dict(json.loads(self.kubectl(*args)))

    def why_not_ready(self) -> str:
        """Why this cluster cannot run pods, or "" when it can."""
        if not CONTAINERD_SOCK.exists():
            return (
                "the local cluster has no node (hack/node.sh needs root on Linux and runs "
                "unless CLUSTER_NODE=0)"
            )
        out = self.kubectl("get", "node", NODE_NAME, "-o", "json", check=False)
        try:
            conditions = json.loads(out)["status"]["conditions"]
        except (ValueError, KeyError):
            return f"node {NODE_NAME} is not registered: {out.strip()[:300]}"
        ready = [c for c in conditions if c["type"] == "Ready"]
        if not ready or ready[0]["status"] != "True":
            return f"node {NODE_NAME} is not Ready: {ready}"
        return ""

    def scale_operator(self, replicas: int) -> None:
        self.kubectl("-n", CHART_NAMESPACE, "scale", OPERATOR, f"--replicas={replicas}")
        if replicas > 0:
            self.kubectl("-n", CHART_NAMESPACE, "rollout", "status", OPERATOR, "--timeout=300s")
        else:
            self.wait(
                lambda: not self.operator_pods(),
                what="the operator pod to go away",
                timeout=120,
            )

    def operator_pods(self) -> list[dict[str, Any]]:
        items = self.get(CHART_NAMESPACE, "pods")["items"]
        return [p for p in items if p["metadata"]["name"].startswith("sgdjob-sgdjob-operator-")]

    def apply(self, ns: str, doc: dict[str, Any]) -> None:
        self.kubectl("-n", ns, "apply", "-f", "-", input=yaml.safe_dump(doc))

    def apply_file(self, ns: str, path: Path) -> None:
        self.kubectl("-n", ns, "apply", "-f", str(path))

    def status(self, ns: str, job: str) -> dict[str, Any]:
        out = self.kubectl("-n", ns, "get", "sgdj", job, "-o", "json", check=False)
        try:
            return dict(json.loads(out).get("status") or {})
        except ValueError:
            return {}

    def pods(self, ns: str) -> dict[str, dict[str, Any]]:
        return {p["metadata"]["name"]: p for p in self.get(ns, "pods")["items"]}

    def events(self, ns: str) -> list[dict[str, Any]]:
        return list(self.get(ns, "events")["items"])

    # --- waiting ----------------------------------------------------------------------------

    def wait(
        self,
        probe: Callable[[], T | bool | None],
        *,
        what: str,
        timeout: float = JOB_TIMEOUT_S,
        diagnose: Callable[[], str] | None = None,
    ) -> T:
        deadline = time.monotonic() + timeout
        while True:
            got = probe()
            if got:
                return got  # type: ignore[return-value]
            if time.monotonic() > deadline:
                extra = diagnose() if diagnose else ""
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{extra}")
            time.sleep(2)

    def diagnose(self, ns: str) -> str:
        parts = [
            self.kubectl("-n", ns, "get", "sgdj,pods", "-o", "wide", check=False),
            self.kubectl("-n", ns, "get", "sgdj", "-o", "jsonpath={.items[*].status}", check=False),
            self.kubectl("-n", ns, "get", "events", check=False)[-3000:],
            self.kubectl("-n", CHART_NAMESPACE, "logs", OPERATOR, "--tail=40", check=False)[-4000:],
        ]
        return "\n".join(parts)

    def wait_phase(self, ns: str, job: str, phase: str, *, timeout: float = JOB_TIMEOUT_S) -> Any:
        def probe() -> dict[str, Any] | None:
            st = self.status(ns, job)
            if st.get("phase") == "Failed" and phase != "Failed":
                raise AssertionError(f"{job} failed: {st.get('message')}\n{self.diagnose(ns)}")
            return st if st.get("phase") == phase else None

        return self.wait(
            probe, what=f"{ns}/{job} {phase}", timeout=timeout, diagnose=lambda: self.diagnose(ns)
        )

    # --- the host side ----------------------------------------------------------------------

    def ctr(self, *args: str) -> str:
        proc = subprocess.run(
            ["ctr", "--address", str(CONTAINERD_SOCK), "--namespace", "k8s.io", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def container_pid(self, ns: str, pod: str) -> int:
        """The host PID of the pod's trainer process (its container's init)."""
        body = self.get(ns, "pod", pod)
        (cs,) = body["status"]["containerStatuses"]
        cid = cs["containerID"].split("://", 1)[1]
        for line in self.ctr("tasks", "ls").splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == cid:
                return int(fields[1])
        raise AssertionError(f"no running task for {pod} ({cid})")

    def kill9(self, ns: str, pod: str) -> None:
        os.kill(self.container_pid(ns, pod), signal.SIGKILL)

    # --- claims -----------------------------------------------------------------------------

    def claim(self, ns: str, name: str, *, mode: str = "ReadWriteOnce") -> None:
        self.apply(
            ns,
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": name},
                "spec": {
                    "accessModes": [mode],
                    "storageClassName": STORAGE_CLASS,
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            },
        )

    def claim_dir(self, ns: str, name: str) -> Path:
        """The host directory behind a bound claim (a local PersistentVolume)."""
        pvc = self.get(ns, "pvc", name)
        volume = pvc["spec"].get("volumeName")
        assert volume, f"claim {name} is not bound"
        pv = self.get("default", "pv", volume)
        return Path(pv["spec"]["local"]["path"])
