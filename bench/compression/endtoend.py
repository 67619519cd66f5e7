"""End to end: sync samples/s with fp32 vs 1-bit gradients vs torch DDP, loopback and shaped links.

What is measured: 2 workers training the ~10M-parameter MLP of ``bench.common.mlp_workload``
(10,506,250 parameters, the model of ``bench.ddp``) in sync mode with one parameter-server
shard unless said otherwise, five ways, and the torch DDP (gloo, CPU) baseline with the same
model, batch, worker count and steps:

- ``fp32``: no compression (``compression.kind: none``);
- ``onebit``: gradients pushed as 1-bit with error feedback, bucket 512, parameters pulled
  back as fp32 (``serverToWorker: false``, the default);
- ``onebit + serverToWorker``: the shards also send 1-bit parameter updates back;
- the same with ``bucketMB: 0`` (*after backward*): the worker encodes and pushes each slice
  whole after backward instead of in parts from autograd's hooks, to show what that overlap
  buys;
- the same with 2 shards, both on the shard side of the link.

On three links:

- ``loopback``: everything on 127.0.0.1;
- ``veth <rate>``: two network namespaces joined by a veth pair shaped with tc tbf to ``rate``
  in each direction (``bench.netns``). The shard runs in namespace A bound to A's address,
  both workers in namespace B (``bench.splitjob``), so every push and pull crosses the link;
  DDP puts rank 0 in A and rank 1 in B, so its all-reduce crosses the same link.

Every sgdjob row runs as bare trainer processes (``bench.splitjob``, the namespaces None on
loopback): nothing polls the coordinator's /status during the run, on any link, whereas the
local executor polls it 4 times a second (see ``bench.sync_vs_ddp`` for what that costs).

The throughput is that of the timed steps after the warm-up in every row (sgdjob: shard 0's
``metrics.jsonl``, ``bench.common.steady_rate``; DDP: its step loop), so start-up is excluded
alike. Bytes per step per worker come from the socket counters in ``summary.json``, which
count received frames exactly: *sent* is what the shard received (``shard0BytesReceived``,
all pushes, hellos and reports of both workers) over workers x steps; *received* is worker
1's ``bytesReceived`` (worker 0's also holds the final model pull) less its first pull,
which is the full fp32 parameter vector in every variant (4 x parameters + one 96-byte
header), over the remaining steps - 1: the steady per-step pull. (Not the workers'
``bytesSent``: see ``trainer/sgdjob/transport.py``, it under-counts 1-bit messages.) gloo
counts nothing; DDP's per-rank traffic is given as computed.

Where namespaces cannot be created the shaped part prints ``skipped: <reason>`` and the
loopback part still runs. Namespaces and every process started are removed on the way out.

``python -m bench.compression.endtoend [--rates 1gbit 10gbit]`` writes
``bench/results/compression_e2e.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import job, mlp_workload, steady_rate
from bench.ddp import free_port, mlp_params, run_ddp
from bench.netns import NetnsUnavailable, VethLink, rate_bits_per_s, veth_link
from bench.report import markdown_table, write_result
from bench.splitjob import SplitJobError, run_split_job
from sgdjob.compression import wire_nbytes
from sgdjob.protocol import HEADER_SIZE

HIDDEN, LAYERS, WORKERS, BUCKET = 1024, 10, 2, 512
FP32, DDP = "sgdjob fp32", "torch DDP (gloo)"
ONEBIT = {"kind": "onebit", "bucketSize": BUCKET, "errorFeedback": True}
BOTH_WAYS = {**ONEBIT, "serverToWorker": True}
# name -> the spec's compression, and what else differs from 1 shard with bucketMB 25.
VARIANTS: dict[str, dict[str, Any]] = {
    FP32: {"compression": {"kind": "none"}},
    "sgdjob onebit": {"compression": ONEBIT},
    "sgdjob onebit + serverToWorker": {"compression": BOTH_WAYS},
    # The same without pushing during backward: what the overlap of 1-bit parts buys.
    "sgdjob onebit + serverToWorker, after backward": {
        "compression": BOTH_WAYS,
        "bucketMB": 0,
    },
    # Two shards on the same side of the link: each decodes, steps and encodes half.
    "sgdjob onebit + serverToWorker, 2 shards": {"compression": BOTH_WAYS, "shards": 2},
}
HEADERS = [
    "link",
    "system",
    "step ms",
    "samples/s",
    "min-max",
    "x sgdjob fp32",
    "x DDP",
    "sent MB/step/worker",
    "received MB/step/worker",
]


def steps_for(link: str, args: argparse.Namespace) -> int:
    """Timed steps: fewer below 10 Gbit/s, where one fp32 step moves ~84 MB each way."""
    if link == "loopback" or rate_bits_per_s(link) >= 10**10:
        return int(args.steps)
    return int(args.slow_steps)


def sgdjob_row(
    name: str, veth: VethLink | None, steps: int, args: argparse.Namespace, out: Path
) -> dict[str, Any]:
    spec = mlp_workload(
        hidden=HIDDEN,
        layers=LAYERS,
        batch=args.batch,
        steps=args.warmup + steps,
        workers=WORKERS,
        shards=VARIANTS[name].get("shards", 1),
    )
    spec["compression"] = VARIANTS[name]["compression"]
    if "bucketMB" in VARIANTS[name]:
        spec["training"]["bucketMB"] = VARIANTS[name]["bucketMB"]
    doc = job("compression-e2e", spec)
    if veth is None:
        summary = run_split_job(doc, out)
    else:
        summary = run_split_job(
            doc, out, shard_ns=veth.ns[0], worker_ns=veth.ns[1], shard_host=veth.addrs[0]
        )
    rate = steady_rate(out, warmup=args.warmup, workers=WORKERS, batch=args.batch)
    total = args.warmup + steps
    first_pull = 4 * mlp_params(HIDDEN, LAYERS) + HEADER_SIZE
    # Shard 0's counter holds its slice's share: about 1/shards of every push (equal slices).
    shards = int(spec["parameterServers"]["shards"])
    return {
        "samples_per_s": rate.samples_per_s,
        "step_ms": rate.step_ms,
        "sent": shards * summary["shard0BytesReceived"] / (WORKERS * total),
        "received": (summary["workerStats"]["1"]["bytesReceived"] - first_pull) / (total - 1),
    }


def ddp_row(veth: VethLink | None, steps: int, args: argparse.Namespace) -> dict[str, Any]:
    common: dict[str, Any] = dict(
        workers=WORKERS,
        hidden=HIDDEN,
        layers=LAYERS,
        batch=args.batch,
        steps=steps,
        warmup=args.warmup,
    )
    if veth is None:
        r = run_ddp(**common, master_addr="127.0.0.1", port=free_port())
    else:
        r = run_ddp(**common, master_addr=veth.addrs[0], port=29500, netns=[*veth.ns])
    return {"samples_per_s": r["samples_per_s"], "step_ms": r["step_ms"]}


def link_floor(rate: str, n: int) -> str:
    """The least time per step the link itself allows each system, from the bytes it carries."""
    fp32, onebit = 4 * n, wire_nbytes(n, BUCKET)
    seconds = {
        # sync: both workers push through the link, then both pull back: no overlap.
        FP32: 2 * WORKERS * fp32,
        "onebit": WORKERS * (onebit + fp32),
        "onebit + serverToWorker": 2 * WORKERS * onebit,
        # 2-rank ring all-reduce: one rank's 4n bytes each way at once, overlapped with backward.
        "DDP": fp32,
    }
    bps = rate_bits_per_s(rate)
    floors = ", ".join(f"{k} {1e3 * 8 * b / bps:.0f}" for k, b in seconds.items())
    return f"At {rate} the link alone needs at least (ms per step): {floors}."


def measure_link(
    link: str, veth: VethLink | None, args: argparse.Namespace, tmp: Path, notes: list[str]
) -> list[list[object]]:
    """``args.rounds`` interleaved rounds of every system on one link; one row per system."""
    steps = steps_for(link, args)
    names = [*VARIANTS, DDP]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names:
            try:
                if name == DDP:
                    runs[name].append(ddp_row(veth, steps, args))
                else:
                    out = tmp / f"{link}-r{r}-{names.index(name)}"
                    runs[name].append(sgdjob_row(name, veth, steps, args, out))
                print(f"{link:>9} round {r} {name:<32} {runs[name][-1]}", flush=True)
            except (SplitJobError, RuntimeError) as exc:  # a failed run must not hide the rest
                notes.append(f"{link}, round {r}, {name}: failed: {str(exc)[:300]}")
    med = {n: statistics.median(x["samples_per_s"] for x in runs[n]) for n in names if runs[n]}
    rows: list[list[object]] = []
    for name in names:
        if not runs[name]:
            rows.append([link, name, "failed", "", "", "", "", "", ""])
            continue
        sps = [float(x["samples_per_s"]) for x in runs[name]]
        is_ddp = name == DDP

        def mb(key: str, name: str = name) -> float:
            return statistics.median(float(x[key]) for x in runs[name]) / 1e6

        rows.append(
            [
                f"{link} ({args.warmup}+{steps} steps)",
                name,
                f"{statistics.median(float(x['step_ms']) for x in runs[name]):.0f}",
                f"{med[name]:.0f}",
                f"{min(sps):.0f}-{max(sps):.0f}",
                "" if is_ddp or FP32 not in med else f"{med[name] / med[FP32]:.2f}",
                "" if DDP not in med else f"{med[name] / med[DDP]:.2f}",
                "" if is_ddp else f"{mb('sent'):.2f}",
                "" if is_ddp else f"{mb('received'):.2f}",
            ]
        )
    return rows


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", nargs="*", default=["10gbit", "1gbit"])
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per link")
    parser.add_argument("--steps", type=int, default=10, help="timed steps on loopback/10gbit")
    parser.add_argument("--slow-steps", type=int, default=4, help="timed steps below 10gbit")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32, help="per worker")
    args = parser.parse_args([] if argv is None else argv)
    rows: list[list[object]] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="compression-e2e-") as tmp:
        rows += measure_link("loopback", None, args, Path(tmp), notes)
        for rate in args.rates:
            try:
                with veth_link(rate) as veth:
                    rows += measure_link(rate, veth, args, Path(tmp), notes)
            except NetnsUnavailable as exc:
                msg = f"veth {rate}: skipped: {exc}"
                print(msg, flush=True)
                notes.append(msg)
    n = mlp_params(HIDDEN, LAYERS)
    body = markdown_table(HEADERS, rows)
    body += (
        f"\n\nMLP 1024 x {LAYERS} + head ({n:,} parameters, {4 * n / 1e6:.1f} MB as fp32, "
        f"{wire_nbytes(n, BUCKET) / 1e6:.2f} MB as 1-bit at bucket {BUCKET}), "
        f"{WORKERS} workers, batch {args.batch} per worker, sync, 1 shard (unless the row "
        "says 2), plain SGD, CPU, bucketMB 25 (1-bit parts pushed during backward; *after "
        "backward*: bucketMB 0), "
        "torch threads 1 per process. *samples/s*, *step ms*: the timed steps after the "
        f"warm-up in every row (start-up excluded alike), median of {args.rounds} interleaved "
        "rounds (*min-max*: samples/s over the rounds). *x sgdjob fp32*, *x DDP*: samples/s "
        "over that row's on the same link. *sent MB/step/worker*: the shard's received-bytes "
        "counter over workers x steps (headers, hello and reports included; with 2 shards, "
        "shard 0's times 2); *received*: "
        "worker 1's received-bytes counter less its first pull (the full fp32 vector every "
        "variant starts from) over the other steps. DDP (not counted by gloo): a 2-rank "
        "ring all-reduce sends and receives "
        f"{4 * n / 1e6:.1f} MB per rank per step."
        "\n\nveth rows: the shard in one namespace, both workers in the other, tc tbf at the "
        "given rate in each direction; DDP rank 0 and rank 1 on either side. The shard side "
        "carries both workers' traffic (2 x the per-worker column), DDP's link one rank's."
    )
    for rate in args.rates:
        body += f"\n\n{link_floor(rate, n)}"
    for note in notes:
        body += f"\n\n{note}"
    title = "bench/compression end to end: sync fp32 vs 1-bit vs torch DDP, loopback and veth"
    write_result("compression_e2e", title, body)
    return body


if __name__ == "__main__":
    main(sys.argv[1:])
