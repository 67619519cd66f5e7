"""The workload parts of the spec: built-in model and data settings, tasks, optimizers,
learning-rate schedules and precision.

Only settings whose feature works end to end exist. The tables of which task each built-in is
made for live here; the cross-field rules that read them (which optimizer takes which knob,
which built-ins fit together) live in ``validation`` and, as CEL, in ``rules``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from sgdjob.api.strict import Strict

Task = Literal["classification", "regression", "languageModel", "custom"]
Optimizer = Literal["sgd", "adam", "adamw"]
Precision = Literal["float32", "bf16", "fp16"]

# Which task each built-in data set and model is made for.
DATA_TASK = {
    "digits": "classification",
    "teacher": "classification",
    "fashionMnist": "classification",
    "mnist": "classification",
    "stdlibText": "languageModel",
}
MODEL_TASKS = {
    "mlp": ("classification", "regression"),
    "resnet": ("classification",),
    "transformer": ("languageModel",),
}


class ResNetSpec(Strict):
    """The built-in ResNet-style CNN: a stride-2 stem, then stages of residual blocks with
    BatchNorm, each stage after the first halving the resolution."""

    channels: list[int] = Field(
        default_factory=lambda: [16, 32, 64],
        min_length=1,
        max_length=8,
        description="Channels of each stage (every width in 1..1024).",
    )
    blocks: int = Field(default=1, ge=1, le=16, description="Residual blocks per stage.")


class TransformerSpec(Strict):
    """The built-in causal Transformer language model (pre-norm, learned or rotary positions)."""

    d_model: int = Field(default=128, ge=8, le=8192, description="Width of the residual stream.")
    layers: int = Field(default=2, ge=1, le=64)
    heads: int = Field(default=4, ge=1, le=128, description="Attention heads; divides dModel.")
    ffn_mult: int = Field(default=4, ge=1, le=16, description="Feed-forward width / dModel.")
    positions: Literal["learned", "rotary"] = Field(
        default="learned", description="Learned absolute position embeddings or rotary (RoPE)."
    )
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


class TextSpec(Strict):
    """The byte-level corpus of the running interpreter's standard-library sources."""

    context: int = Field(
        default=128, ge=2, le=1 << 16, description="Bytes per training window (sequence length)."
    )
    test_fraction: float = Field(
        default=0.05, gt=0.0, lt=1.0, description="Fraction of files held out (seeded, by file)."
    )
    max_bytes: int | None = Field(
        default=None,
        ge=1 << 12,
        le=1 << 34,
        description="Use only a seeded subset of files holding about this many bytes.",
    )


class ScheduleSpec(Strict):
    """The learning-rate schedule the shards follow, in worker steps, with optional linear
    warmup: torch's LinearLR, then ConstantLR(factor 1) / StepLR / CosineAnnealingLR."""

    kind: Literal["constant", "step", "cosine"] = "constant"
    warmup_steps: int = Field(
        default=0, ge=0, le=1 << 40, description="Steps of linear warmup before the schedule."
    )
    warmup_start_factor: float = Field(
        default=0.1, gt=0.0, le=1.0, description="Fraction of `lr` the warmup starts from."
    )
    step_size: int = Field(
        default=1000, ge=1, le=1 << 40, description="`step`: multiply by `gamma` every n steps."
    )
    gamma: float = Field(default=0.1, gt=0.0, le=1.0, description="`step`: the decay factor.")
    min_lr: float = Field(
        default=0.0, ge=0.0, le=1e4, description="`cosine`: the rate at the last step."
    )
