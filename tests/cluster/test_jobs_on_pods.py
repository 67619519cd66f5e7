"""SGDJobs trained end to end on real pods: kubectl apply, the operator pod, the kubelet.

Each job runs its shards and workers as pods from the trainer image on the node; nothing is
faked. On two shared cores a job takes minutes, so the runs keep the examples' small step
counts and tests only add steps (or slow workers down) where they must interrupt a run.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.cluster.node import EXAMPLES, Node, example

# A job is minutes of real pods on two shared cores (the default per-test limit is 300 s).
pytestmark = pytest.mark.timeout(1800)

MODE_EXAMPLES = [
    "digits-backup",
    "digits-async-zhang",
    "digits-async-odena",
    "digits-downpour",
    "digits-onebit",
]


def test_digits_sync_with_a_claim_succeeds_and_leaves_its_model_on_the_claim(
    node: Node, namespace: str
) -> None:
    # The claim's local volume is a root-owned 0755 directory: only fsGroup lets uid 10001
    # write there.
    node.claim(namespace, "out")
    node.apply(namespace, example("digits-sync", kubernetes={"outputClaimName": "out"}))
    st = node.wait_phase(namespace, "digits-sync", "Succeeded")
    assert st["accuracy"] >= 0.93 and st["loss"] > 0
    # The last step, from worker 0's termination message, even if the last poll came earlier.
    assert st["step"] == st["totalSteps"] == 300
    table = node.kubectl("-n", namespace, "get", "sgdj", "-o", "wide")
    header, row = table.splitlines()[:2]
    assert "LOSS" in header and "ACCURACY" in header
    assert "Succeeded" in row and str(st["accuracy"])[:4] in row
    uid = node.kubectl(
        "-n", namespace, "get", "sgdj", "digits-sync", "-o", "jsonpath={.metadata.uid}"
    )
    out = node.claim_dir(namespace, "out") / "digits-sync" / uid.strip()  # this run's directory
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "sync" and summary["finalAccuracy"] >= 0.93
    state = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    assert {tuple(v.shape) for v in state.values()} >= {(64, 64), (10, 64)}


@pytest.mark.parametrize("name", MODE_EXAMPLES)
def test_every_mode_example_succeeds_on_pods_with_high_test_accuracy(
    node: Node, namespace: str, name: str
) -> None:
    node.apply_file(namespace, EXAMPLES / f"{name}.yaml")
    job = example(name)["metadata"]["name"]
    st = node.wait_phase(namespace, job, "Succeeded")
    assert st["accuracy"] >= 0.93, st
