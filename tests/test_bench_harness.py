"""Tests for the benchmark harness: the DDP baseline launcher and the shaped veth namespaces."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from bench.ddp import free_port, mlp_params, run_ddp
from bench.netns import NetnsUnavailable, in_netns, rate_bits_per_s, veth_link


def test_ddp_trains_two_ranks_on_loopback_and_reports_samples_per_second() -> None:
    r = run_ddp(
        workers=2, hidden=16, layers=2, batch=4, steps=3, master_addr="127.0.0.1", port=free_port()
    )
    assert r["workers"] == 2 and r["steps"] == 3 and r["link"] == "loopback"
    assert r["params"] == mlp_params(16, 2)
    assert isinstance(r["samples_per_s"], float) and r["samples_per_s"] > 0


def test_a_rank_that_runs_past_the_timeout_is_killed_and_reaped() -> None:
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
    # Every rank was waited for: this process has no child left, running or zombie.
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)


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
