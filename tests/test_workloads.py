"""Real workloads through `sgdjob run`: a user's own CNN and Datasets, torch's arithmetic,
BatchNorm buffers, loader processes and mixed precision (real processes and sockets).

The model and the data at the top are written as a user would write them; trainer processes
import them as ``tests.test_workloads:user_cnn`` / ``:user_images`` (children run from the
repository root, where pytest runs).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler
from torch.utils.data import TensorDataset

from sgdjob.api.validation import parse_job
from sgdjob.data import gather, load_data, partition_for
from sgdjob.models import build_model
from sgdjob.worker import state_digest
from tests.conftest import job_doc

ROOT = Path(__file__).resolve().parent.parent


# --- what a user writes ----------------------------------------------------------------------
class UserCNN(nn.Module):
    """Two conv layers with BatchNorm over (1, 28, 28) images."""

    def __init__(self, num_classes: int, width: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(2 * width * 7 * 7, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def user_cnn(
    *, input_shape: tuple[int, ...], num_classes: int, width: int = 8, **_: Any
) -> nn.Module:
    assert input_shape == (1, 28, 28), input_shape
    return UserCNN(num_classes, width)


def user_images(*, seed: int, train: int = 768, test: int = 256) -> tuple[Any, Any]:
    """Noisy 28x28 images; the class (0..3) is the quadrant that holds a bright square."""
    g = torch.Generator().manual_seed(seed)

    def make(n: int) -> TensorDataset:
        y = torch.randint(0, 4, (n,), generator=g)
        x = 0.5 * torch.randn(n, 1, 28, 28, generator=g)
        for i, k in enumerate(y.tolist()):
            r, c = 3 + 14 * (k // 2), 3 + 14 * (k % 2)
            x[i, 0, r : r + 8, c : c + 8] += 1.5
        return TensorDataset(x, y)

    return make(train), make(test)


# --- jobs ------------------------------------------------------------------------------------
def user_job(name: str, **over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"entryPoint": "tests.test_workloads:user_cnn", "kwargs": {"width": 8}},
        "data": {"builtin": None, "entryPoint": "tests.test_workloads:user_images"},
        "training": {"maxSteps": 30, "batchSize": 32, "evalInterval": 10},
    }
    doc = job_doc(name, **base)
    doc["spec"]["model"].pop("builtin", None)
    doc["spec"]["model"].pop("hidden", None)
    doc["spec"]["data"].pop("builtin", None)
    for section, values in over.items():
        doc["spec"].setdefault(section, {}).update(values)
    return doc


def saved(out: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = torch.load(out / "model.pt", weights_only=True)
    return state


def assert_states_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k].float(), want[k].float(), rtol=1e-4, atol=1e-5, msg=k)


def torch_loop(doc: dict[str, Any], make_opt: Any, make_sched: Any = None) -> nn.Module:
    """One process, plain torch: the same model, batches, optimizer and schedule."""
    spec = parse_job(doc).spec
    t = spec.training
    data = load_data(spec.data, seed=t.seed)
    model = build_model(
        spec.model, input_shape=data.input_shape, num_classes=data.num_classes, seed=t.seed
    )
    opt = make_opt(model.parameters())
    sched = make_sched(opt) if make_sched else None
    part = partition_for(data.n_train, workers=1, index=0, batch_size=t.batch_size, seed=t.seed)
    for step in range(t.max_steps or 0):
        x, y = gather(data.train, torch.from_numpy(part.batch(step)))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if t.grad_clip_norm:
            nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip_norm)
        opt.step()
        if sched:
            sched.step()
    return model


@pytest.fixture(autouse=True)
def _from_the_repository_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # trainer children import tests.test_workloads from here


def test_a_users_own_cnn_and_tensor_dataset_pair_train_through_sgdjob_run(run_job: Any) -> None:
    doc = user_job("user-cnn", workers={"replicas": 2}, parameterServers={"shards": 2})
    summary, out = run_job(doc)
    assert summary["metric"] == "accuracy"
    assert summary["finalAccuracy"] >= 0.9
    state = saved(out)
    assert "features.1.running_mean" in state and "features.1.num_batches_tracked" in state
    assert int(state["features.1.num_batches_tracked"]) == 30


def test_sync_sgd_with_nesterov_and_clipping_matches_a_single_torch_process(
    run_job: Any,
) -> None:
    training = {
        "optimizer": "sgd",
        "lr": 0.05,
        "momentum": 0.9,
        "nesterov": True,
        "weightDecay": 0.001,
        "gradClipNorm": 1.0,
        "maxSteps": 25,
    }
    doc = user_job("same-sgd", training=training)
    _, out = run_job(doc)
    model = torch_loop(
        doc,
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.001),
    )
    assert_states_close(saved(out), model.state_dict())


def test_sync_adamw_with_warmup_and_cosine_matches_a_single_torch_process(run_job: Any) -> None:
    steps, warm = 30, 6
    training = {
        "optimizer": "adamw",
        "lr": 0.01,
        "weightDecay": 0.05,
        "momentum": 0.9,
        "maxSteps": steps,
        "schedule": {"kind": "cosine", "warmupSteps": warm, "warmupStartFactor": 0.1},
    }
    doc = user_job("same-adamw", training=training)
    _, out = run_job(doc)

    def sched(o: torch.optim.Optimizer) -> lr_scheduler.LRScheduler:
        return lr_scheduler.SequentialLR(
            o,
            [
                lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=warm),
                lr_scheduler.CosineAnnealingLR(o, T_max=steps - warm),
            ],
            milestones=[warm],
        )

    # The shards run torch's fused AdamW (sgdjob.optim), so the reference does too: the
    # biases in front of a batch norm get gradients of rounding noise only, which Adam scales
    # up to whole steps, so torch's own fused and single-tensor kernels part there by up to
    # 0.025 in 30 steps (elsewhere by about 1e-7).
    model = torch_loop(
        doc, lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.05, fused=True), sched
    )
    assert_states_close(saved(out), model.state_dict())


def averaged_buffers_reference(doc: dict[str, Any], workers: int) -> dict[str, torch.Tensor]:
    """Sync SGD by hand: every step all workers start from the same parameters and buffers;
    gradients are averaged, and so are the buffers the workers' forward passes produced."""
    spec = parse_job(doc).spec
    t = spec.training
    data = load_data(spec.data, seed=t.seed)
    master = build_model(
        spec.model, input_shape=data.input_shape, num_classes=data.num_classes, seed=t.seed
    )
    opt = torch.optim.SGD(master.parameters(), lr=t.lr, momentum=t.momentum)
    parts = [
        partition_for(data.n_train, workers=workers, index=i, batch_size=t.batch_size, seed=t.seed)
        for i in range(workers)
    ]
    for step in range(t.max_steps or 0):
        grads: list[list[torch.Tensor]] = []
        buffers: list[list[torch.Tensor]] = []
        for part in parts:
            replica = copy.deepcopy(master)
            x, y = gather(data.train, torch.from_numpy(part.batch(step)))
            nn.functional.cross_entropy(replica(x), y).backward()
            grads.append([p.grad.clone() for p in replica.parameters()])  # type: ignore[union-attr]
            buffers.append([b.detach().float().clone() for b in replica.buffers()])
        for i, p in enumerate(master.parameters()):
            p.grad = sum(g[i] for g in grads) / workers  # type: ignore[assignment]
        opt.step()
        with torch.no_grad():
            for i, b in enumerate(master.buffers()):
                delta = sum(w[i] - b.float() for w in buffers) / workers
                b.copy_((b.float() + delta).round() if not b.dtype.is_floating_point else b + delta)
    return master.state_dict()


