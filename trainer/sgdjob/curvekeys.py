"""Per-job ZeroMQ CURVE keys: generated without zmq, so the operator (no zmq) can make them.

A job has two Curve25519 key pairs: the *server* pair, shared by its shards (workers need its
public key to connect), and the *client* pair, shared by its workers (shards accept only
that public key). Keys travel Z85-encoded (40 characters), the form ZeroMQ takes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

_Z85 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"


def z85_encode(raw: bytes) -> str:
    """ZeroMQ's Z85 (RFC 32) of a byte string whose length is a multiple of 4."""
    if len(raw) % 4:
        raise ValueError("Z85 encodes multiples of 4 bytes")
    out: list[str] = []
    for i in range(0, len(raw), 4):
        value = int.from_bytes(raw[i : i + 4], "big")
        chars = []
        for _ in range(5):
            value, rem = divmod(value, 85)
            chars.append(_Z85[rem])
        out.extend(reversed(chars))
    return "".join(out)


def keypair() -> tuple[str, str]:
    """A fresh Curve25519 (public, secret) pair, Z85-encoded."""
    secret = os.urandom(32)
    public = X25519PrivateKey.from_private_bytes(secret).public_key().public_bytes_raw()
    return z85_encode(public), z85_encode(secret)


@dataclass(frozen=True)
class JobKeys:
    """The two key pairs of one job."""

    server_public: str
    server_secret: str
    client_public: str
    client_secret: str

    @classmethod
    def generate(cls) -> JobKeys:
        sp, ss = keypair()
        cp, cs = keypair()
        return cls(server_public=sp, server_secret=ss, client_public=cp, client_secret=cs)
