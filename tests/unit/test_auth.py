"""Security-stage authentication plumbing (RFC 7143 section 12).

Only AuthMethod=None ships today. A small shared-secret challenge/response authenticator,
defined here, stands in for the CHAP one that will come later so the multi-round flow through
LoginNegotiator is exercised: method selection, key routing, T held at 0 until the exchange
ends, and failures.
"""

from __future__ import annotations

import hashlib

import pytest

from target.auth import (
    AUTH_KEY_PREFIXES,
    Authenticator,
    NoAuthenticator,
    auth_failure,
    default_authenticator_factory,
    is_auth_key,
)
from target.keys import LoginFailure, LoginNegotiator, Stage, TargetLimits

INITIATOR = "iqn.2004-10.com.ubuntu:01:5c0ffee1d00d"
TARGET = "iqn.2024-01.org.emuhba:disk0"
SECRET = b"twelve-bytes"
CHALLENGE = "0x0123456789abcdef"


class ChallengeAuthenticator(Authenticator):
    """CHAP-shaped: CHAP_A chosen, then CHAP_N/CHAP_R checked against a digest of the secret."""

    method = "CHAP"

    def __init__(self) -> None:
        self._challenged = False

    @staticmethod
    def expected() -> str:
        return "0x" + hashlib.md5(b"\x01" + SECRET + bytes.fromhex(CHALLENGE[2:])).hexdigest()

    def step(self, pairs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], bool]:
        keys = dict(pairs)
        if not self._challenged:
            if not pairs:
                return [], False  # AuthMethod just chosen; CHAP_A comes next
            if keys.get("CHAP_A") != "5":
                raise auth_failure("unsupported CHAP_A")
            self._challenged = True
            return [("CHAP_A", "5"), ("CHAP_I", "1"), ("CHAP_C", CHALLENGE)], False
        if keys.get("CHAP_N") != "user" or keys.get("CHAP_R") != self.expected():
            raise auth_failure("bad CHAP response")
        return [], True


def factory(method: str) -> Authenticator:
    if method == "CHAP":
        return ChallengeAuthenticator()
    return default_authenticator_factory(method)


def chap_negotiator(methods: tuple[str, ...] = ("CHAP",)) -> LoginNegotiator:
    return LoginNegotiator(TargetLimits(auth_methods=methods), authenticator_factory=factory)


def sec(n: LoginNegotiator, pairs: list[tuple[str, str]], *, first: bool = False):  # type: ignore[no-untyped-def]
    return n.step(Stage.SECURITY, pairs, first=first, transit=True, next_stage=Stage.OPERATIONAL)


IDENTITY = [("InitiatorName", INITIATOR), ("TargetName", TARGET)]


class TestNoAuthenticator:
    def test_done_at_once(self) -> None:
        auth = NoAuthenticator()
        assert auth.method == "None"
        assert auth.step([]) == ([], True)
        assert auth.step([]) == ([], True)

    def test_method_keys_fail_authentication(self) -> None:
        with pytest.raises(LoginFailure) as exc:
            NoAuthenticator().step([("CHAP_A", "5")])
        assert (exc.value.status_class, exc.value.status_detail) == (2, 1)

    def test_default_factory(self) -> None:
        assert isinstance(default_authenticator_factory("None"), NoAuthenticator)
        with pytest.raises(LookupError):
            default_authenticator_factory("CHAP")

    def test_auth_keys(self) -> None:
        assert AUTH_KEY_PREFIXES == ("CHAP_", "SRP_", "KRB_", "SPKM_")
        assert all(is_auth_key(k) for k in ("CHAP_A", "SRP_GROUP", "KRB_AP_REQ", "SPKM_REQ"))
        assert not any(is_auth_key(k) for k in ("AuthMethod", "CHAPTER", "X-CHAP_A"))

    def test_abstract(self) -> None:
        with pytest.raises(TypeError):
            Authenticator()  # type: ignore[abstract]


