"""The gradient-compression choices of the DDP baselines: which communication hook a rank uses.

A user who wants DDP to move fewer bytes has two stock options in torch, and the benches
compare sgdjob against both as well as against plain fp32 DDP:

- ``none``: no hook, DDP's own fp32 all-reduce of the gradient buckets;
- ``fp16``: ``default_hooks.fp16_compress_hook``, buckets cast to fp16 for the all-reduce
  (half the bytes) and back;
- ``powersgd-r<k>``: ``powerSGD_hook.powerSGD_hook`` with ``matrix_approximation_rank=k``
  (the benches use k = 1 and 4), error feedback and warm start on (torch's defaults).

PowerSGD runs a plain all-reduce for its first ``start_powerSGD_iter`` steps (torch's default
is 1,000, longer than any bench here). The benches set it to ``POWERSGD_START_ITER`` = 2, the
smallest value torch accepts with error feedback or warm start on, so every timed step of a
throughput run (after at least 2 warm-up steps) is compressed and a time-to-accuracy run is
compressed from its third step: the most favourable setting for PowerSGD's speed; torch
recommends a longer plain warm-up for accuracy, which would only make it slower here.
"""

from __future__ import annotations

import re
from typing import Any

HOOKS = ("none", "fp16", "powersgd-r1", "powersgd-r4")  # the ones the benches run
POWERSGD_START_ITER = 2
_POWERSGD = re.compile(r"powersgd-r([1-9][0-9]*)")


def validate_hook(name: str, *, field: str = "hook") -> str:
    """``name`` if it is ``none``, ``fp16`` or ``powersgd-r<rank>`` (rank >= 1), else ValueError."""
    if name in ("none", "fp16") or _POWERSGD.fullmatch(name):
        return name
    raise ValueError(f"{field} must be none, fp16 or powersgd-r<rank> (rank >= 1); got {name!r}")


def powersgd_rank(name: str) -> int | None:
    """The matrix approximation rank of a ``powersgd-r<k>`` hook, None for the others."""
    m = _POWERSGD.fullmatch(validate_hook(name))
    return int(m.group(1)) if m else None


def min_warmup(name: str) -> int:
    """Untimed steps a throughput run needs so that its timed steps all use the hook."""
    return POWERSGD_START_ITER if powersgd_rank(name) is not None else 0


def label(name: str) -> str:
    """The table name of the DDP variant using hook ``name``."""
    rank = powersgd_rank(name)
    if rank is not None:
        return f"torch DDP (gloo), PowerSGD rank {rank}"
    return "torch DDP (gloo)" if name == "none" else "torch DDP (gloo), fp16 hook"


def bucket_cap_mb(name: str) -> float:
    """DDP's ``bucket_cap_mb`` for hook ``name``: torch's 25, except one bucket for PowerSGD.

    PowerSGD issues two all-reduces per bucket (P, then Q) from future callbacks. gloo matches
    collectives by issue order, and with several buckets the two ranks' callbacks interleave
    differently: gloo then aborts with "Received data size doesn't match expected size"
    (seen here on the 10-layer MLP, rank 1). With one bucket the order is the same on every
    rank; PowerSGD loses DDP's overlap of buckets with backward, which matters little when
    its compressed messages are a few hundred KB.
    """
    return 1024.0 if powersgd_rank(name) is not None else 25.0


def wrap(model: Any, name: str) -> Any:
    """``model`` as a ``DistributedDataParallel`` with hook ``name`` and its bucket size."""
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model, bucket_cap_mb=bucket_cap_mb(name))
    register(ddp, name)
    return ddp


def register(model: Any, name: str) -> None:
    """Register hook ``name`` on a ``DistributedDataParallel`` model (nothing for ``none``)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    rank = powersgd_rank(name)
    if rank is not None:
        state = powerSGD_hook.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=rank,
            start_powerSGD_iter=POWERSGD_START_ITER,
            use_error_feedback=True,
            warm_start=True,
        )
        model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    elif name == "fp16":
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
