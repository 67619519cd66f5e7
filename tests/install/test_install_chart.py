"""The Helm chart: real `helm lint`/`helm template` (Helm 4 and 3), manifests valid for
Kubernetes, and the properties the chart promises (least privilege, one hardened replica)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml
from install_support import (
    ALL_ON_VALUES,
    CHART,
    CRD_PATH,
    HELMS,
    helm_template,
    load_yaml,
    module,
    run,
    tool,
)

VALUES = {"default": [], "all-on": ["--values", str(ALL_ON_VALUES)]}
CLUSTER_WIDE_ONLY = {"namespaces"}


def _by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = _by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def rendered() -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Every (helm, values) rendering, once per test module."""
    return {(h, v): helm_template(h, *args) for h in HELMS for v, args in VALUES.items()}


@pytest.mark.parametrize("helm", HELMS)
def test_the_helm_binary_is_the_pinned_version(helm: str) -> None:
    result = run([tool(helm), "version", "--short"])
    assert result.stdout.startswith(HELMS[helm]), result.stdout


@pytest.mark.parametrize("values", VALUES)
@pytest.mark.parametrize("helm", HELMS)
def test_helm_lint_passes_strictly(helm: str, values: str) -> None:
    result = run([tool(helm), "lint", "--strict", CHART, *VALUES[values]])
    assert result.returncode == 0, result.stdout + result.stderr


def test_helm_3_and_helm_4_render_the_same_manifests(rendered: dict[Any, Any]) -> None:
    for values in VALUES:
        assert rendered["helm3", values] == rendered["helm4", values]


def _kubernetes_versions() -> list[str]:
    """The chart's minimum Kubernetes (Chart.yaml kubeVersion) and the newest schemas shipped."""
    floor = re.match(r">=\s*(\d+\.\d+)", load_yaml(CHART / "Chart.yaml")["kubeVersion"])
    assert floor, "Chart.yaml kubeVersion must read >=MAJOR.MINOR"
    try:
        import kubernetes_validate
    except ImportError:
        return [floor.group(1)]
    return [floor.group(1), kubernetes_validate.latest_version()]


@pytest.mark.parametrize("kubernetes", _kubernetes_versions())
@pytest.mark.parametrize("values", VALUES)
def test_every_rendered_manifest_is_valid_for_the_oldest_and_newest_kubernetes(
    rendered: dict[Any, Any], values: str, kubernetes: str
) -> None:
    kubernetes_validate = module("kubernetes_validate")
    for doc in rendered["helm4", values]:
        kubernetes_validate.validate(doc, kubernetes, strict=True)


