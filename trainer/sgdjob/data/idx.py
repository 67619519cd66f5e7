"""IDX files (the MNIST family's format), plain or gzip-compressed: magic, dims, raw bytes."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from sgdjob.data.dataset import DataError

DTYPES: dict[int, str | type] = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def read_idx(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in DTYPES:
        raise DataError(f"{path} is not an IDX file")
    ndim = raw[3]
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DataError(f"{path}: IDX header truncated")
    dims = struct.unpack(f">{ndim}I", raw[4:head])
    dtype: np.dtype = np.dtype(DTYPES[raw[2]])
    count = int(np.prod(dims)) if dims else 1
    if len(raw) - head != count * dtype.itemsize:
        raise DataError(f"{path}: {len(raw) - head} data bytes, dims {dims} need more or fewer")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=head).reshape(dims)
