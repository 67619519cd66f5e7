"""The update rules a shard applies to its slice: torch's own SGD, Adam and AdamW.

Every rule is elementwise, so a shard can run it on its contiguous slice alone: the slice's
trainable elements are one ``torch.nn.Parameter`` sharing memory with the shard's numpy
vector, stepped by a ``torch.optim`` optimizer (torch's fused kernels), which makes the
arithmetic torch's by construction. Optimizer state (SGD's momentum buffer, Adam's
two moments) lives in float32 vectors of the slice's length that torch uses in place, so a
checkpoint saves them as they are; Adam's step count goes into the checkpoint header.

Elements past ``trainable`` are non-trainable buffers (``sgdjob.models.flat``): their
"gradient" is the (averaged) change the workers' forward passes made, added as it is, with no
learning rate, momentum or weight decay.

The staleness rules' factor scales the scheduled rate: for SGD it multiplies the gradient
before momentum (the learning rate of that one gradient, which also allows Odena's
per-element factor); for Adam/AdamW, which normalise the gradient away, it multiplies ``lr``.

With ``compression.send: updates`` the rule runs on the workers instead (``LocalUpdate``: each
worker steps its own copy of the optimizer state with its own gradient and sends the step it
would take), and the shard only applies the workers' average (``AppliedUpdates``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sgdjob.api.types import TrainingSpec

STATE_ARRAYS = {"sgd": {"momentum_buffer": "momentum"}}
ADAM_ARRAYS = {"exp_avg": "expAvg", "exp_avg_sq": "expAvgSq"}


def fused_kernels(spec: TrainingSpec) -> bool:
    """Whether the rule runs on torch's fused kernels: all but plain SGD, which is one pass
    either way and where the single-tensor ``add_`` is the faster (bench.update_rule); both
    give the same bits there."""
    return spec.optimizer != "sgd" or bool(spec.momentum or spec.weight_decay)


def torch_optimizer(
    param: torch.nn.Parameter, spec: TrainingSpec, *, fused: bool | None = None
) -> torch.optim.Optimizer:
    """torch's own optimizer for ``spec.optimizer`` over one flat parameter, with torch's
    fused kernels (CPU and CUDA, torch >= 2.4) where ``fused_kernels`` says so: one pass over
    the slice a step, where the single-tensor kernels make three to eight and allocate
    temporaries the size of the slice (1.7-7x the time on a 10M-element slice). The kernels
    are elementwise and give the same bits however a vector is cut, so a slice, a whole
    vector and a worker's copy step alike. ``fused`` overrides the choice (the bench's
    baseline)."""
    kernels = {"fused": True} if (fused_kernels(spec) if fused is None else fused) else {}
    if spec.optimizer == "sgd":
        return torch.optim.SGD(
            [param],
            lr=spec.lr,
            momentum=spec.momentum,
            nesterov=spec.nesterov,
            weight_decay=spec.weight_decay,
            foreach=False,
            **kernels,
        )
    cls = torch.optim.Adam if spec.optimizer == "adam" else torch.optim.AdamW
    return cls(
        [param],
        lr=spec.lr,
        betas=(spec.beta1, spec.beta2),
        eps=spec.eps,
        weight_decay=spec.weight_decay,
        foreach=False,
        **kernels,
    )


class SliceOptimizer:
    """One slice's update rule and its state; ``params`` is updated in place."""

    def __init__(self, params: np.ndarray, *, trainable: int, spec: TrainingSpec) -> None:
        if params.dtype != np.float32 or params.ndim != 1:
            raise ValueError("a slice is a 1-D float32 vector")
        self.params = params
        self.count = params.shape[0]
        self.trainable = max(0, min(self.count, trainable))
        self.kind = spec.optimizer
        t = self.trainable
        self.param = torch.nn.Parameter(torch.from_numpy(params[:t]))
        names = STATE_ARRAYS["sgd"] if self.kind == "sgd" else ADAM_ARRAYS
        self.arrays = {key: np.zeros(self.count, dtype=np.float32) for key in names.values()}
        self._scratch = np.empty(t, dtype=np.float32)
        self.opt = torch_optimizer(self.param, spec)
        if self.kind == "sgd":
            if spec.momentum:
                state = self.opt.state[self.param]
                state["momentum_buffer"] = torch.from_numpy(self.arrays["momentum"][:t])
        else:
            state = self.opt.state[self.param]
            state["step"] = torch.tensor(0.0)
            for key, name in ADAM_ARRAYS.items():
                state[key] = torch.from_numpy(self.arrays[name][:t])

    @property
    def steps(self) -> int:
        if self.kind == "sgd":
            return 0
        return int(self.opt.state[self.param]["step"])

    def step(self, grad: np.ndarray, *, lr: float, scale: float | np.ndarray = 1.0) -> None:
        """Apply one (averaged) gradient of the whole slice."""
        if grad.shape != (self.count,):
            raise ValueError(f"gradient of {grad.shape}, slice holds {self.count}")
        t = self.trainable
        if t:
            g = grad[:t]
            group = self.opt.param_groups[0]
            if self.kind == "sgd":
                if isinstance(scale, np.ndarray):
                    np.multiply(g, scale[:t], out=self._scratch)
                    g = self._scratch
                elif scale != 1.0:
                    np.multiply(g, scale, out=self._scratch)
                    g = self._scratch
                group["lr"] = lr
            else:
                if np.ndim(scale) != 0:
                    raise ValueError("Adam takes a scalar staleness factor only")
                group["lr"] = lr * float(scale)
            self.param.grad = torch.from_numpy(g if g.flags.writeable else g.copy())
            self.opt.step()
            self.param.grad = None
        if t < self.count:
            self.params[t:] += grad[t:]

    def state_arrays(self) -> dict[str, np.ndarray]:
        return dict(self.arrays)

    def state_extra(self) -> dict[str, Any]:
        return {"optimizer": self.kind, "optimizerSteps": self.steps}

    def load_state(self, arrays: dict[str, np.ndarray], extra: dict[str, Any]) -> None:
        """Restore from a checkpoint of the same optimizer; missing moments stay zero."""
        saved = extra.get("optimizer", "sgd")
        if saved != self.kind:
            raise ValueError(f"the checkpoint holds {saved} state, the job uses {self.kind}")
        for name, arr in self.arrays.items():
            if name in arrays:
                np.copyto(arr, arrays[name])
        if self.kind != "sgd":
            self.opt.state[self.param]["step"].fill_(float(extra.get("optimizerSteps", 0)))


