"""A KMock Kubernetes emulator in its own process, so the operator's RSS is measured alone.

Prints ``URL <url>`` on stdout once serving and stops when stdin closes.

KMock 0.8 keeps every request it served and matches each new one by scanning that history
(``request in view``), so its cost per request grows with the requests served: quadratic over a
500-job run, and the mock, not the operator, would be measured. This server forgets a request
once it has been answered (nothing here asserts on history); in-flight requests stay, so
matching is unchanged.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import kmock

JOBS = "sgdjob.dev/v1alpha1/sgdjobs"


class ForgetfulEmulator(kmock.KubernetesEmulator):
    """KMock's emulator without the ever-growing request history."""

    async def _handle(self, request: Any) -> Any:
        try:
            return await super()._handle(request)
        finally:
            history = self._requests  # private: KMock has no public way to forget requests
            for i in range(len(history) - 1, -1, -1):
                if history[i] is request:
                    del history[i]
                    break


async def serve() -> None:
    async with ForgetfulEmulator() as k, kmock.Server(k):
        k.resources.load_bundled()
        k.resources[JOBS] = kmock.ResourceInfo(
            kind="SGDJob",
            singular="sgdjob",
            namespaced=True,
            verbs={"list", "watch", "get", "create", "patch", "delete"},
            subresources={"status"},
        )
        print(f"URL {str(k.url).rstrip('/')}", flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)


if __name__ == "__main__":
    asyncio.run(serve())
