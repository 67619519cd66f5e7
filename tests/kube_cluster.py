"""The real local cluster for tests: brought up once per session, a fresh namespace per test.

``hack/cluster.sh up`` starts etcd, kube-apiserver, kube-controller-manager and kube-scheduler
(built from the k8s.io/kubernetes module, cached in .tools/) and installs the chart. A session
that found the cluster already up (``make cluster-up``) leaves it running; one that started it
stops it again. Without Go and without cached binaries the suite skips, saying why; under
``CI=true`` a cluster that cannot start fails the run instead.

The operator under test runs in the test's event loop with the chart's own identity: a
TokenRequest token of the chart's ServiceAccount, in a file (so a test can rotate it), so every
call it makes is checked against the chart's RBAC.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / ".tools"
KUBECONFIG = TOOLS / "cluster" / "kubeconfig"
KUBECTL = TOOLS / "bin" / "kubectl"
HELM = TOOLS / "bin" / "helm4"
CHART_NAMESPACE = "sgdjob-system"
CHART_SA = "sgdjob-sgdjob-operator"  # <release>-<chart>, the chart's fullname


@dataclass
class KubeCluster:
    """A running control plane: its kubeconfig, an admin client and the chart's identity."""

    kubeconfig: Path
    server: str
    ca_path: Path
    api: Any  # kubernetes.client.ApiClient, admin

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> str:
        proc = subprocess.run(
            [str(KUBECTL), "--kubeconfig", str(self.kubeconfig), *args],
            capture_output=True,
            text=True,
            input=input,
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout + proc.stderr if not check else proc.stdout

    def operator_token(self, *, bound_secret: str | None = None, seconds: int = 3600) -> str:
        """A token of the chart's ServiceAccount (TokenRequest), optionally bound to a Secret
        so that deleting the Secret revokes it."""
        from kubernetes import client as k8s

        core = k8s.CoreV1Api(self.api)
        bound = None
        if bound_secret is not None:
            secret = core.create_namespaced_secret(
                CHART_NAMESPACE, k8s.V1Secret(metadata=k8s.V1ObjectMeta(name=bound_secret))
            )
            assert secret.metadata is not None
            bound = k8s.V1BoundObjectReference(
                kind="Secret", api_version="v1", name=bound_secret, uid=secret.metadata.uid
            )
        spec = k8s.V1TokenRequestSpec(
            audiences=[], expiration_seconds=seconds, bound_object_ref=bound
        )
        got = core.create_namespaced_service_account_token(
            CHART_SA, CHART_NAMESPACE, k8s.AuthenticationV1TokenRequest(spec=spec)
        )
        assert got.status is not None
        return str(got.status.token)


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"the local cluster is required in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def _cluster_sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(ROOT / "hack" / "cluster.sh"), *args],
        capture_output=True,
        text=True,
        timeout=3600,
    )


def _healthy() -> bool:
    if not (KUBECONFIG.exists() and KUBECTL.exists()):
        return False
    proc = subprocess.run(
        [str(KUBECTL), "--kubeconfig", str(KUBECONFIG), "get", "--raw", "/readyz"],
        capture_output=True,
        timeout=30,
    )
    return proc.returncode == 0


def _have_binaries() -> bool:
    return any((TOOLS / "kube").glob("*/bin/kube-apiserver"))


@pytest.fixture(scope="session")
def kube_cluster() -> Iterator[KubeCluster]:
    """The local cluster, up for the whole session (see the module docstring)."""
    started = False
    if _healthy():
        # Up already (make cluster-up): re-apply the chart, so the CRD and RBAC under test are
        # this tree's (idempotent, seconds).
        proc = _cluster_sh("up")
        if proc.returncode != 0:
            _skip_or_fail(f"hack/cluster.sh up failed: {proc.stderr.strip()[-2000:]}")
    else:
        if shutil.which("go") is None and not _have_binaries():
            _skip_or_fail("no Go toolchain to build kube-apiserver (hack/build-kube.sh needs go)")
        if not (KUBECTL.exists() and HELM.exists()):
            _skip_or_fail("kubectl/helm missing in .tools/bin (make tools)")
        proc = _cluster_sh("up")
        if proc.returncode != 0:
            _skip_or_fail(f"hack/cluster.sh up failed: {proc.stderr.strip()[-2000:]}")
        started = True
    from kubernetes import client as k8s
    from kubernetes import config as k8s_config

    cfg = k8s.Configuration()
    k8s_config.load_kube_config(config_file=str(KUBECONFIG), client_configuration=cfg)
    ca = Path(tempfile.mkdtemp(prefix="sgdjob-ca-")) / "ca.crt"
    assert cfg.ssl_ca_cert is not None, "the kubeconfig names no CA"
    with open(cfg.ssl_ca_cert, "rb") as src:
        ca.write_bytes(src.read())
    api = k8s.ApiClient(cfg)
    try:
        yield KubeCluster(kubeconfig=KUBECONFIG, server=cfg.host, ca_path=ca, api=api)
    finally:
        api.close()
        if started and os.environ.get("SGDJOB_KEEP_CLUSTER") != "1":
            _cluster_sh("down")


def new_namespace(cluster: KubeCluster, *, labels: dict[str, str] | None = None) -> str:
    from kubernetes import client as k8s

    name = f"t-{uuid.uuid4().hex[:10]}"
    k8s.CoreV1Api(cluster.api).create_namespace(
        k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name, labels=labels or {}))
    )
    return name


def delete_namespace(cluster: KubeCluster, name: str) -> None:
    from kubernetes import client as k8s
    from kubernetes.client.exceptions import ApiException

    try:
        k8s.CoreV1Api(cluster.api).delete_namespace(name)
    except ApiException as err:
        if err.status != 404:
            raise


def kubeconfig_for_token(cluster: KubeCluster, token: str, path: Path) -> Path:
    """A kubeconfig that logs in with ``token`` (for kubectl as the operator)."""
    ca = base64.b64encode(cluster.ca_path.read_bytes()).decode()
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: c, cluster: {{server: '{cluster.server}', "
        f"certificate-authority-data: {ca}}}}}]\n"
        f"users: [{{name: u, user: {{token: '{token}'}}}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u}}]\ncurrent-context: c\n"
    )
    return path
