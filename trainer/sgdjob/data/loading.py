"""Load the spec's data: a built-in or a user entry point, into one ``Data``."""

from __future__ import annotations

from dataclasses import dataclass

from sgdjob.api.types import DataSpec
from sgdjob.data.dataset import Data, DataError, Dataset, from_legacy, from_pair
from sgdjob.data.digits import digits
from sgdjob.data.fashion_mnist import fashion_mnist
from sgdjob.data.images import SHAPE
from sgdjob.data.mnist import mnist
from sgdjob.data.stdlib_text import VOCAB, stdlib_text
from sgdjob.data.teacher import teacher
from sgdjob.entrypoints import load_entry_point


def load_data(spec: DataSpec, *, seed: int, task: str = "classification") -> Data:
    b = spec.builtin
    if b == "digits":
        return from_legacy(digits(seed=seed, test_fraction=spec.test_fraction))
    if b == "teacher":
        t = spec.teacher
        return from_legacy(
            teacher(
                seed=seed,
                input_dim=t.input_dim,
                hidden_dim=t.hidden_dim,
                classes=t.classes,
                train=t.train_samples,
                test=t.test_samples,
            )
        )
    if b == "fashionMnist":
        return fashion_mnist()
    if b == "mnist":
        return mnist()
    if b == "stdlibText":
        x = spec.text
        return stdlib_text(
            seed=seed, context=x.context, test_fraction=x.test_fraction, max_bytes=x.max_bytes
        )
    assert spec.entry_point is not None  # validation guarantees one of the two
    fn = load_entry_point(spec.entry_point, field="spec.data.entryPoint")
    out = fn(seed=seed, **spec.kwargs)
    if isinstance(out, Dataset):
        data = from_legacy(out)
        if spec.num_classes is not None:
            data = Data(data.train, data.test, data.input_shape, (), spec.num_classes)
        return data
    try:
        return from_pair(out, task=task, num_classes=spec.num_classes)
    except DataError as err:
        raise DataError(f"spec.data.entryPoint: {err}") from None


@dataclass(frozen=True)
class Shapes:
    """What a model is built for: one input's and one target's shape, and the classes."""

    input_shape: tuple[int, ...]
    target_shape: tuple[int, ...]
    num_classes: int | None


def data_shapes(spec: DataSpec, *, seed: int, task: str = "classification") -> Shapes:
    """The shapes without generating built-in data (shards need only these)."""
    b = spec.builtin
    if b == "digits":
        return Shapes((64,), (), 10)
    if b == "teacher":
        return Shapes((spec.teacher.input_dim,), (), spec.teacher.classes)
    if b in ("fashionMnist", "mnist"):
        return Shapes(SHAPE, (), 10)
    if b == "stdlibText":
        return Shapes((spec.text.context,), (spec.text.context,), VOCAB)
    d = load_data(spec, seed=seed, task=task)
    return Shapes(d.input_shape, d.target_shape, d.num_classes)