def test_the_chart_crd_is_the_generated_crd_plus_release_labels(rendered: dict[Any, Any]) -> None:
    crd = _one(rendered["helm4", "default"], "CustomResourceDefinition")
    generated = load_yaml(CRD_PATH)
    meta = crd["metadata"]
    assert meta["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    # Helm's fromYaml reads numbers as float64; compare values, not their spelling.
    as_floats = yaml.safe_load(yaml.safe_dump(generated).replace("\n", "\n"))
    assert _normalise(crd["spec"]) == _normalise(as_floats["spec"])
    assert (
        "annotations"
        not in _one(rendered["helm4", "all-on"], "CustomResourceDefinition")["metadata"]
    )


def _normalise(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _normalise(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_normalise(v) for v in node]
    if isinstance(node, int | float) and not isinstance(node, bool):
        return float(node)
    if isinstance(node, str) and re.fullmatch(r"-?[0-9.]+e[-+]?[0-9]+", node):
        # Helm writes 1e-08, a float to Go's YAML but a string to PyYAML's YAML 1.1.
        return float(node)
    return node


def test_the_crd_can_be_left_out() -> None:
    docs = helm_template("helm4", "--set", "crds.enabled=false")
    assert not _by_kind(docs, "CustomResourceDefinition")


def test_the_operator_runs_as_one_hardened_replica(rendered: dict[Any, Any]) -> None:
    for values in VALUES:
        deployment = _one(rendered["helm4", values], "Deployment")
        spec = deployment["spec"]
        assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
        pod = spec["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        (container,) = pod["containers"]
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert container["resources"]["requests"] and container["resources"]["limits"]
        probe = container["livenessProbe"]["httpGet"]
        assert probe["path"] == "/healthz"
        health = {p["name"]: p["containerPort"] for p in container["ports"]}["health"]
        assert f"--liveness=http://0.0.0.0:{health}/healthz" in container["args"]
        assert container["command"] == ["sgdjob"] and "operator" in container["args"]


def test_operator_flags_follow_the_values(rendered: dict[Any, Any]) -> None:
    default = _one(rendered["helm4", "default"], "Deployment")
    args = default["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--cluster-domain=cluster.local" in args
    assert "--trainer-image=ghcr.io/sgdjob/sgdjob:0.1.0" in args
    assert not [a for a in args if a.startswith("--namespace")]
    all_on = _one(rendered["helm4", "all-on"], "Deployment")
    args = all_on["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=ml-team-a" in args and "--namespace=ml-team-b" in args
    assert "--cluster-domain=cluster.example" in args and "--metrics-port=0" in args
    assert "--trainer-image=registry.example/sgdjob/sgdjob:0.1.0-cpu" in args


def _rules(role: dict[str, Any]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault(f"{group}/{resource}", set()).update(rule["verbs"])
    return out


# A snapshot of the chart's rules, so a change to them is a visible diff. That these are enough
# is shown on the real API server (tests/operator/test_api_server.py runs every operator
# scenario with only the chart's RBAC, and shows that one verb less fails a job visibly).
NAMESPACED_NEEDS = {
    "sgdjob.dev/sgdjobs": {"get", "list", "watch", "patch", "delete"},
    "sgdjob.dev/sgdjobs/finalizers": {"update"},
    "sgdjob.dev/sgdjobs/status": {"get", "patch"},
    "/pods": {"get", "list", "watch", "create", "delete", "patch"},
    "/services": {"get", "list", "watch", "create", "delete"},
    "/configmaps": {"get", "list", "watch", "create", "delete"},
    "/secrets": {"get", "list", "watch", "create", "delete"},
    "/events": {"create", "patch"},
}
KOPF_CLUSTER_NEEDS = {"apiextensions.k8s.io/customresourcedefinitions": {"list", "watch"}}


def test_cluster_wide_rbac_is_exactly_what_the_operator_needs(rendered: dict[Any, Any]) -> None:
    docs = rendered["helm4", "default"]
    assert not _by_kind(docs, "Role")
    rules = _rules(_one(docs, "ClusterRole"))
    assert rules == {**NAMESPACED_NEEDS, **KOPF_CLUSTER_NEEDS, "/namespaces": {"list", "watch"}}


def test_namespaced_rbac_gives_a_role_per_namespace_and_nothing_cluster_wide(
    rendered: dict[Any, Any],
) -> None:
    docs = rendered["helm4", "all-on"]
    assert _rules(_one(docs, "ClusterRole")) == KOPF_CLUSTER_NEEDS
    roles = {r["metadata"]["namespace"]: r for r in _by_kind(docs, "Role")}
    assert set(roles) == {"ml-team-a", "ml-team-b"}
    for role in roles.values():
        assert _rules(role) == NAMESPACED_NEEDS
    bindings = {b["metadata"]["namespace"] for b in _by_kind(docs, "RoleBinding")}
    assert bindings == set(roles)


def test_every_rbac_rule_is_justified_by_a_comment() -> None:
    lines = (CHART / "templates" / "rbac.yaml").read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("- apiGroups:"):
            assert lines[i - 1].strip().startswith("#"), f"rbac.yaml:{i + 1} has no comment"


def test_network_policies_exist_only_when_enabled(rendered: dict[Any, Any]) -> None:
    assert not _by_kind(rendered["helm4", "default"], "NetworkPolicy")
    policies = _by_kind(rendered["helm4", "all-on"], "NetworkPolicy")
    assert {
        (p["metadata"]["namespace"], p["metadata"]["name"].rsplit("-", 1)[1]) for p in policies
    } == {(ns, role) for ns in ("ml-team-a", "ml-team-b") for role in ("shards", "workers")}
    for policy in policies:
        spec = policy["spec"]
        if spec["podSelector"]["matchLabels"]["sgdjob.dev/role"] == "worker":
            assert spec["ingress"] == []
            continue
        ports = {p["port"] for rule in spec["ingress"] for p in rule["ports"]}
        assert ports == {"zmq", "status"}
    cluster_wide = helm_template("helm4", "--set", "networkPolicy.enabled=true")
    namespaces = {p["metadata"]["namespace"] for p in _by_kind(cluster_wide, "NetworkPolicy")}
    assert namespaces == {"sgdjob-system"}


def test_every_value_is_documented_helm_docs_style() -> None:
    """Each key has a `# --` comment, on itself or on the map that holds it."""
    lines = (CHART / "values.yaml").read_text(encoding="utf-8").splitlines()
    undocumented = []
    documented: list[tuple[int, bool]] = []  # (indent, has `# --`) of the open ancestors
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][\w./-]*):(.*)$", line)
        if not match:
            continue
        indent = len(match.group(1))
        while documented and documented[-1][0] >= indent:
            documented.pop()
        j = i - 1
        while (
            j >= 0 and lines[j].strip().startswith("#") and not lines[j].strip().startswith("# --")
        ):
            j -= 1
        own = j >= 0 and lines[j].strip().startswith("# --")
        inherited = any(doc for _, doc in documented)
        is_leaf = bool(match.group(3).strip())
        if is_leaf and not (own or inherited):
            undocumented.append(f"values.yaml:{i + 1}: {match.group(2)}")
        documented.append((indent, own))
    assert not undocumented, "\n".join(undocumented)
    values = load_yaml(CHART / "values.yaml")
    assert values["watchNamespaces"] == [] and values["clusterDomain"] == "cluster.local"


def test_rbac_and_the_service_account_can_be_brought_by_the_user() -> None:
    docs = helm_template(
        "helm4",
        "--set",
        "rbac.create=false",
        "--set",
        "serviceAccount.create=false",
        "--set",
        "serviceAccount.name=existing",
    )
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role"}
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "existing"
