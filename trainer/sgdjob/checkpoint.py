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

``BackgroundCheckpointer`` keeps the writing off the step loop: the loop copies the state once
(``snapshot``), a thread hashes and writes that copy. Its class docstring gives the points,
the one-write-in-flight rule and why a crash still loses at most ``checkpoint.every`` versions.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

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


def encode_parts(state: ShardState) -> list[bytes | memoryview]:
    """The file's bytes as parts: magic, length, header, then each array read in place.

    Nothing is copied here: the arrays' own buffers are hashed and handed to the writer, so
    they must not change until the parts are written (``snapshot`` makes them private).
    """
    digest = hashlib.sha256()
    entries, offset = [], 0
    views: list[memoryview] = []
    for name, arr in state.arrays.items():
        if arr.dtype != np.float32 or arr.shape != (state.count,):
            raise CheckpointError(f"array {name} must be float32 of length {state.count}")
        entries.append({"name": name, "offset": offset, "nbytes": arr.nbytes})
        view = memoryview(np.ascontiguousarray(arr)).cast("B")  # type: ignore[arg-type]
        digest.update(view)  # hashlib drops the GIL for buffers this size
        views.append(view)
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
    return [MAGIC, struct.pack("<I", len(header)), header, *views]


def encode(state: ShardState) -> bytes:
    """The file's bytes in one buffer (arrays are float32 vectors of the slice's length)."""
    return b"".join(encode_parts(state))


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
        parts = encode_parts(state)
        atomic_write(path, lambda fh: self._write_parts(fh, parts))
        for _, old in self.files()[self.keep :]:
            old.unlink(missing_ok=True)
        return path

    def _write_parts(self, fh: IO[bytes], parts: list[bytes | memoryview]) -> None:
        # Part by part, straight from the arrays: no joined copy of the whole file.
        for part in parts:
            fh.write(part)

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


class CheckpointWriteFailed(RuntimeError):
    """A background checkpoint write failed: the shard must not go on as if it were saved."""


def snapshot(state: ShardState, buffers: dict[str, np.ndarray] | None = None) -> ShardState:
    """A private copy of ``state``: each array copied once, the small fields deep-copied.

    ``buffers`` (name -> array) are reused when their shape and dtype fit, and filled with the
    arrays that were allocated, so a shard that checkpoints all run long copies into the same
    memory instead of faulting in fresh pages every time.
    """
    pool = {} if buffers is None else buffers
    arrays: dict[str, np.ndarray] = {}
    for name, arr in state.arrays.items():
        buf = pool.get(name)
        if buf is None or buf.shape != arr.shape or buf.dtype != arr.dtype:
            buf = pool[name] = np.empty_like(arr, order="C")
        np.copyto(buf, arr)
        arrays[name] = buf
    return ShardState(
        shard=state.shard,
        offset=state.offset,
        count=state.count,
        version=state.version,
        total_steps=state.total_steps,
        arrays=arrays,
        next_step=dict(state.next_step),
        extra=copy.deepcopy(state.extra),
    )


class BackgroundCheckpointer:
    """Checkpoints off the step loop: snapshot in the loop, encode, hash and write on a thread.

    Points: every ``every // 2`` versions (at least 1), and whenever the milestone changes
    (a worker left, the training finished). At most one write is in flight: a point that comes
    while the previous write still runs waits for it before taking its snapshot. So at any
    moment the write started two points ago is durable, and a crash loses at most
    ``2 * (every // 2) <= every`` versions: the same bound as a synchronous write every
    ``every`` versions. ``every == 1`` writes synchronously (there is no half interval).

    A failed write is logged when it happens and raised (``CheckpointWriteFailed``) at the next
    point, ``wait`` or ``close``: the shard fails instead of running on unsaved. The writer
    thread is not a daemon, so even an interpreter shutdown finishes the file it writes.
    """

    def __init__(
        self, ckpt: Checkpointer, *, every: int, version: int, milestone: object = None
    ) -> None:
        if every < 1:
            raise ValueError(f"checkpoint.every must be at least 1, got {every}")
        self.ckpt = ckpt
        self.every = every
        self.interval = max(1, every // 2)
        self.synchronous = every == 1
        self.last_version, self.last_milestone = version, milestone
        self.last_path: Path | None = None
        self._buffers: dict[str, np.ndarray] = {}
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._error_version = -1
        self._closed = False

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def due(self, version: int, milestone: object = None) -> bool:
        """Is this a checkpoint point? (The version moved on by the interval, or a milestone.)"""
        return version - self.last_version >= self.interval or milestone != self.last_milestone

    def submit(self, state: ShardState, *, milestone: object = None) -> None:
        """Snapshot ``state`` now and write it in the background (after the previous write)."""
        if self._closed:
            raise RuntimeError("the checkpointer is closed")
        self.wait()  # one write in flight; its buffers are free again after this
        snap = snapshot(state, self._buffers)
        self.last_version, self.last_milestone = state.version, milestone
        self._thread = threading.Thread(
            target=self._write, args=(snap,), name=f"ckpt-shard-{state.shard}", daemon=False
        )
        self._thread.start()
        if self.synchronous:
            self.wait()

    def _write(self, snap: ShardState) -> None:
        try:
            self.last_path = self.ckpt.save(snap)
        except BaseException as err:  # surfaced in the step loop: see wait()
            log.error(
                "shard %d: checkpoint of version %d failed: %s", snap.shard, snap.version, err
            )
            self._error, self._error_version = err, snap.version

    def wait(self) -> Path | None:
        """Block until the write in flight is durable; raise if a write failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise CheckpointWriteFailed(
                f"checkpoint of version {self._error_version} in {self.ckpt.dir} failed: {err}"
            ) from err
        return self.last_path

    def close(self, *, raise_error: bool = True) -> None:
        """Finish the write in flight (the newest checkpoint is durable after this).

        With ``raise_error=False`` (already failing for another reason) a failed write is
        logged, not raised, so it does not hide that reason.
        """
        self._closed = True
        try:
            self.wait()
        except CheckpointWriteFailed as err:
            if raise_error:
                raise
            log.error("%s", err)
