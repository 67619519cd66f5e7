"""Tests for the fair-baseline parts of the benches: DDP hooks, CPU per sample, time to accuracy."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from bench.common import job
from bench.cpu import CpuSample, cpu_per_1000, measured
from bench.ddp import free_port, run_ddp
from bench.ddp_hooks import HOOKS, label, min_warmup, powersgd_rank, validate_hook
from bench.ddp_train import check_mirrorable, run_ddp_job
from bench.loopback import LO_TX_BYTES, LoopbackSample, mb_per_step, tx_bytes
from bench.sync_vs_ddp import HEADERS as SYNC_HEADERS
from bench.sync_vs_ddp import summarize
from bench.time_to_accuracy import workload
from bench.tta import (
    HEADERS,
    Outcome,
    ddp_series,
    rows,
    series_rate,
    sgdjob_series,
    steps_to,
    time_to,
)


def test_hook_names_are_validated_and_name_their_field() -> None:
    assert [validate_hook(h) for h in HOOKS] == list(HOOKS)
    assert powersgd_rank("powersgd-r4") == 4 and powersgd_rank("fp16") is None
    assert min_warmup("powersgd-r1") == 2 and min_warmup("none") == 0
    assert label("none") == "torch DDP (gloo)"
    assert label("powersgd-r4") == "torch DDP (gloo), PowerSGD rank 4"
    for bad in ("powersgd", "powersgd-r0", "bf16", "FP16", ""):
        with pytest.raises(ValueError, match="hook must be none, fp16 or powersgd-r<rank>"):
            validate_hook(bad)


def test_a_powersgd_throughput_run_refuses_a_warm_up_that_would_time_plain_steps() -> None:
    with pytest.raises(ValueError, match=r"warmup=1: hook powersgd-r1 .* at least that"):
        run_ddp(
            workers=2, hidden=8, layers=1, batch=2, steps=1, warmup=1, master_addr="127.0.0.1",
            port=free_port(), hook="powersgd-r1",
        )  # fmt: skip


# Slow (make test-slow): five two-rank DDP runs, one per hook.
@pytest.mark.slow
def test_every_hook_trains_two_ranks_and_the_cpu_of_both_ranks_is_counted() -> None:
    for hook in HOOKS:

        def tiny(hook: str = hook) -> dict[str, object]:
            return run_ddp(
                workers=2, hidden=32, layers=2, batch=4, steps=2, warmup=2,
                master_addr="127.0.0.1", port=free_port(), hook=hook,
            )  # fmt: skip

        r, cpu_s = measured(tiny)
        assert r["hook"] == hook and r["steps"] == 2
        # Two interpreters that imported torch and trained cost well over 0.5 CPU s; the
        # bench process itself only waited.
        assert cpu_s > 0.5, (hook, cpu_s)
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)


def test_measured_counts_a_childs_cpu_and_not_its_own_sleep() -> None:
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    _, cpu_s = measured(lambda: subprocess.run([sys.executable, "-c", burn], check=True))
    assert cpu_s >= 0.3
    _, idle = measured(
        lambda: subprocess.run([sys.executable, "-c", "import time; time.sleep(0.5)"])
    )
    assert idle < 0.3


def test_cpu_per_1000_samples_cancels_what_both_lengths_share() -> None:
    # 20 s of start-up in both, then 0.004 CPU s per sample.
    short = CpuSample(cpu_s=20.0 + 0.004 * 1280, samples=1280)
    long = CpuSample(cpu_s=20.0 + 0.004 * 2560, samples=2560)
    assert cpu_per_1000(short, long) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="not more than the short run's 2560"):
        cpu_per_1000(long, long)
    # Noise larger than the difference shows as a negative figure, not a clamped one.
    assert cpu_per_1000(CpuSample(30.0, 100), CpuSample(29.0, 200)) == pytest.approx(-10.0)


def test_loopback_mb_per_step_cancels_what_both_lengths_share() -> None:
    # 300 MB of start-up in both runs, then 168 MB a step.
    short = LoopbackSample(tx_bytes=300_000_000 + 168_000_000 * 13, steps=13)
    long = LoopbackSample(tx_bytes=300_000_000 + 168_000_000 * 23, steps=23)
    assert mb_per_step(short, long) == pytest.approx(168.0)
    with pytest.raises(ValueError, match="not more than the short run's 23"):
        mb_per_step(long, long)


def test_the_loopback_counter_is_none_where_the_host_does_not_expose_it(tmp_path: Path) -> None:
    assert tx_bytes(tmp_path / "missing") is None
    (tmp_path / "garbled").write_text("not a number\n")
    assert tx_bytes(tmp_path / "garbled") is None
    (tmp_path / "counter").write_text("1234\n")
    assert tx_bytes(tmp_path / "counter") == 1234


@pytest.mark.skipif(tx_bytes() is None, reason=f"{LO_TX_BYTES} is not readable here")
def test_the_loopback_counter_grows_by_at_least_what_a_socket_sends_over_127_0_0_1() -> None:
    payload = b"x" * (4 << 20)
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        with client, peer:
            before = tx_bytes()
            assert before is not None
            got = 0

            def drain() -> None:
                nonlocal got
                while got < len(payload):
                    got += len(peer.recv(1 << 20))

            reader = threading.Thread(target=drain)
            reader.start()
            client.sendall(payload)
            reader.join(30)
            after = tx_bytes()
    assert got == len(payload)
    assert after is not None and after - before >= len(payload)


def test_sync_vs_ddp_rows_give_samples_and_cpu_ratios_to_plain_ddp() -> None:
    def run(sps: float) -> dict[str, float]:
        return {"samples_per_s": sps, "step_ms": 1e3 / sps, "whole_run": sps / 2, "wall_s": 9.0}

    results = {
        "sgdjob sync, 1 shard": [run(100.0), run(120.0), run(110.0)],
        label("none"): [run(200.0), run(220.0), run(210.0)],
        label("fp16"): [run(230.0)],
    }
    cpu = {"sgdjob sync, 1 shard": [6.0, 5.0, 7.0], label("none"): [4.0, 3.0, 5.0]}
    lo = {"sgdjob sync, 1 shard": [168.2, 168.4, 168.3], label("none"): [84.1]}
    table = summarize(results, cpu, lo)
    assert len(table[0]) == len(SYNC_HEADERS)
    sg, ddp, fp16 = table
    assert sg[0] == "sgdjob sync, 1 shard" and sg[2] == "110" and sg[3] == "100-120"
    assert sg[4] == f"{110 / 210:.2f}" and sg[5] == "6.000" and sg[6] == "1.50"
    assert sg[7] == "168.3" and sg[8] == "55"
    assert ddp[4] == "1.00" and ddp[6] == "1.00" and ddp[7] == "84.1" and ddp[8] == "-"
    assert fp16[4] == f"{230 / 210:.2f}" and fp16[5] == "-" and fp16[6] == "-"
    assert fp16[7] == "-"  # not measured: no figure rather than a wrong one


def test_the_sgdjob_series_is_timed_from_the_step_0_evaluation_and_leaves_the_final_out(
    tmp_path: Path,
) -> None:
    lines = [
        {"kind": "train", "version": 1, "time": 9.0},
        {"kind": "eval", "step": 0, "version": 1, "value": 0.1, "time": 10.0},
        {"kind": "eval", "step": 50, "version": 51, "value": 0.62, "time": 15.5},
        {"kind": "eval", "step": 100, "version": 101, "value": 0.81, "time": 21.0},
        {"kind": "eval", "step": 150, "version": 151, "value": 0.79, "time": 26.0},
        # The final evaluation on the whole test set: DDP's series has none, so it is left out.
        {"kind": "eval", "step": 200, "version": 200, "value": 0.95, "time": 31.0},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    series = sgdjob_series(path, steps=200)
    assert series == [(0, 0.0, 0.1), (50, 5.5, 0.62), (100, 11.0, 0.81), (150, 16.0, 0.79)]
    assert time_to(series, 0.8) == 11.0 and steps_to(series, 0.8) == 100
    assert time_to(series, 0.9) is None and steps_to(series, 0.9) is None
    assert series_rate(series, workers=2, batch=32) == pytest.approx(2 * 32 * 150 / 16.0)
    path.write_text(json.dumps(lines[2]) + "\n")
    with pytest.raises(ValueError, match="no evaluation at step 0"):
        sgdjob_series(path, steps=200)


def test_a_ddp_series_must_start_at_step_0_and_a_rate_needs_a_later_point() -> None:
    assert ddp_series([[0, 0.0, 0.1], [10, 2.0, 0.5]]) == [(0, 0.0, 0.1), (10, 2.0, 0.5)]
    with pytest.raises(ValueError, match="step-0 evaluation"):
        ddp_series([[10, 2.0, 0.5]])
    with pytest.raises(ValueError, match="after step 0"):
        series_rate([(0, 0.0, 0.1)], workers=2, batch=4)


def test_time_to_accuracy_rows_give_ratios_to_ddp_and_powersgd() -> None:
    ddp, pw = label("none"), label("powersgd-r4")
    outcomes = [
        Outcome("sgdjob 1-bit", 900.0, 30.0, 200, 0.812),
        Outcome(ddp, 300.0, 90.0, 200, 0.815),
        Outcome(pw, 600.0, 40.0, 225, 0.805),
        Outcome("slow", 100.0, None, None, 0.70),
    ]
    table = rows(outcomes, ddp=ddp, powersgd=pw)
    assert all(len(r) == len(HEADERS) for r in table)
    one = table[0]
    assert one[2] == "3.00" and one[3] == "30.0" and one[4] == 200
    assert one[5] == f"{30 / 90:.2f}" and one[6] == "0.75" and one[8] == "+0.7"
    assert table[3][3] == "not reached" and table[3][5] == "-" and table[3][8] == "-10.5"
    # Without the baselines in the run the ratios are left blank, not invented.
    assert rows(outcomes[:1], ddp=ddp, powersgd=pw)[0][2] == "-"


def test_the_ddp_baseline_refuses_a_spec_it_does_not_mirror() -> None:
    spec = workload("mlp", steps=10, eval_interval=5, eval_samples=100)
    check_mirrorable(job("x", spec))
    spec["training"]["mode"] = "async"
    with pytest.raises(ValueError, match=r"spec\.training\.mode must be 'sync'"):
        check_mirrorable(job("x", spec))
    with pytest.raises(ValueError, match="unknown model 'vit'"):
        workload("vit", steps=10, eval_interval=5, eval_samples=100)


def _fashion_available() -> bool:
    from sgdjob.data.images import FASHION_DIRS

    return any(Path(d).is_dir() for d in FASHION_DIRS) or "SGDJOB_FASHION_MNIST_DIR" in os.environ


@pytest.mark.skipif(not _fashion_available(), reason="Fashion-MNIST is not installed")
def test_ddp_on_fashion_mnist_evaluates_at_the_job_steps_and_reports_the_final_accuracy() -> None:
    spec = workload("mlp", steps=3, eval_interval=2, eval_samples=64)
    spec["model"]["hidden"] = [32, 32]
    r = run_ddp_job(
        job("tiny", spec), hook="powersgd-r1", master_addr="127.0.0.1", port=free_port()
    )
    steps = [int(e[0]) for e in r["evals"]]
    assert steps == [0, 2] and r["evals"][0][1] == 0.0 and r["evals"][1][1] > 0
    assert 0.0 <= r["final_accuracy"] <= 1.0 and r["hook"] == "powersgd-r1"
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)


@pytest.mark.skipif(not _fashion_available(), reason="Fashion-MNIST is not installed")
def test_the_onebit_optimizer_study_runs_each_scheme_from_the_same_start() -> None:
    from bench.onebit_optimizers import VARIANTS, _data, run

    data = _data()
    got = {v: run(v, hidden=[16], steps=5, data=data, eval_every=2) for v in VARIANTS}
    assert all(len(acc) == 3 and all(0.0 <= a <= 1.0 for a in acc) for acc in got.values())
    # Same weights and batches: the first step differs only by what the wire did to it.
    assert got["fp32"] != got["onebit-grad"]
