"""Shard checkpoints: a slice's parameters and optimizer state on disk, atomically, checksummed.

File ``<dir>/ckpt-<version:012d>-<run tag>.sgdckpt`` (the tag: 12 hex digits of the SHA-256
of the run id, so a file names the run it belongs to; without a run id the name is
``ckpt-<version:012d>.sgdckpt``), written with ``output.atomic_write`` (temporary file, fsync,
rename, directory fsync) so a crash leaves either the old set or the new file:

    magic b"SGDJCKPT" | u32 header length | header (JSON) | array bytes ...

The header names the format version, the shard, its slice (offset, count), the parameter
version, the job's steps per worker, per-worker resume steps, the coordinator's counters and
the run (``extra.run``: its id and spec hash, see ``sgdjob.runs``), each array's name, dtype,
length and byte offset, and the SHA-256 of all array bytes. Nothing
is unpickled. ``load_latest`` walks the files newest first and returns the first that parses,
matches the slice and whose checksum holds; truncated or corrupt files are logged and skipped.

What is not saved, and why: the server-to-worker mirrors (a restarted shard sends every worker
full parameters on its next pull, which is an exact resync) and the workers' own 1-bit
residuals (they live on the workers, which survive a shard restart).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sgdjob.output import atomic_write

log = logging.getLogger("sgdjob.checkpoint")

MAGIC = b"SGDJCKPT"
FORMAT_VERSION = 1
NAME = re.compile(r"^ckpt-(\d{12})(?:-([0-9a-f]{12}))?\.sgdckpt$")
MAX_HEADER = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint file cannot be used; the message says why."""


class CheckpointMismatch(CheckpointError):
    """This run's checkpoint was written for another spec: restoring it would be wrong."""


def run_tag(run_id: str) -> str:
    """The file-name tag of a run: 12 hex digits of the SHA-256 of its id ("" without one)."""
    return hashlib.sha256(run_id.encode()).hexdigest()[:12] if run_id else ""


