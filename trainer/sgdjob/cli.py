"""The `sgdjob` command: run, validate, trainer, crd, operator.

Heavy imports (torch, zmq, kopf) happen inside the subcommand that needs them, so the
operator image (no torch) can run `sgdjob operator` and `sgdjob crd`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

from sgdjob.api.defaults import local_output_root, run_output_dir
from sgdjob.api.validation import SpecError, load_job
from sgdjob.contract import EXIT_ERROR, EXIT_SPEC


def _cmd_run(args: argparse.Namespace) -> int:
    try:
        job = load_job(args.file)
    except SpecError as err:
        _print_spec_error(args.file, err)
        return EXIT_SPEC
    from sgdjob.launcher import LaunchError, run_local
    from sgdjob.report import plot_curves, read_metrics, summary_table
    from sgdjob.runs import RunError, choose_resume, new_run_id, point_latest
    from sgdjob.signals import Stopped

    name = job.metadata.name
    root = local_output_root(job, args.output).resolve()
    try:
        if args.resume is None:
            run_id = new_run_id()
        else:
            wanted = None if args.resume is True else str(args.resume)
            run_id = choose_resume(
                root, name, job.spec, wanted, shards=job.spec.parameter_servers.shards
            ).run_id
    except RunError as err:
        print(f"sgdjob: cannot resume {name}: {err}", file=sys.stderr)
        return EXIT_SPEC
    output = Path(run_output_dir(root, name, run_id))
    output.mkdir(parents=True, exist_ok=True)
    point_latest(root, name, run_id)
    print(
        f"sgdjob: {'resuming' if args.resume is not None else 'running'} {name} "
        f"({job.spec.training.mode}, {job.spec.parameter_servers.shards} shards, "
        f"{job.spec.workers.replicas} workers), run {run_id} -> {output}",
        file=sys.stderr,
    )
    try:
        summary = run_local(
            job,
            output=output,
            progress=not args.no_progress,
            run_id=run_id,
            resume=args.resume is not None,
        )
    except (LaunchError, RunError) as err:
        print(f"sgdjob: job {name} failed: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt as err:
        code = 128 + (err.signum if isinstance(err, Stopped) else 2)
        print(
            f"sgdjob: interrupted; every replica was stopped. Continue this run with "
            f"`sgdjob run {args.file}{f' --output {args.output}' if args.output else ''} "
            f"--resume {run_id}`",
            file=sys.stderr,
        )
        return code
    png = plot_curves(
        read_metrics(output / "metrics.jsonl"), output / "curves.png", title=job.metadata.name
    )
    print(summary_table(summary, name=job.metadata.name))
    print(
        f"  outputs: {output}/model.pt, summary.json, metrics.jsonl"
        + (f", {png.name}" if png else "")
    )
    return 0


def _print_spec_error(source: str, err: SpecError) -> None:
    print(f"sgdjob: invalid SGDJob {source}:", file=sys.stderr)
    for p in err.problems:
        print(f"  {p}", file=sys.stderr)


def _cmd_validate(args: argparse.Namespace) -> int:
    try:
        job = load_job(args.file)
    except SpecError as err:
        _print_spec_error(args.file, err)
        return EXIT_SPEC
    print(f"{args.file}: valid SGDJob {job.metadata.name}")
    return 0


def _cmd_trainer(args: argparse.Namespace) -> int:
    from sgdjob.contract import ContractError, from_env
    from sgdjob.roles import run_role

    try:
        contract = from_env()
    except ContractError as err:
        print(f"sgdjob trainer: {err}", file=sys.stderr)
        return EXIT_SPEC
    if args.role or args.index is not None:
        contract = replace(
            contract,
            role=args.role or contract.role,
            index=contract.index if args.index is None else args.index,
        )
    return run_role(contract)


def _cmd_crd(args: argparse.Namespace) -> int:
    from sgdjob.api.crd import render_crd_yaml

    sys.stdout.write(render_crd_yaml())
    return 0


def _cmd_operator(args: argparse.Namespace) -> int:
    from sgdjob_operator.entry import run_operator

    return run_operator(list(args.operator_args))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sgdjob", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a job locally: shards and workers on 127.0.0.1")
    run.add_argument("file", help="SGDJob YAML file")
    run.add_argument(
        "--output",
        type=Path,
        help="output root (default: spec.output.directory, else runs); "
        "each run writes to <root>/<name>/<run-id>/, <root>/<name>/latest names the newest",
    )
    run.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="RUN_ID",
        help="continue an interrupted or failed run from its checkpoints instead of starting "
        "a new one: the newest such run of this job, or RUN_ID",
    )
    run.add_argument("--no-progress", action="store_true", help="no live progress line")
    run.set_defaults(fn=_cmd_run)
    val = sub.add_parser("validate", help="check an SGDJob file and name every bad field")
    val.add_argument("file")
    val.set_defaults(fn=_cmd_validate)
    tr = sub.add_parser("trainer", help="run one role (the pod entry point; reads SGDJOB_* env)")
    tr.add_argument("--role", choices=["ps", "worker"])
    tr.add_argument("--index", type=int)
    tr.set_defaults(fn=_cmd_trainer)
    crd = sub.add_parser("crd", help="print the SGDJob CustomResourceDefinition")
    crd.set_defaults(fn=_cmd_crd)
    op = sub.add_parser("operator", help="run the Kopf operator", add_help=False)
    op.add_argument("operator_args", nargs=argparse.REMAINDER)
    op.set_defaults(fn=_cmd_operator)
    return p


def _operator_argv(argv: list[str]) -> list[str] | None:
    """The operator's own flags when the command is `operator`, else None.

    argparse's REMAINDER does not take arguments that start with `-`, so `sgdjob operator
    --verbose` would be refused by the top-level parser; the operator parses its flags itself.
    """
    for i, arg in enumerate(argv):
        if not arg.startswith("-"):
            if arg != "operator":
                return None
            verbose = any(a in ("-v", "--verbose") for a in argv[:i])
            return (["--verbose"] if verbose else []) + argv[i + 1 :]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    operator_argv = _operator_argv(argv)
    if operator_argv is not None:
        from sgdjob_operator.entry import run_operator

        return run_operator(operator_argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    return int(args.fn(args))