def test_batchnorm_buffers_in_model_pt_are_the_average_over_the_workers(run_job: Any) -> None:
    doc = user_job(
        "bn-average",
        workers={"replicas": 2},
        parameterServers={"shards": 2},
        training={"maxSteps": 12, "lr": 0.05, "momentum": 0.9},
    )
    _, out = run_job(doc)
    got = saved(out)
    want = averaged_buffers_reference(doc, workers=2)
    assert_states_close(got, want)
    # ... and not what any one worker alone would have kept: the rule really averages.
    worker0 = user_job("w0", training={"maxSteps": 12})
    alone = averaged_buffers_reference(worker0, workers=1)
    assert not torch.allclose(got["features.1.running_var"], alone["features.1.running_var"])
    # Every worker ends holding exactly what model.pt holds, buffers included.
    digests = [final_digest(out / "logs" / f"worker-{i}.log") for i in range(2)]
    assert digests == [state_digest(got)] * 2


def final_digest(log: Path) -> str:
    found = re.findall(r"final model sha256 ([0-9a-f]{64})", log.read_text(encoding="utf-8"))
    assert len(found) == 1, f"{log}: {found}"
    return str(found[0])


def test_loader_processes_change_how_batches_are_built_not_which(run_job: Any) -> None:
    _, inline = run_job(user_job("inline", training={"maxSteps": 15}), subdir="inline")
    _, loaders = run_job(
        user_job("loaders", training={"maxSteps": 15}, data={"loaderWorkers": 2}),
        subdir="loaders",
    )
    a, b = saved(inline), saved(loaders)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_with_float32_on_the_wire_and_the_shards(
    run_job: Any, precision: str
) -> None:
    summary, out = run_job(
        job_doc(f"amp-{precision}", training={"precision": precision, "maxSteps": 60})
    )
    assert summary["finalAccuracy"] >= 0.8
    assert all(v.dtype in (torch.float32, torch.int64) for v in saved(out).values())


@pytest.mark.parametrize(
    "compression",
    [{"kind": "onebit"}, {"kind": "onebit", "serverToWorker": True, "bucketSize": 64}],
    ids=["1-bit pushes", "1-bit both ways"],
)
def test_a_batchnorm_model_with_1_bit_gradients_ends_with_the_same_buffers_on_every_worker(
    run_job: Any, compression: dict[str, Any]
) -> None:
    # Two shards: slice 0 holds parameters only ([bits, scales]), slice 1 ends in the
    # BatchNorm buffers (their float32 frames follow the 1-bit part: sgdjob.onebit_wire).
    doc = user_job(
        "onebit-bn",
        workers={"replicas": 2},
        parameterServers={"shards": 2},
        compression=compression,
        training={"maxSteps": 40},
    )
    summary, out = run_job(doc)
    assert summary["finalAccuracy"] >= 0.9
    assert not summary["rejectedMessages"]
    state = saved(out)
    assert all(bool(torch.isfinite(v.float()).all()) for v in state.values())
    assert float(state["features.1.running_var"].min()) > 0.0
    assert float(state["features.5.running_var"].min()) > 0.0
    # The shards averaged one count per step from each worker: the batches of all of them.
    assert int(state["features.1.num_batches_tracked"]) == 40
    # Every worker ends holding exactly what model.pt holds, buffers included.
    digests = [final_digest(out / "logs" / f"worker-{i}.log") for i in range(2)]
    assert digests == [state_digest(state)] * 2
