"""`sgdjob` as a user meets it: exit codes and messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import job_doc


def sgdjob(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sgdjob", *args],
        cwd=cwd,
        text=True,
        capture_output=True,
        timeout=120,
    )


BAD_SPECS = {
    "bad yaml": ("spec: [unclosed\n", "job.yaml:"),
    "unknown field": (
        yaml.safe_dump(job_doc(training={"colour": "red"})),
        "spec.training.colour: unknown field",
    ),
    "negative lr": (yaml.safe_dump(job_doc(training={"lr": -0.1})), "spec.training.lr"),
    "zero workers": (yaml.safe_dump(job_doc(workers={"replicas": 0})), "spec.workers.replicas"),
    "missing model": (
        yaml.safe_dump(
            {k: v for k, v in job_doc().items() if k != "spec"}
            | {"spec": {"data": {"builtin": "digits"}}}
        ),
        "spec.model",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_an_invalid_spec_exits_2_naming_the_field_and_starts_nothing(
    tmp_path: Path, case: str
) -> None:
    text, expected = BAD_SPECS[case]
    (tmp_path / "job.yaml").write_text(text)
    res = sgdjob("run", "job.yaml", "--output", "out", cwd=tmp_path)
    assert res.returncode == 2
    assert expected in res.stderr
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "runs").exists()


def test_validate_accepts_the_shipped_example(tmp_path: Path) -> None:
    example = Path(__file__).parent.parent / "examples" / "digits-sync.yaml"
    res = sgdjob("validate", str(example), cwd=tmp_path)
    assert res.returncode == 0, res.stderr


def test_the_trainer_names_a_missing_contract_variable(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "sgdjob", "trainer"],
        cwd=tmp_path,
        text=True,
        capture_output=True,
        env={"PATH": "/usr/bin"},
        timeout=60,
    )
    assert res.returncode == 2
    assert "SGDJOB_ROLE is not set" in res.stderr
