"""One sgdjob job in a child process, so that every CPU second of it can be counted.

``run_job_process(doc, out)`` runs ``python -m bench.jobrun``, which runs the job through the
local executor (``sgdjob run``'s code path, ``bench.common.run_job``: the executor's status
polling thread included) or, with ``executor=False``, as bare trainer processes
(``bench.splitjob.run_split_job``, optionally across network namespaces), and waits for it.
The child reaps every process of the job, so the caller's ``RUSAGE_CHILDREN`` then holds
the whole job's CPU (``bench.cpu``). Returns shard 0's ``summary.json``.

On a timeout the child gets SIGTERM, which it turns into an exit that runs the job's own
clean-up (the executor and ``run_split_job`` kill and reap their processes), then SIGKILL
if it is still there after 30 s.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

_REPO_ROOT = Path(__file__).resolve().parent.parent


class JobRunError(RuntimeError):
    """The job's child process failed or ran past its time limit."""


def run_job_process(
    doc: dict[str, Any],
    out: Path,
    *,
    executor: bool = True,
    split: dict[str, str] | None = None,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Run the job in a child process; shard 0's summary (raises JobRunError).

    ``split``: keyword arguments of ``run_split_job`` (``shard_ns``, ``worker_ns``,
    ``shard_host``), only with ``executor=False``.
    """
    if split and executor:
        raise ValueError("split placement needs executor=False")
    out.mkdir(parents=True, exist_ok=True)
    job_path = out.parent / f"{out.name}.job.json"
    job_path.write_text(json.dumps(doc), encoding="utf-8")
    argv = [sys.executable, "-m", "bench.jobrun", "--job", str(job_path), "--out", str(out)]
    if not executor:
        argv += ["--split", json.dumps(split or {}), "--timeout", str(timeout_s)]
    env = dict(os.environ)
    paths = (str(_REPO_ROOT), str(_REPO_ROOT / "trainer"), env.get("PYTHONPATH"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    log = out.parent / f"{out.name}.jobrun.log"
    with log.open("wb") as logf:
        proc = subprocess.Popen(argv, env=env, stdout=logf, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(timeout=timeout_s + 30)
        except subprocess.TimeoutExpired:
            _stop(proc)
            raise JobRunError(f"job {out} ran past {timeout_s:.0f}s; log {log}") from None
        except BaseException:  # e.g. Ctrl-C in the bench: the job must not outlive it
            _stop(proc)
            raise
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-8:])
        raise JobRunError(f"job {out} exited {code}; log {log}\n{tail}")
    return dict(json.loads((out / "summary.json").read_text(encoding="utf-8")))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the child cleans up its job), then SIGKILL after 30 s; always reaped."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", required=True, help="the job document, as JSON")
    parser.add_argument("--out", required=True)
    parser.add_argument("--split", help="run_split_job placement as JSON (no executor)")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)

    def on_term(signum: int, _frame: object) -> None:
        print(f"bench.jobrun: signal {signum}, stopping the job", flush=True)
        raise SystemExit(128 + signum)  # unwinds through the job's clean-up

    signal.signal(signal.SIGTERM, on_term)
    doc = json.loads(Path(args.job).read_text(encoding="utf-8"))
    out = Path(args.out)
    if args.split is None:
        from bench.common import run_job

        run_job(doc, out)
    else:
        from bench.splitjob import run_split_job

        run_split_job(doc, out, timeout_s=args.timeout, **json.loads(args.split))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
