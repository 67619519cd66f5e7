"""Scripts, images, Makefile and docs of the install path, checked statically (no Docker or
cluster here): shellcheck, referenced files and chart values exist, documented commands match."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml
from install_support import CHART, ROOT, load_yaml, run, tool

from sgdjob.api.crd import PRINTER_COLUMNS
from sgdjob.api.validation import parse_job

E2E = ROOT / "hack" / "kind-e2e.sh"
DOC = ROOT / "docs" / "install.md"
SKIP_DIRS = {".git", ".venv", ".tools", "node_modules", "runs", "build"}
REPO_PATH = re.compile(r"\b((?:examples|charts|crds|hack|operator|trainer|\.ci)/[\w./-]*\w)")


def _shell_scripts() -> list[Path]:
    found = []
    for path in ROOT.rglob("*"):
        if any(part in SKIP_DIRS for part in path.relative_to(ROOT).parts) or not path.is_file():
            continue
        if path.suffix == ".sh":
            found.append(path)
        elif path.suffix == "" and path.parent.name in (".ci", "hack"):
            with path.open("rb") as f:
                first = f.readline()
            if first.startswith(b"#!") and first.rstrip().endswith((b"sh", b"bash")):
                found.append(path)
    return sorted(found)


def _value_keys(values: dict[str, object], prefix: str = "") -> set[str]:
    keys = set()
    for key, value in values.items():
        keys.add(prefix + key)
        if isinstance(value, dict):
            keys |= _value_keys(value, f"{prefix}{key}.")
    return keys


def _set_keys(text: str) -> set[str]:
    return set(re.findall(r"--set\s+([\w.]+)=", text))


@pytest.mark.parametrize("script", _shell_scripts(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shell_script_passes_shellcheck(script: Path) -> None:
    result = run([tool("shellcheck"), "--external-sources", script], cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_install_scripts_and_the_e2e_script_are_found_and_executable() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in _shell_scripts()}
    assert {".ci/install-tools.sh", "hack/kind-e2e.sh", ".ci/run"} <= names
    for name in names:
        assert (ROOT / name).stat().st_mode & 0o111, f"{name} is not executable"


def test_the_kind_e2e_script_uses_files_and_chart_values_that_exist() -> None:
    text = E2E.read_text(encoding="utf-8")
    paths = set(REPO_PATH.findall(text))
    assert {"operator/Dockerfile", "trainer/Dockerfile", "charts/sgdjob-operator"} <= paths
    assert [p for p in paths if not (ROOT / p).exists()] == []
    keys = _set_keys(text)
    assert keys and keys <= _value_keys(load_yaml(CHART / "values.yaml"))


def test_the_kind_e2e_script_cleans_up_and_checks_a_restart() -> None:
    text = E2E.read_text(encoding="utf-8")
    assert "trap cleanup EXIT" in text and 'delete cluster --name "$CLUSTER"' in text
    assert "delete pod" in text and "restarts" in text and "Succeeded" in text
    assert "get sgdj" in text
    assert run(["bash", "-n", E2E]).returncode == 0


def test_the_makefile_installs_tools_for_tests_and_has_an_e2e_target() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^test: .*\btools\b", makefile, re.M)
    assert "PYTHON=$(PY) .ci/install-tools.sh" in makefile
    assert re.search(r"^e2e-kind:\n\thack/kind-e2e.sh$", makefile, re.M)
    assert "charts/sgdjob-operator/files/sgdjob.dev_sgdjobs.yaml" in makefile
    assert ".tools/" in (ROOT / ".gitignore").read_text(encoding="utf-8").split()


def test_the_images_run_as_non_root_and_the_operator_image_has_no_torch() -> None:
    operator = (ROOT / "operator" / "Dockerfile").read_text(encoding="utf-8")
    trainer = (ROOT / "trainer" / "Dockerfile").read_text(encoding="utf-8")
    for text in (operator, trainer):
        assert re.search(r"^USER 10001", text, re.M)
        assert "COPY pyproject.toml README.md ./" in text
    assert '".[operator]"' in operator
    assert not re.search(r"pip (?:install|wheel)[^\n]*torch", operator)
    assert "find_spec('torch') is not None" in operator  # the build fails if torch sneaks in
    assert "ARG VARIANT=cuda" in trainer and "AS base-cpu" in trainer
    assert "FROM base-${VARIANT}" in trainer and '".[trainer]"' in trainer
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    assert {".venv", ".tools", ".git"} <= set(ignored)


def test_the_install_doc_has_both_sections_and_only_real_paths() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert "\n## Install on a cluster\n" in text and "\n## Try it on kind\n" in text
    missing = [p for p in set(REPO_PATH.findall(text)) if not (ROOT / p).exists()]
    assert missing == []
    assert _set_keys(text) <= _value_keys(load_yaml(CHART / "values.yaml"))


def test_the_install_doc_samples_match_the_crd_printer_columns() -> None:
    text = DOC.read_text(encoding="utf-8")
    headers = [line.split() for line in text.splitlines() if line.startswith("NAME ")]
    assert len(headers) == 2, "expected a `kubectl get sgdj` and a `-o wide` sample"
    normal = ["NAME"] + [c["name"].upper() for c in PRINTER_COLUMNS if not c.get("priority")]
    wide = normal + [c["name"].upper() for c in PRINTER_COLUMNS if c.get("priority")]
    assert headers == [normal, wide]
    assert "sample" in text.lower()


def test_the_e2e_scripts_slowed_down_job_is_still_a_valid_sgdjob() -> None:
    """Run the script's own `kubectl patch --local` (offline) and validate what it applies."""
    text = E2E.read_text(encoding="utf-8")
    match = re.search(r'-p "(\{.*\})"', text)
    assert match, 'kind-e2e.sh: no `-p "{...}"` merge patch found'
    patch = match.group(1).replace('\\"', '"').replace("$SLOW_MS", "100")
    default = re.search(r'^EXAMPLE="\$\{EXAMPLE:-([^}]+)\}"', text, re.M)
    assert default
    flags = ["--local", "-f", default.group(1), "--type", "merge", "-o", "yaml", "-p", patch]
    result = run(
        [tool("kubectl"), "patch", *flags],
        cwd=ROOT,
        env={**os.environ, "KUBECONFIG": os.devnull},
    )
    assert result.returncode == 0, result.stderr
    job = parse_job(yaml.safe_load(result.stdout))
    assert job.spec.debug.slow_workers == {0: 100, 1: 100}
