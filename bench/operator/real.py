"""Operator benchmark on the real local API server (hack/cluster.sh): `python -m bench.operator`.

The operator runs as its own process (`sgdjob operator`), logged in with a TokenRequest token
of the chart's ServiceAccount, exactly as the chart's RBAC allows. Measured:

- the median time from `kubectl apply -f job.yaml` (2 shards, 4 workers) to all 9 children
  existing on the server (polled every 50 ms), over a few repetitions;
- the same for N jobs (1 shard, 1 worker) in one `kubectl apply`, until all N x 5 children
  exist (polled every 0.5 s);
- the operator process's peak RSS (VmHWM) and its own API requests per job (its
  ``sgdjob_operator_api_requests_total``; Kopf's watches and finalizer patches come on top).

There is no kubelet here: pods stay Pending, which is what a creation benchmark needs.
"""

from __future__ import annotations

import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBECONFIG = ROOT / ".tools" / "cluster" / "kubeconfig"
KUBECTL = ROOT / ".tools" / "bin" / "kubectl"
CHART_NAMESPACE, CHART_SA = "sgdjob-system", "sgdjob-sgdjob-operator"


def kubectl(*args: str, input: str | None = None, kubeconfig: Path = KUBECONFIG) -> str:
    proc = subprocess.run(
        [str(KUBECTL), "--kubeconfig", str(kubeconfig), *args],
        capture_output=True,
        text=True,
        input=input,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args[:3])}: {proc.stderr.strip()}")
    return proc.stdout


def ensure_cluster() -> None:
    ok = KUBECONFIG.exists() and subprocess.run(
        [str(KUBECTL), "--kubeconfig", str(KUBECONFIG), "get", "--raw", "/readyz"],
        capture_output=True,
    ).returncode == 0  # fmt: skip
    if not ok:
        subprocess.run(["bash", str(ROOT / "hack" / "cluster.sh"), "up"], check=True)


def job_doc(name: str, ns: str, shards: int, workers: int) -> dict[str, Any]:
    return {
        "apiVersion": "sgdjob.dev/v1alpha1",
        "kind": "SGDJob",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "model": {"builtin": "mlp"},
            "data": {"builtin": "digits"},
            "training": {"maxSteps": 100},
            "parameterServers": {"shards": shards},
            "workers": {"replicas": workers},
        },
    }


def count_children(ns: str) -> int:
    out = kubectl("-n", ns, "get", "pods,configmaps,secrets,services", "-o", "name")
    return sum(1 for line in out.splitlines() if line and "kube-root-ca.crt" not in line)


def operator_kubeconfig(work: Path) -> Path:
    token = kubectl("-n", CHART_NAMESPACE, "create", "token", CHART_SA, "--duration", "2h")
    admin = yaml.safe_load(KUBECONFIG.read_text())
    cluster = admin["clusters"][0]["cluster"]
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "operator", "user": {"token": token.strip()}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "operator"}}],
        "current-context": "c",
    }
    path = work / "operator.kubeconfig"
    path.write_text(yaml.safe_dump(doc))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_for(ns: str, expected: int, *, every: float, deadline: float) -> float | None:
    while time.monotonic() < deadline:
        if count_children(ns) >= expected:
            return time.monotonic()
        time.sleep(every)
    return None


def run_real(jobs: int, repeats: int, budget: float) -> str:
    ensure_cluster()
    deadline = time.monotonic() + budget
    ns = f"bench-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", ns)
    work = Path(tempfile.mkdtemp(prefix="sgdjob-bench-"))
    port = free_port()
    env = {**os.environ, "KUBECONFIG": str(operator_kubeconfig(work))}
    sgdjob = str(Path(sys.executable).parent / "sgdjob")
    log = (work / "operator.log").open("w")
    op = subprocess.Popen(
        [sgdjob, "operator", "--namespace", ns, "--metrics-port", str(port),
         "--metrics-host", "127.0.0.1"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        time.sleep(3)  # Kopf's start-up: CRD scan and the first watch
        lat: list[float] = []
        for i in range(repeats):
            base = count_children(ns)
            doc = yaml.safe_dump(job_doc(f"lat-{i}", ns, 2, 4))
            t0 = time.monotonic()
            kubectl("apply", "-f", "-", input=doc)
            t1 = wait_for(ns, base + 9, every=0.05, deadline=deadline)
            if t1 is not None:
                lat.append(t1 - t0)
        requests_before = scrape(port, "sgdjob_operator_api_requests_total")
        base = count_children(ns)
        docs = "---\n".join(yaml.safe_dump(job_doc(f"job-{i:04d}", ns, 1, 1)) for i in range(jobs))
        t0 = time.monotonic()
        kubectl("apply", "-f", "-", input=docs)
        t_apply = time.monotonic() - t0
        # The wait gets its own budget: a slow apply must not eat it.
        t_all = wait_for(ns, base + jobs * 5, every=0.5, deadline=time.monotonic() + budget)
        time.sleep(2)  # let passes that follow creation (status writes) settle into the count
        per_job = (scrape(port, "sgdjob_operator_api_requests_total") - requests_before) / jobs
        rss = vm_hwm_mib(op.pid)
    finally:
        op.terminate()
        op.wait(timeout=60)
        log.close()
        kubectl("delete", "namespace", ns, "--wait=false")
    rows = [
        (
            "one job (2 shards, 4 workers): `kubectl apply` → 9 children, median",
            f"{statistics.median(lat) * 1000:.0f} ms" if lat else "not reached",
        ),
        (f"one job: max of {len(lat)}", f"{max(lat) * 1000:.0f} ms" if lat else "not reached"),
        (f"{jobs} jobs in one `kubectl apply` (the apply itself)", f"{t_apply:.1f} s"),
        (
            f"{jobs} jobs: `kubectl apply` → all {jobs * 5} children exist",
            "not reached before --deadline" if t_all is None else f"{t_all - t0:.1f} s",
        ),
        ("operator's own API requests per job (creation and status)", f"{per_job:.1f}"),
        ("operator process peak RSS (VmHWM)", f"{rss:.0f} MiB"),
    ]
    version = json.loads(kubectl("version", "-o", "json"))["serverVersion"]["gitVersion"]
    lines = [
        "# Operator on the real API server",
        "",
        f"kube-apiserver {version} with etcd on this machine ({os.cpu_count()} CPUs, shared with "
        "the control plane and kubectl); the operator as its own process with the chart's RBAC.",
        "",
        "| measure | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
    ]
    return "\n".join(lines)
