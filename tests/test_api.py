import pytest

from sgdjob.api.validation import SpecError, parse_job, parse_job_text, validate_spec
from tests.conftest import job_doc


def paths_of(doc: dict) -> list[str]:
    with pytest.raises(SpecError) as err:
        parse_job(doc)
    return err.value.paths


def test_a_valid_job_parses_with_defaults() -> None:
    job = parse_job(job_doc())
    assert job.spec.training.mode == "sync"
    assert job.spec.compression.kind == "none"


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        ({"training": {"lr": -1}}, "spec.training.lr"),
        ({"training": {"bogus": 1}}, "spec.training.bogus"),
        ({"workers": {"replicas": 0}}, "spec.workers.replicas"),
        ({"parameterServers": {"shards": 0}}, "spec.parameterServers.shards"),
        ({"training": {"mode": "fast"}}, "spec.training.mode"),
        ({"training": {"backupWorkers": 1}}, "spec.training.backupWorkers"),
        ({"training": {"staleness": "zhang"}}, "spec.training.staleness"),
        ({"training": {"maxStaleness": 2}}, "spec.training.maxStaleness"),
        ({"training": {"mode": "downpour", "fetchEvery": 0}}, "spec.training.fetchEvery"),
        ({"training": {"fetchEvery": 2}}, "spec.training.fetchEvery"),
        ({"compression": {"send": "updates"}}, "spec.compression.send"),
        (
            {"compression": {"kind": "onebit", "send": "updates"}, "training": {"mode": "async"}},
            "spec.compression.send",
        ),
        ({"compression": {"send": "momentum"}}, "spec.compression.send"),
        ({"model": {"entryPoint": "x:y"}}, "spec.model"),
        ({"model": {"builtin": None}}, "spec.model"),
        ({"model": {"entryPoint": "not an entry point", "builtin": None}}, "spec.model.entryPoint"),
        ({"debug": {"slowWorkers": {5: 10}}}, "spec.debug.slowWorkers.5"),
        ({"compression": {"kind": "twobit"}}, "spec.compression.kind"),
    ],
)
def test_a_bad_field_is_named_by_its_path(spec: dict, path: str) -> None:
    assert path in paths_of(job_doc(**spec))


def test_backup_workers_must_be_fewer_than_replicas() -> None:
    doc = job_doc(workers={"replicas": 2}, training={"backupWorkers": 2})
    assert "spec.training.backupWorkers" in paths_of(doc)
    parse_job(job_doc(workers={"replicas": 3}, training={"backupWorkers": 2}))


def test_a_missing_model_is_named() -> None:
    doc = job_doc()
    del doc["spec"]["model"]
    assert paths_of(doc) == ["spec.model"]


def test_exactly_one_of_max_steps_and_epochs() -> None:
    assert "spec.training" in paths_of(job_doc(training={"epochs": 2}))
    doc = job_doc()
    del doc["spec"]["training"]["maxSteps"]
    assert "spec.training" in paths_of(doc)


def test_bad_yaml_names_the_line() -> None:
    with pytest.raises(SpecError) as err:
        parse_job_text("spec: [unclosed\n", source="job.yaml")
    assert err.value.paths[0].startswith("job.yaml:")


def test_a_round_tripped_spec_validates_again() -> None:
    import json

    from sgdjob.api.validation import spec_to_json

    job = parse_job(job_doc(training={"mode": "async", "staleness": "zhang"}))
    assert validate_spec(json.loads(spec_to_json(job.spec))) == job.spec


def with_resources(requests: dict, limits: dict | None = None) -> dict:
    return job_doc(kubernetes={"psResources": {"requests": requests, "limits": limits or {}}})


@pytest.mark.parametrize(
    "qty", [2, "2", "1e3", "2E-2", ".5", 0.5, "1.", "+1", "500u", "100n", "500m", "512Mi", "1.5Gi"]
)
def test_every_quantity_kubernetes_accepts_is_accepted(qty: object) -> None:
    job = parse_job(with_resources({"cpu": qty}))
    got = job.spec.kubernetes.ps_resources.requests["cpu"]
    assert got == (repr(qty) if isinstance(qty, float) else qty)  # int-or-string, as the CRD


def test_quantities_written_as_yaml_numbers_are_accepted() -> None:
    import yaml

    doc = with_resources({"cpu": "X", "memory": "Y"})
    text = yaml.safe_dump(doc).replace("cpu: X", "cpu: .5").replace("memory: Y", "memory: 1e3")
    job = parse_job_text(text)
    assert job.spec.kubernetes.ps_resources.requests == {"cpu": "0.5", "memory": "1e3"}


@pytest.mark.parametrize(
    ("qty", "message"),
    [
        ("1.5.5", "not a Kubernetes quantity"),
        ("abc", "not a Kubernetes quantity"),
        ("1Kb", "not a Kubernetes quantity"),
        ("e3", "not a Kubernetes quantity"),
        ("", "not a Kubernetes quantity"),
        ("-1", "must not be negative"),
    ],
)
def test_a_bad_quantity_is_named_by_its_path(qty: str, message: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_job(with_resources({"cpu": qty}))
    assert [p.path for p in err.value.problems] == ["spec.kubernetes.psResources.requests.cpu"]
    assert message in str(err.value)


def test_a_request_above_its_limit_is_refused() -> None:
    with pytest.raises(SpecError, match=r"requests\.cpu: must be less than or equal"):
        parse_job(with_resources({"cpu": "1500m"}, {"cpu": "1"}))
    parse_job(with_resources({"cpu": "1000m", "memory": "1Gi"}, {"cpu": 1, "memory": "1024Mi"}))


def test_the_crd_types_resource_quantities_int_or_string() -> None:
    from sgdjob.api.crd import build_crd

    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    res = schema["properties"]["spec"]["properties"]["kubernetes"]["properties"]["psResources"]
    for kind in ("requests", "limits"):
        assert res["properties"][kind]["additionalProperties"] == {
            "x-kubernetes-int-or-string": True
        }


def test_a_duplicate_key_in_a_job_file_is_an_error_naming_the_key_and_line() -> None:
    import yaml

    text = yaml.safe_dump(job_doc(training={"lr": 0.05}), sort_keys=False)
    text = text.replace("    lr: 0.05\n", "    lr: 0.05\n    lr: 5.0\n")
    with pytest.raises(SpecError) as err:
        parse_job_text(text, source="job.yaml")
    (problem,) = err.value.problems
    line = text.splitlines().index("    lr: 5.0") + 1
    assert problem.path == f"job.yaml:{line}:5"
    assert "duplicate key 'lr'" in problem.message


def test_yaml_merge_keys_are_not_duplicates() -> None:
    text = """
base: &b {builtin: mlp, hidden: [8]}
apiVersion: sgdjob.dev/v1alpha1
kind: SGDJob
metadata: {name: merged}
spec:
  model: {<<: *b}
  data: {builtin: digits}
  training: {maxSteps: 5}
"""
    with pytest.raises(SpecError, match="base: unknown field"):
        parse_job_text(text)
