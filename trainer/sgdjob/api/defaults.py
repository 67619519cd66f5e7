"""SGDJob defaults that depend on where the job runs (not expressible as field defaults)."""

from __future__ import annotations

from pathlib import Path

from sgdjob.api.types import SGDJob

POD_OUTPUT_DIR = "/output"


def local_output_dir(job: SGDJob, override: str | Path | None = None) -> Path:
    """Output directory for `sgdjob run`: `--output`, then the spec, then `runs/<name>`."""
    if override is not None:
        return Path(override)
    if job.spec.output.directory:
        return Path(job.spec.output.directory)
    return Path("runs") / job.metadata.name


def pod_output_dir(job: SGDJob) -> str:
    """Output directory inside pods: the spec's, else the mounted output volume."""
    return job.spec.output.directory or POD_OUTPUT_DIR
