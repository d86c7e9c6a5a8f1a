"""Proof, on ktrain's own sockets (the rendezvous under ``srun``, the stall watchdog), that the
other end belongs to this run.

Both ends hold the run's secret; neither sends it. Each end sends a random challenge and
answers the other's with an HMAC-SHA256 of both challenges (RFC 2104), so a recorded answer
is worth nothing on the next connection, and what a peer says of itself (its rank, its
address) is covered by its answer. A connection that fails the exchange is dropped.

Over each socket travel JSON lines::

    listener -> {"challenge": S}
    peer     -> {"challenge": C, "proof": HMAC(secret, "peer", S, C, payload), **payload}
    listener -> {"proof": HMAC(secret, "listener", S, C)}
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from typing import TextIO

MAX_LINE = 4096
"""Bytes a handshake line may take: a stranger cannot make a listener read more."""


class Stranger(Exception):
    """The other end did not prove that it holds the run's secret."""


def new_secret(size: int = 32) -> bytes:
    return secrets.token_bytes(size)


def admit(stream: TextIO, secret: bytes) -> dict:
    """On the listening end: challenge the peer, check its answer, answer its challenge;
    return what the peer said of itself. Raises Stranger (or OSError, TimeoutError)."""
    challenge = secrets.token_hex(16)
    _send(stream, {"challenge": challenge})
    said = _receive(stream)
    theirs, proof = said.pop("challenge", None), said.pop("proof", None)
    if not isinstance(theirs, str) or not isinstance(proof, str):
        raise Stranger("no challenge and proof")
    if not hmac.compare_digest(proof, _proof(secret, "peer", challenge, theirs, said)):
        raise Stranger("a wrong proof of the run's secret")
    _send(stream, {"proof": _proof(secret, "listener", challenge, theirs)})
    return said


def join(stream: TextIO, secret: bytes, payload: dict) -> None:
    """On the connecting end: answer the listener's challenge with ``payload`` (what this end
    says of itself) and check that the listener holds the secret too. Raises Stranger."""
    challenge = _receive(stream).get("challenge")
    if not isinstance(challenge, str):
        raise Stranger("no challenge")
    mine = secrets.token_hex(16)
    _send(stream, {**payload, "challenge": mine,
                   "proof": _proof(secret, "peer", challenge, mine, payload)})
    answer = _receive(stream).get("proof")
    if not isinstance(answer, str) or not hmac.compare_digest(
            answer, _proof(secret, "listener", challenge, mine)):
        raise Stranger("the listener did not prove the run's secret")


def _proof(secret: bytes, role: str, listener: str, peer: str, payload: dict | None = None) -> str:
    message = json.dumps([role, listener, peer, payload], sort_keys=True).encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def _send(stream: TextIO, message: dict) -> None:
    stream.write(json.dumps(message) + "\n")
    stream.flush()


def _receive(stream: TextIO) -> dict:
    try:
        line = stream.readline(MAX_LINE)
    except UnicodeDecodeError:
        raise Stranger("bytes that are not text") from None
    if not line.endswith("\n"):
        raise Stranger("no line" if not line else "an overlong line")
    try:
        message = json.loads(line)
    except ValueError:
        raise Stranger("a line that is not JSON") from None
    if not isinstance(message, dict):
        raise Stranger("a line that is not a JSON object")
    return message
