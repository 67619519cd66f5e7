"""SGDJob defaults that depend on where the job runs (not expressible as field defaults)."""

from __future__ import annotations

from pathlib import Path

from sgdjob.api.types import SGDJob

POD_OUTPUT_DIR = "/output"
LOCAL_OUTPUT_ROOT = "runs"


def local_output_root(job: SGDJob, override: str | Path | None = None) -> Path:
    """Where `sgdjob run` keeps runs: `--output`, then `spec.output.directory`, then `runs`."""
    if override is not None:
        return Path(override)
    if job.spec.output.directory:
        return Path(job.spec.output.directory)
    return Path(LOCAL_OUTPUT_ROOT)


def run_output_dir(root: str | Path, job_name: str, run_id: str) -> str:
    """One run's own directory under a (possibly shared) output root: `<root>/<job>/<run>`.

    Both executors use it: locally with a fresh run id per `sgdjob run`, on Kubernetes with
    the SGDJob's uid, so jobs sharing one output claim, and a job deleted and created again
    under the same name, never write into each other's files.
    """
    return str(Path(root) / job_name / run_id)


def pod_output_dir(job: SGDJob) -> str:
    """The output root inside pods (the mount point): the spec's, else the output volume.

    A pod's own run writes under ``run_output_dir(pod_output_dir(job), name, uid)``.
    """
    return job.spec.output.directory or POD_OUTPUT_DIR