@dataclass
class ShardState:
    """Everything a shard restores: its slice, version and the arrays of its update rule."""

    shard: int
    offset: int
    count: int
    version: int
    total_steps: int | None
    arrays: dict[str, np.ndarray]
    next_step: dict[int, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def encode(state: ShardState) -> bytes:
    """The file's bytes (arrays are float32 vectors of the slice's length)."""
    digest = hashlib.sha256()
    entries, offset = [], 0
    for name, arr in state.arrays.items():
        if arr.dtype != np.float32 or arr.shape != (state.count,):
            raise CheckpointError(f"array {name} must be float32 of length {state.count}")
        entries.append({"name": name, "offset": offset, "nbytes": arr.nbytes})
        digest.update(np.ascontiguousarray(arr).data)
        offset += arr.nbytes
    header = json.dumps(
        {
            "format": FORMAT_VERSION,
            "shard": state.shard,
            "offset": state.offset,
            "count": state.count,
            "version": state.version,
            "totalSteps": state.total_steps,
            "nextStep": {str(k): v for k, v in state.next_step.items()},
            "extra": state.extra,
            "arrays": entries,
            "sha256": digest.hexdigest(),
        },
        sort_keys=True,
    ).encode()
    parts = [MAGIC, struct.pack("<I", len(header)), header]
    parts += [np.ascontiguousarray(a).tobytes() for a in state.arrays.values()]
    return b"".join(parts)


def decode(data: bytes, *, shard: int, offset: int, count: int) -> ShardState:
    """Parse and verify a checkpoint for this shard's slice; raise CheckpointError if unusable."""
    if len(data) < len(MAGIC) + 4 or not data.startswith(MAGIC):
        raise CheckpointError("not a checkpoint (bad magic or truncated)")
    (hlen,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    if hlen > MAX_HEADER or start + hlen > len(data):
        raise CheckpointError("header truncated")
    try:
        h = json.loads(data[start : start + hlen])
    except ValueError as err:
        raise CheckpointError(f"header is not JSON: {err}") from None
    if not isinstance(h, dict) or h.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"unknown format {h.get('format') if isinstance(h, dict) else h}")
    if (h.get("shard"), h.get("offset"), h.get("count")) != (shard, offset, count):
        raise CheckpointError(
            f"for shard {h.get('shard')} [{h.get('offset')}, +{h.get('count')}), "
            f"not shard {shard} [{offset}, +{count})"
        )
    body = memoryview(data)[start + hlen :]
    if hashlib.sha256(body).hexdigest() != h.get("sha256"):
        raise CheckpointError("checksum mismatch (truncated or corrupted)")
    arrays: dict[str, np.ndarray] = {}
    for e in h["arrays"]:
        if e["nbytes"] != count * 4 or e["offset"] + e["nbytes"] > len(body):
            raise CheckpointError(f"array {e['name']} has the wrong size")
        arr = np.frombuffer(body, np.float32, count=count, offset=e["offset"]).copy()
        arrays[str(e["name"])] = arr
    return ShardState(
        shard=shard,
        offset=offset,
        count=count,
        version=int(h["version"]),
        total_steps=h["totalSteps"],
        arrays=arrays,
        next_step={int(k): int(v) for k, v in h["nextStep"].items()},
        extra=h["extra"],
    )


class Checkpointer:
    """Writes a shard's checkpoints into one directory and finds the newest usable one."""

    def __init__(
        self,
        directory: Path,
        *,
        shard: int,
        offset: int,
        count: int,
        keep: int,
        run_id: str = "",
        spec_hash: str = "",
    ) -> None:
        self.dir = directory
        self.shard, self.offset, self.count = shard, offset, count
        self.keep = max(1, keep)
        # Which run these checkpoints belong to: files of other runs are neither restored nor
        # pruned, even when two runs share a directory.
        self.run_id, self.spec_hash = run_id, spec_hash
        self.tag = run_tag(run_id)

    def files(self) -> list[tuple[int, Path]]:
        """(version, path) of every checkpoint file of this run, newest first."""
        if not self.dir.is_dir():
            return []
        found = []
        for p in self.dir.iterdir():
            m = NAME.match(p.name)
            if m and (m.group(2) or "") == self.tag:
                found.append((int(m.group(1)), p))
        return sorted(found, reverse=True)

    def save(self, state: ShardState) -> Path:
        suffix = f"-{self.tag}" if self.tag else ""
        path = self.dir / f"ckpt-{state.version:012d}{suffix}.sgdckpt"
        if self.run_id:
            state.extra["run"] = {"id": self.run_id, "specHash": self.spec_hash}
        data = encode(state)
        atomic_write(path, lambda fh: fh.write(data))
        for _, old in self.files()[self.keep :]:
            old.unlink(missing_ok=True)
        return path

    def load_latest(self) -> ShardState | None:
        """The newest usable checkpoint of this run; CheckpointMismatch if it is another spec's."""
        for version, path in self.files():
            try:
                state = decode(
                    path.read_bytes(), shard=self.shard, offset=self.offset, count=self.count
                )
            except (CheckpointError, OSError, KeyError, TypeError, ValueError) as err:
                log.warning("skipping checkpoint %s (version %d): %s", path, version, err)
                continue
            run = state.extra.get("run") or {}
            if self.run_id and run.get("id") != self.run_id:
                log.warning("skipping checkpoint %s: it belongs to run %s", path, run.get("id"))
                continue
            if self.spec_hash and run.get("specHash") not in (None, self.spec_hash):
                raise CheckpointMismatch(
                    f"checkpoint {path} of run {self.run_id} was written for another spec "
                    f"(spec hash {run.get('specHash')}, this spec {self.spec_hash}); "
                    "start a new run instead of resuming this one"
                )
            return state
        return None