WORKER_RULE = "workers"  # what a checkpoint of an AppliedUpdates slice says its optimizer is


class AppliedUpdates:
    """A shard's rule with ``compression.send: updates``: the averaged push is the step the
    workers' own optimizers took, subtracted as it is (buffers' changes added as ever).

    The optimizer state lives on the workers (``LocalUpdate``), so a checkpoint holds the
    parameters only; the learning rate was applied by the workers too."""

    def __init__(self, params: np.ndarray, *, trainable: int) -> None:
        if params.dtype != np.float32 or params.ndim != 1:
            raise ValueError("a slice is a 1-D float32 vector")
        self.params = params
        self.count = params.shape[0]
        self.trainable = max(0, min(self.count, trainable))

    def step(self, grad: np.ndarray, *, lr: float, scale: float | np.ndarray = 1.0) -> None:
        """Apply one averaged update of the whole slice (``lr`` is the workers' business)."""
        if grad.shape != (self.count,):
            raise ValueError(f"update of {grad.shape}, slice holds {self.count}")
        if np.ndim(scale) != 0 or scale != 1.0:
            raise ValueError("workers' updates take no staleness factor (sync mode only)")
        t = self.trainable
        self.params[:t] -= grad[:t]
        self.params[t:] += grad[t:]

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {}

    def state_extra(self) -> dict[str, Any]:
        return {"optimizer": WORKER_RULE, "optimizerSteps": 0}

    def load_state(self, arrays: dict[str, np.ndarray], extra: dict[str, Any]) -> None:
        saved = extra.get("optimizer", "sgd")
        if saved != WORKER_RULE:
            raise ValueError(
                f"the checkpoint holds {saved} state, the job sends the workers' updates"
            )


class LocalUpdate:
    """A worker's own optimizer with ``compression.send: updates``.

    ``apply`` turns the gradient in ``grads[:trainable]`` into the descent ``params - params'``
    that torch's optimizer takes from the worker's current parameters, in place, so that the
    push (1-bit, with error feedback) carries the step rather than the gradient. The state
    (momentum, Adam's moments) stays on the worker's device beside its parameters."""

    def __init__(
        self, *, trainable: int, spec: TrainingSpec, device: torch.device | str = "cpu"
    ) -> None:
        self.trainable = trainable
        self.param = torch.nn.Parameter(torch.zeros(trainable, device=device))
        self.opt = torch_optimizer(self.param, spec)

    def apply(self, params: torch.Tensor, grads: torch.Tensor, *, lr: float) -> None:
        t = self.trainable
        if not t:
            return
        with torch.no_grad():
            self.param.copy_(params[:t])
        self.param.grad = grads[:t]
        self.opt.param_groups[0]["lr"] = lr
        self.opt.step()
        self.param.grad = None
        with torch.no_grad():
            torch.sub(params[:t], self.param, out=grads[:t])
