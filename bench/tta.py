"""The pure parts of the time-to-accuracy bench: evaluation series, targets, ratios, rows.

An evaluation series is a list of ``(step, seconds, accuracy)``: the parameters after
``step`` updates scored on the test items, ``seconds`` after the step-0 evaluation ended.
sgdjob's comes from shard 0's ``metrics.jsonl`` eval lines, DDP's from its rank 0
(``bench.ddp_train``); both systems evaluate at the same steps on the same items.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

Series = list[tuple[int, float, float]]


def sgdjob_series(metrics: Path, *, steps: int) -> Series:
    """The periodic eval lines of a metrics.jsonl, timed from the step-0 evaluation's line.

    Worker 0's final evaluation (on the whole test set, reported at step ``steps``) is left
    out: DDP's series holds only the periodic ones, on the same first items."""
    evals = []
    for line in metrics.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "eval" and int(rec["step"]) < steps:
            evals.append((int(rec["step"]), float(rec["time"]), float(rec["value"])))
    zero = [t for step, t, _ in evals if step == 0]
    if not zero:
        raise ValueError(f"{metrics} has no evaluation at step 0 to time from")
    return sorted((step, t - zero[0], acc) for step, t, acc in evals)


def ddp_series(evals: Sequence[Sequence[float]]) -> Series:
    """``bench.ddp_train``'s ``evals`` (already timed from the step-0 evaluation)."""
    out = [(int(e[0]), float(e[1]), float(e[2])) for e in evals]
    if not out or out[0][0] != 0:
        raise ValueError("a DDP series must start with its step-0 evaluation")
    return out


def time_to(series: Series, target: float) -> float | None:
    """Seconds until the first evaluation at or above ``target``; None if none reached it."""
    for _, seconds, acc in series:
        if acc >= target:
            return seconds
    return None


def steps_to(series: Series, target: float) -> int | None:
    """The step of that first evaluation."""
    for step, _, acc in series:
        if acc >= target:
            return step
    return None


def series_rate(series: Series, *, workers: int, batch: int) -> float:
    """Samples/s from the step-0 evaluation to the last one (evaluations included)."""
    last_step, last_s, _ = series[-1]
    if last_step <= 0 or last_s <= 0:
        raise ValueError("the series needs an evaluation after step 0 to give a rate")
    return workers * batch * last_step / last_s


@dataclass(frozen=True)
class Outcome:
    """One system's run."""

    name: str
    samples_per_s: float
    tta_s: float | None  # None: the target was not reached within the run
    tta_step: int | None
    final_accuracy: float


def ratio(x: float | None, ref: float | None) -> str:
    if x is None or ref is None or ref == 0 or math.isnan(x) or math.isnan(ref):
        return "-"
    return f"{x / ref:.2f}"


def rows(outcomes: Sequence[Outcome], *, ddp: str, powersgd: str) -> list[list[object]]:
    """Table rows with ratios to the DDP fp32 and PowerSGD rows named ``ddp``, ``powersgd``.

    *x DDP fp32* is samples/s over DDP's (higher is better); *TTA / ...* is seconds to the
    target over that baseline's (lower is better; "-" when either never reached it); the
    final accuracy is also given as points above (+) or below (-) PowerSGD's.
    """
    by = {o.name: o for o in outcomes}
    base, pw = by.get(ddp), by.get(powersgd)
    out: list[list[object]] = []
    for o in outcomes:
        out.append(
            [
                o.name,
                f"{o.samples_per_s:.0f}",
                ratio(o.samples_per_s, base.samples_per_s if base else None),
                "not reached" if o.tta_s is None else f"{o.tta_s:.1f}",
                "-" if o.tta_step is None else o.tta_step,
                ratio(o.tta_s, base.tta_s if base else None),
                ratio(o.tta_s, pw.tta_s if pw else None),
                f"{o.final_accuracy:.4f}",
                "-" if pw is None else f"{100 * (o.final_accuracy - pw.final_accuracy):+.1f}",
            ]
        )
    return out


HEADERS = [
    "system (2 workers)",
    "samples/s",
    "x DDP fp32",
    "s to target",
    "step reached",
    "TTA / DDP fp32",
    "TTA / PowerSGD r4",
    "final accuracy",
    "vs PowerSGD r4 (points)",
]
