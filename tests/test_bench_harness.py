"""Tests for the benchmark harness: the DDP baseline, the shaped veth namespaces, split jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from bench.common import job, mlp_workload, steady_rate
from bench.ddp import free_port, mlp_params, run_ddp
from bench.netns import NetnsUnavailable, in_netns, rate_bits_per_s, veth_link
from bench.splitjob import SplitJobError, run_split_job

from sgdjob.api.validation import parse_job
from sgdjob.data import data_shapes
from sgdjob.models import build_model, parameter_count


def own_children() -> set[int]:
    """This process's children, running or zombie (from /proc).

    Not ``os.waitpid(-1, WNOHANG)``: children that other tests started on purpose and that
    live as long as pytest (multiprocessing's resource tracker) would count too."""
    me, found = os.getpid(), set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # it exited meanwhile
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == me:  # the field after the state: ppid
            found.add(int(entry.name))
    return found


def test_ddp_trains_two_ranks_on_loopback_and_reports_samples_per_second() -> None:
    r = run_ddp(
        workers=2, hidden=16, layers=2, batch=4, steps=3, master_addr="127.0.0.1", port=free_port()
    )
    assert r["workers"] == 2 and r["steps"] == 3 and r["link"] == "loopback"
    assert r["params"] == mlp_params(16, 2)
    assert isinstance(r["samples_per_s"], float) and r["samples_per_s"] > 0


def test_a_rank_that_runs_past_the_timeout_is_killed_and_reaped() -> None:
    before = own_children()
    with pytest.raises(ValueError, match="netns has 1 entries for 2 workers"):
        run_ddp(
            workers=2, hidden=8, layers=1, batch=2, steps=1, master_addr="127.0.0.1",
            port=free_port(), netns=[None],
        )  # fmt: skip
    with pytest.raises(RuntimeError, match="did not finish"):
        run_ddp(
            workers=2, hidden=8, layers=1, batch=2, steps=10**9, master_addr="127.0.0.1",
            port=free_port(), timeout_s=8,
        )  # fmt: skip
    # Every rank was waited for: no child of this test is left, running or zombie.
    assert own_children() <= before


def test_rates_parse_in_tc_units_and_reject_anything_else() -> None:
    assert rate_bits_per_s("1gbit") == 10**9
    assert rate_bits_per_s("10gbit") == 10**10
    assert rate_bits_per_s("250mbit") == 250 * 10**6
    with pytest.raises(ValueError):
        rate_bits_per_s("1GB/s")
    assert in_netns(None, ["true"]) == ["true"]
    assert in_netns("x", ["true"]) == ["ip", "netns", "exec", "x", "true"]


_SERVER = """
import socket, sys
srv = socket.create_server((sys.argv[1], 5201))
print("ready", flush=True)
conn, _ = srv.accept()
n = 0
while chunk := conn.recv(1 << 16):
    n += len(chunk)
conn.sendall(str(n).encode())
"""

_CLIENT = """
import socket, sys, time
payload = b"x" * int(sys.argv[2])
s = socket.create_connection((sys.argv[1], 5201), timeout=20)
t0 = time.perf_counter()
s.sendall(payload)
s.shutdown(socket.SHUT_WR)
got = s.recv(64)
print(got.decode(), time.perf_counter() - t0)
"""


@pytest.mark.netns
def test_the_namespaces_talk_across_the_veth_at_no_more_than_the_shaped_rate() -> None:
    nbytes = 8_000_000
    try:
        with veth_link("100mbit") as link:
            server = subprocess.Popen(
                in_netns(link.ns[1], [sys.executable, "-c", _SERVER, link.addrs[1]]),
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            try:
                assert server.stdout is not None and server.stdout.readline().strip() == "ready"
                client = [sys.executable, "-c", _CLIENT, link.addrs[1], str(nbytes)]
                out = subprocess.run(
                    in_netns(link.ns[0], client), capture_output=True, text=True, timeout=60,
                    check=True,
                ).stdout.split()  # fmt: skip
            finally:
                server.kill()
                server.wait()
            # The caller's namespace has no route to the test subnet: traffic stayed inside.
            assert (
                "10.99.0."
                not in subprocess.run(
                    ["ip", "-4", "addr"], capture_output=True, text=True, check=True
                ).stdout
            )
    except NetnsUnavailable as exc:
        pytest.skip(f"skipped: {exc}")
    received, seconds = int(out[0]), float(out[1])
    assert received == nbytes
    # 8 MB at 100 Mbit/s takes >= 0.6 s (less the 512 KiB bucket); unshaped veth takes ~10 ms.
    assert nbytes * 8 / seconds < 1.3 * 100e6, f"{nbytes * 8 / seconds / 1e6:.0f} Mbit/s"
    ns_after = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert link.ns[0] not in ns_after and link.ns[1] not in ns_after


def _tiny_job(steps: int) -> dict[str, object]:
    spec = mlp_workload(hidden=16, layers=2, batch=8, steps=steps, workers=2, shards=1)
    return job("harness", spec)


def test_the_workload_is_the_ddp_model_and_the_steady_window_skips_the_warm_up(
    tmp_path: Path,
) -> None:
    spec = parse_job(_tiny_job(5)).spec
    dims = data_shapes(spec.data, seed=0)
    model = build_model(
        spec.model, input_shape=dims.input_shape, num_classes=dims.num_classes, seed=0
    )
    assert parameter_count(model) == mlp_params(16, 2)
    lines = [
        {"kind": "train", "version": 0, "time": 1.0},
        {"kind": "eval", "version": 1, "time": 1.5},
        {"kind": "train", "version": 2, "time": 2.0},
        {"kind": "train", "version": 3, "time": 3.0},
        {"kind": "train", "version": 3, "time": 3.5},  # repeated version: first time counts
        {"kind": "train", "version": 6, "time": 5.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    rate = steady_rate(tmp_path, warmup=3, workers=2, batch=8)
    assert (rate.first, rate.last, rate.seconds) == (3, 6, 2.0)
    assert rate.samples_per_s == 2 * 8 * 3 / 2.0 and rate.step_ms == 2000 / 3
    with pytest.raises(RuntimeError, match="past warm-up"):
        steady_rate(tmp_path, warmup=7, workers=2, batch=8)


def test_a_split_job_on_loopback_trains_to_the_end_and_leaves_no_process(tmp_path: Path) -> None:
    before = own_children()
    summary = run_split_job(_tiny_job(6), tmp_path, timeout_s=120)
    assert summary["version"] == 6 and summary["samples"] == 2 * 6 * 8
    assert steady_rate(tmp_path, warmup=2, workers=2, batch=8).last == 6
    assert (tmp_path / "model.pt").exists()
    assert own_children() <= before


def test_a_split_job_whose_shard_dies_fails_naming_it_and_kills_the_rest(tmp_path: Path) -> None:
    doc = _tiny_job(10**6)
    before = own_children()
    with pytest.raises(SplitJobError, match="ps-0 exited"):
        # Binding an address this host does not have makes the shard exit before it is ready.
        run_split_job(doc, tmp_path, shard_host="192.0.2.1", timeout_s=60)
    assert own_children() <= before


@pytest.mark.netns
def test_a_split_job_trains_across_the_namespaces(tmp_path: Path) -> None:
    try:
        with veth_link("1gbit") as link:
            summary = run_split_job(
                _tiny_job(4),
                tmp_path,
                shard_ns=link.ns[0],
                worker_ns=link.ns[1],
                shard_host=link.addrs[0],
                timeout_s=120,
            )
    except NetnsUnavailable as exc:
        pytest.skip(f"skipped: {exc}")
    assert summary["version"] == 4
    ready = json.loads((tmp_path / ".sgdjob" / "ready-0.json").read_text())
    assert ready["endpoint"].startswith(f"tcp://{link.addrs[0]}:")


def test_the_curve_bench_times_the_libsodium_libzmq_uses_and_its_boxes_open() -> None:
    import ctypes

    import zmq
    from bench.curve import FRAME, ZEROBYTES, find_libsodium, measure

    if not zmq.has("curve"):
        pytest.skip("this libzmq has no CURVE")
    lib = find_libsodium()
    assert lib is not None
    rates = measure(lib)  # opens every box it sealed, or raises
    assert all(r > 0 for r in rates.values())
    # A flipped bit in the box is refused: what is timed is authenticated decryption.
    n = ZEROBYTES + FRAME
    plain, box, out = (ctypes.create_string_buffer(n) for _ in range(3))
    key, nonce, size = ctypes.create_string_buffer(32), ctypes.create_string_buffer(24), n
    assert lib.crypto_box_afternm(box, plain, ctypes.c_ulonglong(size), nonce, key) == 0
    box[100] = bytes([box.raw[100] ^ 1])
    assert lib.crypto_box_open_afternm(out, box, ctypes.c_ulonglong(size), nonce, key) != 0


def test_the_update_rule_bench_times_both_kernels_of_every_setting_and_they_agree() -> None:
    from bench.update_rule import SETTINGS, measure

    rows = measure(4099, 2)  # an odd length: the kernels' vector tails are timed too
    assert [r[0] for r in rows] == [label for label, _ in SETTINGS]
    assert all(float(r[3]) > 0 and float(r[4]) > 0 for r in rows)  # speed-up, GB/s
