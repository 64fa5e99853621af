"""CHAP, target side: the exchange, its checks, and the login rules around it."""

from __future__ import annotations

import base64
import hashlib

import pytest

from target.chap import (
    ALGORITHMS,
    ChallengeLog,
    ChapAuthenticator,
    ChapPolicy,
    ChapSecret,
    chap_response,
    decode_binary,
    parse_algorithms,
)
from target.keys import LoginFailure

SECRET = b"initiator-secret-16"
TARGET_SECRET = b"target-secret-0016"
POLICY = ChapPolicy(ChapSecret("alice", SECRET), ChapSecret("target-t0", TARGET_SECRET))


def offer(auth: ChapAuthenticator, algorithms: str = "5") -> tuple[int, int, bytes]:
    assert auth.step([]) == ([], False)  # AuthMethod=CHAP agreed, nothing yet
    answer, done = auth.step([("CHAP_A", algorithms)])
    assert not done
    keys = dict(answer)
    assert list(keys) == ["CHAP_A", "CHAP_I", "CHAP_C"]
    assert keys["CHAP_C"].startswith("0x")
    return int(keys["CHAP_A"]), int(keys["CHAP_I"]), bytes.fromhex(keys["CHAP_C"][2:])


def respond(algorithm: int, identifier: int, challenge: bytes, secret: bytes = SECRET) -> str:
    digest = hashlib.new(ALGORITHMS[algorithm][1], bytes((identifier,)) + secret + challenge)
    return "0x" + digest.hexdigest()


@pytest.mark.parametrize("algorithm", [5, 6, 7, 8])
def test_one_way_chap_with_each_algorithm(algorithm: int) -> None:
    auth = ChapAuthenticator(POLICY, ChallengeLog())
    chosen, identifier, challenge = offer(auth, str(algorithm))
    assert chosen == algorithm and auth.algorithm_name == ALGORITHMS[algorithm][0]
    assert len(challenge) >= max(16, hashlib.new(ALGORITHMS[algorithm][1]).digest_size)
    answer = respond(algorithm, identifier, challenge)
    assert auth.step([("CHAP_N", "alice"), ("CHAP_R", answer)]) == ([], True)
    assert not auth.mutual


def test_the_initiator_order_decides_among_allowed_algorithms() -> None:
    assert offer(ChapAuthenticator(POLICY, ChallengeLog()), "7,5")[0] == 7
    assert offer(ChapAuthenticator(POLICY, ChallengeLog()), "5,7")[0] == 5
    strict = ChapPolicy(ChapSecret("alice", SECRET), algorithms=(7,))
    assert offer(ChapAuthenticator(strict, ChallengeLog()), "5,99,x,7")[0] == 7
    with pytest.raises(LoginFailure) as info:
        offer(ChapAuthenticator(strict, ChallengeLog()), "5")
    assert (info.value.status_class, info.value.status_detail) == (2, 1)


def test_base64_responses_are_accepted() -> None:
    auth = ChapAuthenticator(POLICY, ChallengeLog())
    _, identifier, challenge = offer(auth)
    digest = hashlib.md5(bytes((identifier,)) + SECRET + challenge).digest()
    answer = "0b" + base64.b64encode(digest).decode()
    assert auth.step([("CHAP_N", "alice"), ("CHAP_R", answer)]) == ([], True)


@pytest.mark.parametrize("change", ["secret", "name", "identifier", "challenge", "garbage"])
def test_a_wrong_answer_fails_authentication(change: str) -> None:
    auth = ChapAuthenticator(POLICY, ChallengeLog())
    _, identifier, challenge = offer(auth)
    name, secret = "alice", SECRET
    if change == "secret":
        secret = b"not-the-secret-at-all"
    elif change == "name":
        name = "mallory"
    elif change == "identifier":
        identifier = (identifier + 1) % 256
    elif change == "challenge":
        challenge = bytes(len(challenge))
    answer = "0xzz" if change == "garbage" else respond(5, identifier, challenge, secret)
    with pytest.raises(LoginFailure) as info:
        auth.step([("CHAP_N", name), ("CHAP_R", answer)])
    assert (info.value.status_class, info.value.status_detail) == (2, 1)
    assert SECRET.decode() not in info.value.reason


