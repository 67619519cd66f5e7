"""Baseline: torch DistributedDataParallel (gloo, CPU) training an MLP, in samples per second.

``run_ddp(...)`` starts one process per rank (torch threads 1), optionally each inside a network
namespace from ``bench.netns`` via ``ip netns exec``, runs a bounded number of synchronous SGD
steps on synthetic data, with or without a gradient-compression hook (``bench.ddp_hooks``),
and returns rank 0's timing. ``run_ranks`` is the process launcher it shares with the
real-data ranks of ``bench.ddp_train``. It is the number sgdjob's parameter-server
runs are compared against, on loopback and across a shaped link.

``python -m bench.ddp`` measures loopback, and the 1gbit / 10gbit veth links when namespaces are
available, and writes ``bench/results/ddp.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

from bench.ddp_hooks import HOOKS, min_warmup, validate_hook, wrap
from bench.netns import NetnsUnavailable, in_netns, veth_link
from bench.report import markdown_table, write_result
from sgdjob.compression import wire_nbytes

_REPO_ROOT = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "DDP_RESULT "


def mlp_params(hidden: int, layers: int, classes: int = 10) -> int:
    """Parameter count of the benchmark MLP (``layers`` hidden x hidden blocks, then a head)."""
    return layers * (hidden * hidden + hidden) + hidden * classes + classes


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _netns_ifname(ns: str) -> str:
    """The one non-loopback interface in ``ns``: gloo must bind to it, not to the host name."""
    out = subprocess.run(
        ["ip", "-n", ns, "-o", "-4", "addr", "show"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    names = [line.split()[1] for line in out.splitlines() if line.split()[1] != "lo"]
    if len(names) != 1:
        raise RuntimeError(f"expected one non-loopback IPv4 interface in {ns}, found {names}")
    return names[0]


def run_ranks(
    *,
    module: str,
    rank_argv: list[str],
    workers: int,
    netns: list[str | None] | None = None,
    timeout_s: float = 300.0,
) -> dict[str, object]:
    """Run ``python -m module --rank r *rank_argv`` for every rank; return rank 0's result.

    ``netns[r]`` is the namespace rank ``r`` runs in (None: the caller's). Every process is
    waited for (so a caller's ``RUSAGE_CHILDREN`` counts their CPU); on a failure or a
    timeout the rest are killed and reaped. Rank 0 prints one ``DDP_RESULT <json>`` line.
    """
    if netns is not None and len(netns) != workers:
        raise ValueError(f"netns has {len(netns)} entries for {workers} workers")
    spaces = netns or [None] * workers
    procs: list[subprocess.Popen[str]] = []
    try:
        for rank, ns in enumerate(spaces):
            env = dict(os.environ)
            # The rank runs `-m bench.<module>`, which imports sgdjob: both must be importable
            # even when the package is not pip-installed.
            paths = (str(_REPO_ROOT), str(_REPO_ROOT / "trainer"), env.get("PYTHONPATH"))
            env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
            env["GLOO_SOCKET_IFNAME"] = "lo" if ns is None else _netns_ifname(ns)
            env["OMP_NUM_THREADS"] = "1"
            argv = [sys.executable, "-m", module, "--rank", str(rank), *rank_argv]
            procs.append(
                subprocess.Popen(
                    in_netns(ns, argv),
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + timeout_s
        outputs = []
        for rank, proc in enumerate(procs):
            try:
                out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"DDP rank {rank} did not finish in {timeout_s}s") from None
            if proc.returncode != 0:
                raise RuntimeError(f"DDP rank {rank} exited {proc.returncode}: {err[-2000:]}")
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()  # by pid: only the processes this call started
            proc.wait()
    lines = [ln for ln in outputs[0].splitlines() if ln.startswith(RESULT_PREFIX)]
    if not lines:
        raise RuntimeError(f"rank 0 printed no result: {outputs[0][-2000:]}")
    result: dict[str, object] = json.loads(lines[-1][len(RESULT_PREFIX) :])
    result["link"] = "loopback" if netns is None else "netns"
    return result


def run_ddp(
    *,
    workers: int,
    hidden: int,
    layers: int,
    batch: int,
    steps: int,
    master_addr: str,
    port: int,
    netns: list[str | None] | None = None,
    timeout_s: float = 300.0,
    warmup: int = 1,
    hook: str = "none",
) -> dict[str, object]:
    """Train for ``steps`` timed steps after ``warmup`` untimed ones; return rank 0's numbers.

    ``hook`` is the gradient compression (``bench.ddp_hooks``); PowerSGD needs ``warmup`` >= 2
    so that the timed steps are all compressed. ``master_addr`` must be reachable from every
    rank (127.0.0.1 on loopback, the rank-0 end of the veth otherwise).
    """
    validate_hook(hook)
    if warmup < min_warmup(hook):
        raise ValueError(
            f"warmup={warmup}: hook {hook} runs plain all-reduce for its first "
            f"{min_warmup(hook)} steps, so warmup must be at least that"
        )
    argv = ["--workers", str(workers), "--hidden", str(hidden), "--layers", str(layers)]
    argv += ["--batch", str(batch), "--steps", str(steps), "--warmup", str(warmup)]
    argv += ["--master-addr", master_addr, "--port", str(port), "--hook", hook]
    return run_ranks(
        module="bench.ddp", rank_argv=argv, workers=workers, netns=netns, timeout_s=timeout_s
    )


def _rank_main(args: argparse.Namespace) -> None:
    """One DDP rank: build the MLP, train on synthetic data, rank 0 prints the timing."""
    import torch
    import torch.distributed as dist
    from torch import nn

    torch.set_num_threads(1)
    torch.manual_seed(args.rank)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{args.master_addr}:{args.port}",
        rank=args.rank,
        world_size=args.workers,
        timeout=timedelta(seconds=120),
    )
    try:
        blocks: list[nn.Module] = []
        for _ in range(args.layers):
            blocks += [nn.Linear(args.hidden, args.hidden), nn.ReLU()]
        model = wrap(nn.Sequential(*blocks, nn.Linear(args.hidden, 10)), args.hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x = torch.randn(args.batch, args.hidden)
        y = torch.randint(0, 10, (args.batch,))
        loss_fn = nn.CrossEntropyLoss()

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()  # DDP all-reduces the gradients here
            opt.step()

        for _ in range(args.warmup):
            step()  # warm-up: buckets, connections, allocator
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        dist.barrier()
        seconds = time.perf_counter() - t0
        if args.rank == 0:
            n = sum(p.numel() for p in model.parameters())
            result = {
                "workers": args.workers,
                "params": n,
                "batch": args.batch,
                "steps": args.steps,
                "warmup": args.warmup,
                "hook": args.hook,
                "seconds": seconds,
                "samples_per_s": args.workers * args.batch * args.steps / seconds,
                "step_ms": 1e3 * seconds / args.steps,
            }
            print(RESULT_PREFIX + json.dumps(result), flush=True)
    finally:
        dist.destroy_process_group()


def _bench_main(args: argparse.Namespace) -> None:
    common: dict[str, Any] = dict(
        workers=args.workers,
        hidden=args.hidden,
        layers=args.layers,
        batch=args.batch,
        steps=args.steps,
        warmup=args.warmup,
        hook=args.hook,
    )
    rows: list[list[object]] = []

    def add(link: str, r: dict[str, object]) -> None:
        rows.append(
            [
                link,
                r["workers"],
                r["params"],
                r["batch"],
                f"{r['step_ms']:.0f}",
                f"{r['samples_per_s']:.1f}",
            ]
        )

    add("loopback", run_ddp(**common, master_addr="127.0.0.1", port=free_port()))
    notes = []
    for rate in args.rates:
        try:
            with veth_link(rate) as link:
                # Rank 0 on one end, every other rank on the other: all traffic crosses the link.
                spaces: list[str | None] = [link.ns[0], *[link.ns[1]] * (args.workers - 1)]
                r = run_ddp(**common, master_addr=link.addrs[0], port=29500, netns=spaces)
                add(f"veth {rate}", r)
        except NetnsUnavailable as exc:
            notes.append(f"veth {rate}: skipped: {exc}")
    body = markdown_table(["link", "workers", "params", "batch", "step ms", "samples/s"], rows)
    body += (
        f"\n\nCPU gloo DDP, hook {args.hook}, torch threads 1 per rank, synthetic data, "
        f"{args.warmup} warm-up step(s)."
    )
    n = mlp_params(args.hidden, args.layers)
    body += (
        f"\n\nGradient per worker per step: {4 * n / 1e6:.1f} MB as fp32, "
        f"{wire_nbytes(n, 512) / 1e6:.2f} MB as 1-bit (bucket 512, sgdjob.compression)."
    )
    for note in notes:
        body += f"\n\n{note}"
    write_result("ddp", "torch DDP (gloo) baseline", body)


def leave_finished_rank() -> NoReturn:
    """End a rank whose work is done (its result printed, its process group destroyed)
    without the interpreter's own teardown.

    That teardown destroys what torch still holds of gloo and of PowerSGD's hook state, and
    in about 1 of 20 PowerSGD runs on a loaded machine it aborted the finished rank with
    SIGABRT ("terminate called without an active exception"), failing a run whose numbers
    were already out (torch's issue tracker describes the same teardown crash). An error
    still ends the rank the ordinary way, with its traceback and a non-zero status."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, help="internal: run as this DDP rank")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=10)  # ~10.5 M parameters
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--master-addr", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=29500)
    parser.add_argument("--rates", nargs="*", default=["1gbit", "10gbit"])
    parser.add_argument("--hook", default="none", type=validate_hook, help=", ".join(HOOKS))
    args = parser.parse_args(argv)
    if args.rank is not None:
        _rank_main(args)
        leave_finished_rank()
    else:
        _bench_main(args)


if __name__ == "__main__":
    main()