class TestMultiRoundExchange:
    def test_chap_shaped_login(self) -> None:
        n = chap_negotiator()
        first = sec(n, [*IDENTITY, ("AuthMethod", "CHAP,None")], first=True)
        assert ("AuthMethod", "CHAP") in first.response
        assert not first.complete  # T stays 0 while the exchange runs
        challenge = sec(n, [("CHAP_A", "5")])
        assert challenge.response == [("CHAP_A", "5"), ("CHAP_I", "1"), ("CHAP_C", CHALLENGE)]
        assert not challenge.complete
        done = sec(n, [("CHAP_N", "user"), ("CHAP_R", ChallengeAuthenticator.expected())])
        assert done.complete and done.response == []
        assert n.auth_method == "CHAP"
        n.step(Stage.OPERATIONAL, [], first=False, transit=True, next_stage=Stage.FULL_FEATURE)
        n.finish()

    def test_wrong_response(self) -> None:
        n = chap_negotiator()
        sec(n, [*IDENTITY, ("AuthMethod", "CHAP")], first=True)
        sec(n, [("CHAP_A", "5")])
        with pytest.raises(LoginFailure) as exc:
            sec(n, [("CHAP_N", "user"), ("CHAP_R", "0x00")])
        assert (exc.value.status_class, exc.value.status_detail) == (2, 1)

    def test_cannot_leave_stage_before_authentication(self) -> None:
        n = chap_negotiator()
        sec(n, [*IDENTITY, ("AuthMethod", "CHAP")], first=True)
        with pytest.raises(LoginFailure):
            n.step(Stage.OPERATIONAL, [], first=False, transit=True, next_stage=Stage.FULL_FEATURE)
        n = chap_negotiator()
        sec(n, [*IDENTITY, ("AuthMethod", "CHAP")], first=True)
        with pytest.raises(LoginFailure) as exc:
            n.finish()
        assert (exc.value.status_class, exc.value.status_detail) == (2, 1)

    def test_initiator_order_among_acceptable_methods(self) -> None:
        n = chap_negotiator(("None", "CHAP"))
        first = sec(n, [*IDENTITY, ("AuthMethod", "None,CHAP")], first=True)
        assert ("AuthMethod", "None") in first.response and first.complete

    def test_method_without_authenticator_is_skipped(self) -> None:
        # Configured but not provided by the factory: never selected.
        n = LoginNegotiator(TargetLimits(auth_methods=("SRP", "None")))
        first = sec(n, [*IDENTITY, ("AuthMethod", "SRP,None")], first=True)
        assert ("AuthMethod", "None") in first.response

    def test_method_keys_before_auth_method(self) -> None:
        n = chap_negotiator()
        with pytest.raises(LoginFailure) as exc:
            sec(n, [*IDENTITY, ("CHAP_A", "5")], first=True)
        assert (exc.value.status_class, exc.value.status_detail) == (2, 1)

    def test_method_keys_after_none_chosen(self) -> None:
        n = chap_negotiator(("None",))
        n.step(
            Stage.SECURITY,
            [*IDENTITY, ("AuthMethod", "None")],
            first=True,
            transit=False,
            next_stage=Stage.SECURITY,
        )
        with pytest.raises(LoginFailure) as exc:
            sec(n, [("CHAP_A", "5")])
        assert (exc.value.status_class, exc.value.status_detail) == (2, 1)

    def test_method_keys_in_operational_stage(self) -> None:
        n = chap_negotiator(("None",))
        sec(n, [*IDENTITY, ("AuthMethod", "None")], first=True)
        with pytest.raises(LoginFailure) as exc:
            n.step(
                Stage.OPERATIONAL,
                [("CHAP_N", "user")],
                first=False,
                transit=True,
                next_stage=Stage.FULL_FEATURE,
            )
        assert (exc.value.status_class, exc.value.status_detail) == (2, 0)
