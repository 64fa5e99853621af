"""CHAP for iSCSI logins (RFC 7143 section 12.1.3, RFC 1994), one-way and mutual.

The exchange, target side, over the Login Requests of the security stage:

1. the initiator offers algorithms (``CHAP_A=<list>``); we pick the first of its list we allow
   and answer ``CHAP_A``, an identifier ``CHAP_I`` and a random challenge ``CHAP_C``;
2. the initiator answers ``CHAP_N`` (its name) and ``CHAP_R = H(I || secret || C)``, and for
   mutual CHAP its own ``CHAP_I`` and ``CHAP_C``; we check the response and, for mutual CHAP,
   answer with our name and ``H(I' || target secret || C')``.

Algorithms are the registry's numbers: 5 MD5, 6 SHA-1, 7 SHA-256, 8 SHA3-256. Challenges come
from the OS's CSPRNG and are remembered (a bounded log shared by every connection), so none is
ever handed out twice and an initiator that reflects one of ours back as its own challenge, on
this connection or any other, is refused: answering it would let the initiator replay our
answer as its own. Secrets appear in no message, exception or log line.

Sans-IO: nothing here touches sockets, clocks or asyncio.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from target.auth import Authenticator, auth_failure

# Registry number -> (name in configs and logs, hashlib name).
ALGORITHMS: dict[int, tuple[str, str]] = {
    5: ("MD5", "md5"),
    6: ("SHA-1", "sha1"),
    7: ("SHA-256", "sha256"),
    8: ("SHA3-256", "sha3_256"),
}
ALGORITHM_NUMBERS = {name: number for number, (name, _) in ALGORITHMS.items()}
DEFAULT_ALGORITHMS: tuple[int, ...] = (8, 7, 6, 5)
# RFC 7143 12.1.3: a secret shorter than 96 bits is too easy to guess offline from one
# observed exchange.
MIN_SECRET_BYTES = 12
MAX_SECRET_BYTES = 255
_MAX_NAME_BYTES = 512
# An initiator challenge this short cannot be random enough to protect our answer.
_MIN_PEER_CHALLENGE = 16
_MAX_PEER_CHALLENGE = 1024
_CHALLENGE_LOG_SIZE = 1 << 16


@dataclass(frozen=True)
class ChapSecret:
    """A CHAP name and its secret. ``repr`` leaves the secret out, so no log line shows it."""

    user: str
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not self.user or len(self.user.encode("utf-8")) > _MAX_NAME_BYTES:
            raise ValueError("a CHAP user name needs 1 to 512 bytes")
        if not MIN_SECRET_BYTES <= len(self.secret) <= MAX_SECRET_BYTES:
            raise ValueError(f"a CHAP secret needs {MIN_SECRET_BYTES} to "
                             f"{MAX_SECRET_BYTES} bytes")


@dataclass(frozen=True)
class ChapPolicy:
    """What a login must prove: the initiator's credentials, and the target's own when the
    initiator asks the target to authenticate itself too (mutual CHAP)."""

    initiator: ChapSecret
    target: ChapSecret | None = None
    algorithms: tuple[int, ...] = DEFAULT_ALGORITHMS

    def __post_init__(self) -> None:
        if not self.algorithms or any(a not in ALGORITHMS for a in self.algorithms):
            raise ValueError(f"CHAP algorithms come from {sorted(ALGORITHMS)}")
        if self.target is not None and hmac.compare_digest(self.target.secret,
                                                           self.initiator.secret):
            # RFC 7143 12.1.3: with one secret for both directions, an attacker could have
            # the target compute the initiator's answer for it.
            raise ValueError("mutual CHAP needs a target secret that differs from the "
                             "initiator secret")


class ChallengeLog:
    """Challenges this target issued lately, shared by all connections."""

    def __init__(self, size: int = _CHALLENGE_LOG_SIZE) -> None:
        self._order: deque[bytes] = deque()
        self._known: set[bytes] = set()
        self._size = size
        self._lock = threading.Lock()

    def issue(self, length: int) -> bytes:
        while True:
            challenge = secrets.token_bytes(length)
            with self._lock:
                if challenge in self._known:
                    continue  # astronomically unlikely; never hand one out twice
                self._known.add(challenge)
                self._order.append(challenge)
                if len(self._order) > self._size:
                    self._known.discard(self._order.popleft())
                return challenge

    def __contains__(self, challenge: bytes) -> bool:
        with self._lock:
            return challenge in self._known


def decode_binary(value: str) -> bytes:
    """A CHAP binary value: ``0x`` hex or ``0b`` base64 (RFC 7143 section 6.1)."""
    prefix, body = value[:2].lower(), value[2:]
    try:
        if prefix == "0x":
            if len(body) % 2:
                body = "0" + body
            return bytes.fromhex(body)
        if prefix == "0b":
            return base64.b64decode(body, validate=True)
    except (ValueError, binascii.Error):
        pass
    raise auth_failure("a CHAP value is not 0x-hex or 0b-base64")


def chap_response(algorithm: int, identifier: int, secret: bytes, challenge: bytes) -> bytes:
    """H(identifier || secret || challenge), RFC 1994 section 4.1."""
    digest = hashlib.new(ALGORITHMS[algorithm][1])
    digest.update(bytes((identifier,)))
    digest.update(secret)
    digest.update(challenge)
    return digest.digest()


class ChapAuthenticator(Authenticator):
    """One CHAP exchange on one connection (see the module docstring)."""

    method = "CHAP"

    def __init__(self, policy: ChapPolicy, challenges: ChallengeLog) -> None:
        self._policy = policy
        self._challenges = challenges
        self._algorithm: int | None = None
        self._identifier = 0
        self._challenge = b""
        self.mutual = False  # whether the target proved itself too (for the session's record)

    @property
    def algorithm_name(self) -> str | None:
        return ALGORITHMS[self._algorithm][0] if self._algorithm is not None else None

    def step(self, pairs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], bool]:
        keys = dict(pairs)
        if self._algorithm is None:
            return self._offer(keys)
        return self._verify(keys)

    def _offer(self, keys: dict[str, str]) -> tuple[list[tuple[str, str]], bool]:
        if not keys:
            return [], False  # AuthMethod=CHAP just agreed; CHAP_A comes next
        offered = keys.get("CHAP_A")
        if offered is None or set(keys) != {"CHAP_A"}:
            raise auth_failure(f"CHAP expects CHAP_A first, got {', '.join(sorted(keys))}")
        for item in offered.split(","):
            try:
                number = int(item, 10)
            except ValueError:
                continue  # unknown values in a list are skipped (list negotiation)
            if number in self._policy.algorithms:
                break
        else:
            raise auth_failure(f"no CHAP algorithm of CHAP_A={offered[:64]} is allowed here")
        self._algorithm = number
        self._identifier = secrets.randbelow(256)
        length = max(16, hashlib.new(ALGORITHMS[number][1]).digest_size)
        self._challenge = self._challenges.issue(length)
        return [("CHAP_A", str(number)), ("CHAP_I", str(self._identifier)),
                ("CHAP_C", "0x" + self._challenge.hex())], False

    def _verify(self, keys: dict[str, str]) -> tuple[list[tuple[str, str]], bool]:
        unexpected = set(keys) - {"CHAP_N", "CHAP_R", "CHAP_I", "CHAP_C"}
        if unexpected or "CHAP_N" not in keys or "CHAP_R" not in keys:
            raise auth_failure("CHAP expects CHAP_N and CHAP_R in answer to the challenge")
        algorithm = self._algorithm
        assert algorithm is not None
        policy = self._policy
        name = keys["CHAP_N"]
        answer = decode_binary(keys["CHAP_R"])
        expected = chap_response(algorithm, self._identifier, policy.initiator.secret,
                                 self._challenge)
        # Both checks always run, so timing tells nothing about which one failed.
        name_ok = hmac.compare_digest(name.encode("utf-8"), policy.initiator.user.encode("utf-8"))
        answer_ok = hmac.compare_digest(answer, expected)
        if not (name_ok and answer_ok):
            raise auth_failure("CHAP name or response does not match")
        if ("CHAP_I" in keys) != ("CHAP_C" in keys):
            raise auth_failure("mutual CHAP needs both CHAP_I and CHAP_C")
        if "CHAP_C" not in keys:
            return [], True
        return self._answer_mutual(keys["CHAP_I"], keys["CHAP_C"]), True

    def _answer_mutual(self, identifier_text: str, challenge_text: str) -> list[tuple[str, str]]:
        target = self._policy.target
        if target is None:
            raise auth_failure("the initiator asked for mutual CHAP; this target has no "
                               "credentials of its own configured")
        try:
            identifier = int(identifier_text, 0)
        except ValueError:
            identifier = -1
        if not 0 <= identifier <= 255:
            raise auth_failure("CHAP_I is not a number from 0 to 255")
        challenge = decode_binary(challenge_text)
        if not _MIN_PEER_CHALLENGE <= len(challenge) <= _MAX_PEER_CHALLENGE:
            raise auth_failure(f"the initiator's CHAP_C must be {_MIN_PEER_CHALLENGE} to "
                               f"{_MAX_PEER_CHALLENGE} bytes")
        if challenge == self._challenge or challenge in self._challenges:
            raise auth_failure("the initiator's CHAP_C is a challenge this target issued "
                               "(reflection)")
        algorithm = self._algorithm
        assert algorithm is not None
        self.mutual = True
        response = chap_response(algorithm, identifier, target.secret, challenge)
        return [("CHAP_N", target.user), ("CHAP_R", "0x" + response.hex())]


def parse_algorithms(names: Sequence[str]) -> tuple[int, ...]:
    """Config names (``MD5``, ``SHA-1``, ``SHA-256``, ``SHA3-256``) to registry numbers."""
    out = []
    for name in names:
        number = ALGORITHM_NUMBERS.get(name.upper())
        if number is None:
            raise ValueError(f"unknown CHAP algorithm {name!r} "
                             f"(known: {', '.join(ALGORITHM_NUMBERS)})")
        out.append(number)
    return tuple(out)