def test_mutual_chap_answers_with_the_target_secret() -> None:
    auth = ChapAuthenticator(POLICY, ChallengeLog())
    _, identifier, challenge = offer(auth)
    mine = bytes(range(32))
    answer, done = auth.step([("CHAP_N", "alice"), ("CHAP_R", respond(5, identifier, challenge)),
                              ("CHAP_I", "77"), ("CHAP_C", "0x" + mine.hex())])
    assert done and auth.mutual
    assert dict(answer) == {
        "CHAP_N": "target-t0",
        "CHAP_R": "0x" + chap_response(5, 77, TARGET_SECRET, mine).hex()}


@pytest.mark.parametrize("case", ["no target credentials", "reflected", "reflected elsewhere",
                                  "short challenge", "identifier only", "bad identifier"])
def test_mutual_chap_refusals(case: str) -> None:
    log = ChallengeLog()
    policy = ChapPolicy(ChapSecret("alice", SECRET)) if case == "no target credentials" \
        else POLICY
    other = ChapAuthenticator(POLICY, log)
    other_challenge = offer(other)[2]  # a challenge another connection was given
    auth = ChapAuthenticator(policy, log)
    _, identifier, challenge = offer(auth)
    mutual = {"CHAP_I": "1", "CHAP_C": "0x" + bytes(range(16)).hex()}
    if case == "reflected":
        mutual["CHAP_C"] = "0x" + challenge.hex()
    elif case == "reflected elsewhere":
        mutual["CHAP_C"] = "0x" + other_challenge.hex()
    elif case == "short challenge":
        mutual["CHAP_C"] = "0x0102030405"
    elif case == "identifier only":
        del mutual["CHAP_C"]
    elif case == "bad identifier":
        mutual["CHAP_I"] = "256"
    with pytest.raises(LoginFailure) as info:
        auth.step([("CHAP_N", "alice"), ("CHAP_R", respond(5, identifier, challenge)),
                   *mutual.items()])
    assert (info.value.status_class, info.value.status_detail) == (2, 1)


def test_keys_out_of_turn_fail() -> None:
    auth = ChapAuthenticator(POLICY, ChallengeLog())
    with pytest.raises(LoginFailure):
        auth.step([("CHAP_N", "alice")])  # before CHAP_A
    auth = ChapAuthenticator(POLICY, ChallengeLog())
    offer(auth)
    with pytest.raises(LoginFailure):
        auth.step([("CHAP_A", "5")])  # the challenge was given: an answer is due


def test_challenges_are_never_handed_out_twice() -> None:
    log = ChallengeLog(size=4096)
    seen = {log.issue(16) for _ in range(4096)}
    assert len(seen) == 4096 and all(c in log for c in seen)
    first = next(iter(seen))
    for _ in range(4096):
        log.issue(16)
    assert first not in log  # the log is bounded


def test_secrets_are_validated_and_never_shown() -> None:
    secret = ChapSecret("bob", b"sixteen-byte-key")
    assert "sixteen" not in repr(secret) and "sixteen" not in repr(ChapPolicy(secret))
    with pytest.raises(ValueError, match="12 to 255 bytes"):
        ChapSecret("bob", b"short")
    with pytest.raises(ValueError, match="differs"):
        ChapPolicy(secret, ChapSecret("target", b"sixteen-byte-key"))
    with pytest.raises(ValueError, match="algorithms"):
        ChapPolicy(secret, algorithms=(4,))


def test_binary_values_and_algorithm_names() -> None:
    assert decode_binary("0x0a0B") == b"\x0a\x0b"
    assert decode_binary("0X1") == b"\x01"
    assert decode_binary("0b" + base64.b64encode(b"abc").decode()) == b"abc"
    for bad in ("1234", "0xgg", "0b!!!", ""):
        with pytest.raises(LoginFailure):
            decode_binary(bad)
    assert parse_algorithms(["sha-256", "MD5"]) == (7, 5)
    with pytest.raises(ValueError, match="unknown CHAP algorithm"):
        parse_algorithms(["SHA-512"])
