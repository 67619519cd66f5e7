"""A byte-level text corpus: the Python standard library's own sources (PSF licence).

The ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` of the running interpreter,
without test suites (``test/``, ``tests/``, ``idlelib/idle_test``) and without
``site-packages``: about 12 MB. Files are split into train and test by a seeded hash of
their relative path (held-out files, not held-out lines), concatenated in sorted order with a
NUL byte between files. Items are non-overlapping windows of ``context`` bytes: the input is
bytes [i, i+T) and the target bytes [i+1, i+T+1), both int64 in 0..255.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset

from sgdjob.data.dataset import Data, DataError

VOCAB = 256
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


class Windows(TorchDataset[tuple[torch.Tensor, torch.Tensor]]):
    """Non-overlapping next-byte windows over one byte string."""

    def __init__(self, corpus: bytes, context: int) -> None:
        self.bytes = torch.frombuffer(bytearray(corpus), dtype=torch.uint8)
        self.context = context
        self.n = (len(corpus) - 1) // context
        if self.n < 1:
            raise DataError(f"a corpus of {len(corpus)} bytes holds no window of {context}")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.take(torch.tensor([i]))
        return x[0], y[0]

    def take(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.bytes.unfold(0, self.context + 1, self.context)[indices].long()
        return rows[:, :-1], rows[:, 1:]


def stdlib_files(root: Path | None = None) -> list[Path]:
    root = root or Path(sysconfig.get_paths()["stdlib"])
    files = [
        p
        for p in root.rglob("*.py")
        if not SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])
        and not p.name.startswith("test_")
    ]
    return sorted(files)


def _held_out(rel: str, *, seed: int, fraction: float) -> bool:
    h = hashlib.sha256(f"{seed}:{rel}".encode()).digest()
    return int.from_bytes(h[:8], "little") / 2**64 < fraction


def stdlib_text(
    *, seed: int, context: int, test_fraction: float, max_bytes: int | None = None
) -> Data:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)
    if not files:
        raise DataError(f"no .py sources under {root}: this interpreter ships no stdlib sources")
    if max_bytes is not None:  # a seeded subset of files holding about max_bytes
        order = np.random.default_rng([seed, 0x7E47]).permutation(len(files))
        chosen, total = [], 0
        for i in order:
            if total >= max_bytes:
                break
            chosen.append(files[i])
            total += files[i].stat().st_size
        files = sorted(chosen)
    train, test = bytearray(), bytearray()
    for p in files:
        data = p.read_bytes() + b"\0"
        rel = p.relative_to(root).as_posix()
        (test if _held_out(rel, seed=seed, fraction=test_fraction) else train).extend(data)
    if len(test) <= context or len(train) <= context:
        raise DataError(f"stdlibText: too little text for context {context} (raise maxBytes)")
    return Data(
        train=Windows(bytes(train), context),
        test=Windows(bytes(test), context),
        input_shape=(context,),
        target_shape=(context,),
        num_classes=VOCAB,
    )
