"""The bearer token Kopf's login hands on, from every way the kubernetes client files it."""

from __future__ import annotations

import pytest
from kubernetes import client

from sgdjob_operator.kube import bearer_token


@pytest.mark.parametrize("key", ["BearerToken", "authorization"])
def test_the_token_is_found_under_the_in_cluster_and_the_token_file_keys(key: str) -> None:
    # "BearerToken" is where load_incluster_config puts it: missing it made the operator's pod
    # connect as system:anonymous.
    cfg = client.Configuration()
    cfg.api_key = {key: "bearer abc.def"}
    assert bearer_token(cfg) == "abc.def"


def test_no_token_is_none() -> None:
    assert bearer_token(client.Configuration()) is None
