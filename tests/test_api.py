import pytest

from sgdjob.api.validation import SpecError, parse_job, parse_job_text, validate_spec
from tests.conftest import job_doc


def paths_of(doc: dict) -> list[str]:  # type: ignore[type-arg]
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
        ({"model": {"entryPoint": "x:y"}}, "spec.model"),
        ({"model": {"builtin": None}}, "spec.model"),
        ({"model": {"entryPoint": "not an entry point", "builtin": None}}, "spec.model.entryPoint"),
        ({"debug": {"slowWorkers": {5: 10}}}, "spec.debug.slowWorkers.5"),
        ({"compression": {"kind": "twobit"}}, "spec.compression.kind"),
    ],
)
def test_a_bad_field_is_named_by_its_path(spec: dict, path: str) -> None:  # type: ignore[type-arg]
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
