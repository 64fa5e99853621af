"""Authentication during the iSCSI Security Negotiation stage (RFC 7143 section 12).

The login negotiator selects an AuthMethod by list negotiation and then hands every
authentication-method key (CHAP_*, SRP_*, KRB_*, SPKM_*) it receives to one
:class:`Authenticator` per connection. An authenticator answers one Login Request's worth of
keys at a time and says when it is satisfied, so a multi-round exchange such as CHAP (one-way or
mutual, MD5 or SHA-256) fits without changes to the negotiator. Only ``AuthMethod=None`` exists
today.

Sans-IO: nothing here touches sockets, clocks or asyncio.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from target.keys import AUTH_KEY_PREFIXES, LoginFailure, is_auth_key

__all__ = [
    "AUTH_KEY_PREFIXES",
    "Authenticator",
    "NoAuthenticator",
    "auth_failure",
    "default_authenticator_factory",
    "is_auth_key",
]

# RFC 7143 section 11.13.5: Status-Class 2 (initiator error), detail 1 (authentication failure).
_AUTH_FAILURE = (2, 1)


def auth_failure(reason: str) -> LoginFailure:
    """The LoginFailure an authenticator raises when the initiator does not authenticate."""
    return LoginFailure(_AUTH_FAILURE[0], _AUTH_FAILURE[1], reason)


class Authenticator(ABC):
    """One authentication exchange on one connection, for the method named by :attr:`method`.

    :meth:`step` is called once per Login Request in the security stage with the
    authentication-method keys of that request (possibly none: the request that selected the
    method may carry no method keys yet). It returns the pairs for the Login Response and whether
    the exchange is finished; the negotiator only lets the stage end once it is. Any failure to
    authenticate is raised as ``LoginFailure(2, 1, ...)`` (see :func:`auth_failure`).
    """

    method: str

    @abstractmethod
    def step(self, pairs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], bool]:
        """Consume this request's method keys; return (response pairs, done)."""


class NoAuthenticator(Authenticator):
    """``AuthMethod=None``: nothing to exchange, finished from the start."""

    method = "None"

    def step(self, pairs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], bool]:
        if pairs:
            # Method keys under AuthMethod=None mean the two sides disagree on how to
            # authenticate; carrying on would let an initiator believe it proved something.
            raise auth_failure(f"{pairs[0][0]} sent although AuthMethod=None was negotiated")
        return [], True


def default_authenticator_factory(method: str) -> Authenticator:
    """Authenticators this build provides; raises LookupError for any other method name."""
    if method == "None":
        return NoAuthenticator()
    raise LookupError(f"no authenticator for AuthMethod={method}")
