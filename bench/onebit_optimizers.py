"""Why 1-bit gradients and Adam on the shard do not mix, and what would: a study in one process.

The time-to-accuracy bench found that sgdjob's 1-bit compression (Seide et al.'s sign
quantisation with error feedback) never trains the deep MLP when the shard runs Adam. This
bench isolates the arithmetic from the system: one process plays both workers and the shard,
on real Fashion-MNIST, with sgdjob's own codec (``sgdjob.compression.ErrorFeedback`` and
``decode_into``, bucket 512) and torch's own ``Adam``. Same initial weights, same batches,
same steps for every row:

- ``fp32, Adam on the shard``: sync Adam on the averaged gradient (what a float32 job does);
- ``1-bit gradients, Adam on the shard``: each worker sends its gradient 1-bit with error
  feedback, the shard averages the decoded gradients and runs Adam (``compression.send:
  gradients``, the default);
- ``1-bit updates, Adam on each worker``: each worker runs Adam on its own gradient and sends
  the resulting update 1-bit with error feedback; the shard adds the averaged update
  (``compression.send: updates``).

Error feedback keeps the *sum* of what was sent close to the sum of what was meant, so the
compressed quantity must enter the model linearly. Adam's division by the running second
moment is not linear: fed with decoded gradients it sees values the size of the bucket's mean
where the true gradient was small, and the residual a worker carries is scaled differently
from step to step. Compressing Adam's output instead (the third row) keeps the step linear in
what was sent. The system runs of both modes are in ``bench.time_to_accuracy`` and in
``tests/test_onebit_wire.py``; this bench shows the arithmetic alone.

``python -m bench.onebit_optimizers [--hidden 256 ...] [--steps 300]`` writes
``bench/results/onebit_optimizers.md``; about 20 s with the defaults, 6 min for the
10-layer 1024-wide MLP of the other benches.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from bench.report import markdown_table, write_result
from sgdjob.api.types import TrainingSpec
from sgdjob.compression import ErrorFeedback, decode_into
from sgdjob.optim import LocalUpdate, SliceOptimizer

WORKERS = 2
BATCH = 32
BUCKET = 512
LR = 1e-3
TRAIN_ITEMS = 20_000
EVAL_ITEMS = 2_000


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sgdjob.data.fashion_mnist import fashion_mnist

    d = fashion_mnist()

    def stack(ds: object, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*(ds[i] for i in range(n)), strict=True)  # type: ignore[index]
        return torch.stack(xs).flatten(1), torch.tensor([int(y) for y in ys])

    return (*stack(d.train, TRAIN_ITEMS), *stack(d.test, EVAL_ITEMS))


def _model(hidden: list[int]) -> torch.nn.Sequential:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    width = 28 * 28
    for h in hidden:
        layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
        width = h
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 10))


def _decoded(ef: ErrorFeedback, v: torch.Tensor) -> np.ndarray:
    """What the receiver reconstructs from one 1-bit message of ``v`` (error feedback on)."""
    enc = ef.encode(v.numpy())
    out = np.zeros(v.numel(), np.float32)
    decode_into(out, enc.bits, enc.scales, count=v.numel(), bucket_size=BUCKET)
    return out


def _mean_decoded(codecs: list[ErrorFeedback], gs: list[torch.Tensor]) -> np.ndarray:
    """The shard's average of the workers' 1-bit messages, each decoded in float32."""
    total = np.zeros(gs[0].numel(), np.float32)
    for ef, g in zip(codecs, gs, strict=True):
        total += _decoded(ef, g)
    return total / np.float32(WORKERS)


def run(
    variant: str,
    *,
    hidden: list[int],
    steps: int,
    data: tuple[torch.Tensor, ...],
    eval_every: int,
) -> list[float]:
    """Test accuracy every ``eval_every`` steps (and after the last) of one variant.

    The rules are sgdjob's own: the shard's ``SliceOptimizer`` over the whole vector, and each
    worker's ``LocalUpdate`` (``compression.send: updates``)."""
    xtr, ytr, xte, yte = data
    model = _model(hidden)
    params = list(model.parameters())
    x = torch.nn.utils.parameters_to_vector(params).detach().numpy().copy()
    n = x.shape[0]
    spec = TrainingSpec.model_validate({"maxSteps": steps, "optimizer": "adam", "lr": LR})
    shard = SliceOptimizer(x, trainable=n, spec=spec)
    local = [LocalUpdate(trainable=n, spec=spec) for _ in range(WORKERS)]
    codecs = [ErrorFeedback(n, BUCKET) for _ in range(WORKERS)]
    gen = torch.Generator().manual_seed(1)
    accuracy: list[float] = []

    def grad() -> torch.Tensor:
        idx = torch.randint(0, xtr.shape[0], (BATCH,), generator=gen)
        torch.nn.utils.vector_to_parameters(torch.from_numpy(x), params)
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
        return torch.cat([p.grad.flatten() for p in params])  # type: ignore[union-attr]

    for t in range(1, steps + 1):
        gs = [grad() for _ in range(WORKERS)]
        if variant == "fp32":
            shard.step((torch.stack(gs).sum(dim=0) / WORKERS).numpy(), lr=LR)
        elif variant == "onebit-grad":
            shard.step(_mean_decoded(codecs, gs), lr=LR)
        else:  # onebit-update: each worker's step, 1-bit; the shard subtracts the average
            for w, g in enumerate(gs):
                local[w].apply(torch.from_numpy(x), g, lr=LR)  # g becomes the descent
            x -= _mean_decoded(codecs, gs)
        if t % eval_every == 0 or t == steps:
            torch.nn.utils.vector_to_parameters(torch.from_numpy(x), params)
            with torch.no_grad():
                accuracy.append(float((model(xte).argmax(1) == yte).float().mean()))
    return accuracy


VARIANTS = {
    "fp32": "fp32, Adam on the shard",
    "onebit-grad": "1-bit gradients, Adam on the shard (send: gradients)",
    "onebit-update": "1-bit updates, Adam on each worker (send: updates)",
}


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="bench.onebit_optimizers", description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, nargs="+", default=[256] * 10)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=50)
    args = ap.parse_args([] if argv is None else argv)
    torch.set_num_threads(1)
    data = _data()
    rows = []
    for key, label in VARIANTS.items():
        t0 = time.perf_counter()
        acc = run(key, hidden=args.hidden, steps=args.steps, data=data, eval_every=args.eval_every)
        rows.append((label, *(f"{a:.3f}" for a in acc), f"{time.perf_counter() - t0:.0f}"))
        print(rows[-1], flush=True)
    marks = [*range(args.eval_every, args.steps + 1, args.eval_every)]
    if not marks or marks[-1] != args.steps:
        marks.append(args.steps)
    table = markdown_table(["variant", *(f"step {m}" for m in marks), "s"], rows)
    n_params = sum(p.numel() for p in _model(args.hidden).parameters())
    text = (
        f"{table}\n\nMLP 784 -> {' x '.join(map(str, args.hidden))} -> 10 ({n_params:,} "
        f"parameters), {WORKERS} workers x batch {BATCH}, Adam lr {LR}, 1-bit bucket {BUCKET} "
        f"with error feedback (sgdjob.compression); test accuracy on the first {EVAL_ITEMS} "
        "Fashion-MNIST test images. One process computes every worker's gradient in turn: the "
        "arithmetic of each scheme, not its speed."
    )
    write_result("onebit_optimizers", "bench/onebit_optimizers: 1-bit compression and Adam", text)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
