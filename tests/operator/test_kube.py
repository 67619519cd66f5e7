"""The operator's credentials: every source yields the token it holds, read again on change."""

from __future__ import annotations

from pathlib import Path

import yaml

from sgdjob_operator.kube import Credentials, api_configuration, bearer_token


def test_a_kubeconfig_token_reaches_the_client_and_kopfs_login(tmp_path: Path) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443"}}],
                "users": [{"name": "u", "user": {"token": "abc123"}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "c",
            }
        )
    )
    cfg = api_configuration(Credentials(kubeconfig=str(path)))
    assert cfg.host == "https://127.0.0.1:6443"
    assert bearer_token(cfg) == "abc123"


def test_a_token_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first\n")
    cfg = api_configuration(
        Credentials(server="https://127.0.0.1:6443", token_file=str(token), ca_path=None)
    )
    assert bearer_token(cfg) == "first"
    token.write_text("second-and-longer\n")
    assert bearer_token(cfg) == "second-and-longer"
    assert cfg.auth_settings()["BearerToken"]["value"] == "Bearer second-and-longer"
