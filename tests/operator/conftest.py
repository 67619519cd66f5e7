"""Fixtures: KMock with the SGDJob resource declared, and a test-side client of it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import kmock
import pytest

from tests.operator.harness import Cluster, declare_resources


@pytest.fixture()
def k8s(kmock: kmock.KubernetesEmulator) -> kmock.KubernetesEmulator:
    declare_resources(kmock)
    return kmock


@pytest.fixture()
async def cluster(k8s: kmock.KubernetesEmulator) -> AsyncIterator[Cluster]:
    # A fresh connection per request: a kept-alive one to KMock was seen to hang.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        yield Cluster(k8s, session)
