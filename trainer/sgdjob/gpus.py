"""Which GPU each local worker gets: one each, in turn, through ``CUDA_VISIBLE_DEVICES``.

A worker process drives one device (``workers.gpus`` is 0 or 1), so ``sgdjob run`` gives
worker i the i-th visible GPU and each worker sees exactly one, as ``cuda:0``. A machine
with fewer GPUs than the job's workers stops the run before anything starts, naming both
counts. On Kubernetes the device plugin does the same through ``nvidia.com/gpu`` limits.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping


class GPUError(RuntimeError):
    """The machine cannot give every worker its GPUs."""


def visible_gpus(env: Mapping[str, str] | None = None) -> list[str]:
    """The GPUs this process may hand out: CUDA_VISIBLE_DEVICES if set, else every GPU."""
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        return [d.strip() for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]


def assign_gpus(*, workers: int, gpus_per_worker: int, available: list[str]) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES per worker, or None for a CPU worker."""
    if gpus_per_worker == 0:
        return [None] * workers
    need = workers * gpus_per_worker
    if need > len(available):
        raise GPUError(
            f"the job asks for {need} GPU(s) ({workers} workers x workers.gpus="
            f"{gpus_per_worker}) but this machine has {len(available)}"
            + (f" ({', '.join(available)})" if available else "")
        )
    return [
        ",".join(available[i * gpus_per_worker : (i + 1) * gpus_per_worker]) for i in range(workers)
    ]
