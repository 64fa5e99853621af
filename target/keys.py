"""iSCSI text keys: the key=value format and the target's side of their negotiation.

References are to RFC 7143: section 6.1 (text format), 6.2 (negotiation rules), 6.3 (login
stages), 12 (security keys) and 13 (operational keys), plus the obsoleted marker keys of 13.25
and iSCSIProtocolLevel from RFC 7144. Sans-IO: the connection state machine feeds in the text of
one reassembled Login or Text Request and sends back the pairs we return.

Interoperability notes that shaped the choices below (from open-iscsi usr/login.c and libiscsi
lib/login.c):

* open-iscsi fails the login on any key it does not recognise in a Login Response, so the target
  only ever *offers* keys when the RFC default is unacceptable to it (plus InitialR2T=No, which
  open-iscsi and libiscsi always negotiate themselves, so they never see that offer).
* open-iscsi insists on MaxOutstandingR2T=1, MaxConnections=1 and ErrorRecoveryLevel=0 answers;
  the MIN result function with its own offers of exactly those values gives them.
* libiscsi repeats InitiatorName, TargetName and SessionType in the first operational-stage
  request after a security stage, and re-sends every operational key if a response with T=0
  comes back. Identical re-declarations of the identity keys are therefore tolerated, and the
  target never holds back T while it has nothing outstanding.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from target.auth import Authenticator

# ---------------------------------------------------------------------------------------------
# Text format (RFC 7143 section 6.1)
# ---------------------------------------------------------------------------------------------

KEY_MAX_LEN = 63
# Simple values are capped at 255 bytes unless a key says otherwise; 8192 is the least amount of
# key=value data every implementation must accept in one negotiation, so no single value of an
# open-ended key (lists, authentication blobs, private keys) can sensibly exceed it.
VALUE_MAX_LEN = 255
LONG_VALUE_MAX_LEN = 8192

REJECT = "Reject"
IRRELEVANT = "Irrelevant"
NOT_UNDERSTOOD = "NotUnderstood"
# Answers only; proposing one of them is a protocol error (RFC 7143 section 6.2).
RESERVED_ANSWERS = frozenset({REJECT, IRRELEVANT, NOT_UNDERSTOOD})

# Letters, digits and . - + @ _ ; '#' for the X# public extension keys. The first character is
# a letter of either case because iSCSIProtocolLevel (RFC 7144) starts in lower case.
_KEY_RE = re.compile(r"[A-Za-z][A-Za-z0-9.+@_#-]*")

# Standard keys whose value is a single simple-value and so falls under the 255-byte cap. List
# keys, authentication-method keys and unknown keys may legitimately be longer.
_SIMPLE_VALUE_KEYS = frozenset(
    {
        "InitiatorName",
        "TargetName",
        "InitiatorAlias",
        "TargetAlias",
        "TargetAddress",
        "TargetPortalGroupTag",
        "SessionType",
        "SendTargets",
        "MaxConnections",
        "InitialR2T",
        "ImmediateData",
        "MaxRecvDataSegmentLength",
        "MaxBurstLength",
        "FirstBurstLength",
        "DefaultTime2Wait",
        "DefaultTime2Retain",
        "MaxOutstandingR2T",
        "DataPDUInOrder",
        "DataSequenceInOrder",
        "ErrorRecoveryLevel",
        "IFMarker",
        "OFMarker",
        "IFMarkInt",
        "OFMarkInt",
        "iSCSIProtocolLevel",
        "RDMAExtensions",
        "InitiatorRecvDataSegmentLength",
        "TargetRecvDataSegmentLength",
    }
)


class TextFormatError(ValueError):
    """Login/Text data that is not a well-formed sequence of NUL-terminated key=value items."""


class NegotiationError(ValueError):
    """A Text Request (full feature phase) that breaks the negotiation rules.

    The connection answers it with a Reject PDU (reason: protocol error).
    """


def parse_text(data: bytes | memoryview) -> list[tuple[str, str]]:
    """Split Login/Text data into (key, value) pairs, in order, duplicates kept.

    Items are separated by NUL; the NUL after the last item is optional and any run of trailing
    NULs is accepted (some initiators leave padding inside the segment). An empty item anywhere
    else, an item without '=', a key with characters outside the RFC 7143 key alphabet or longer
    than 63 bytes, a value over its length cap or text that is not UTF-8 raises TextFormatError.
    """
    raw = bytes(data)
    end = len(raw)
    while end and raw[end - 1] == 0:
        end -= 1
    if end == 0:
        return []
    pairs: list[tuple[str, str]] = []
    for item in raw[:end].split(b"\0"):
        eq = item.find(b"=")
        if eq < 0:
            raise TextFormatError("key=value item without '='" if item else "empty key=value item")
        key_bytes = item[:eq]
        value_bytes = item[eq + 1 :]
        if len(key_bytes) > KEY_MAX_LEN:
            raise TextFormatError(f"key longer than {KEY_MAX_LEN} bytes")
        try:
            key = key_bytes.decode("ascii")
        except UnicodeDecodeError:
            raise TextFormatError("key is not ASCII") from None
        if _KEY_RE.fullmatch(key) is None:
            raise TextFormatError(f"malformed key {key!r}")
        limit = VALUE_MAX_LEN if key in _SIMPLE_VALUE_KEYS else LONG_VALUE_MAX_LEN
        if len(value_bytes) > limit:
            raise TextFormatError(f"value of {key} longer than {limit} bytes")
        try:
            value = value_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise TextFormatError(f"value of {key} is not UTF-8") from None
        pairs.append((key, value))
    return pairs


def encode_text(pairs: Iterable[tuple[str, str]]) -> bytes:
    """Encode pairs as "key=value\\0" items. Raises TextFormatError for unencodable pairs."""
    out = bytearray()
    for key, value in pairs:
        if len(key) > KEY_MAX_LEN or _KEY_RE.fullmatch(key) is None:
            raise TextFormatError(f"malformed key {key!r}")
        try:
            value_bytes = value.encode("utf-8")
        except UnicodeEncodeError:
            raise TextFormatError(f"value of {key} is not encodable as UTF-8") from None
        if b"\0" in value_bytes:
            raise TextFormatError(f"value of {key} contains NUL")
        out += key.encode("ascii")
        out += b"="
        out += value_bytes
        out += b"\0"
    return bytes(out)


# ---------------------------------------------------------------------------------------------
# Negotiation data types
# ---------------------------------------------------------------------------------------------


class Stage(IntEnum):
    """Login stage codes carried in CSG/NSG."""

    SECURITY = 0
    OPERATIONAL = 1
    FULL_FEATURE = 3


SESSION_NORMAL = "Normal"
SESSION_DISCOVERY = "Discovery"

_DATA_LENGTH_MAX = (1 << 24) - 1
_DIGESTS = ("None", "CRC32C")


@dataclass
class TargetLimits:
    """What this target supports or prefers, from configuration.

    Numeric limits are our side of each result function: the most we accept for Minimum keys,
    the least for DefaultTime2Wait (Maximum). Digest tuples list what we accept; when the
    initiator proposes, its order decides.
    """

    max_recv_data_segment_length: int = 262144  # declared: we accept data segments this big
    max_burst_length: int = 1048576
    first_burst_length: int = 262144
    max_outstanding_r2t: int = 8
    max_connections: int = 1
    initial_r2t: bool = False  # False: we prefer unsolicited data allowed
    immediate_data: bool = True
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    default_time2wait: int = 2
    default_time2retain: int = 20
    error_recovery_level: int = 0
    header_digests: tuple[str, ...] = ("None", "CRC32C")
    data_digests: tuple[str, ...] = ("None", "CRC32C")
    # Methods the negotiator may agree to; the authenticator factory decides per login which
    # one applies (CHAP where credentials are configured, None elsewhere).
    auth_methods: tuple[str, ...] = ("CHAP", "None")

    def __post_init__(self) -> None:
        ranges = (
            ("max_recv_data_segment_length", 512, _DATA_LENGTH_MAX),
            ("max_burst_length", 512, _DATA_LENGTH_MAX),
            ("first_burst_length", 512, _DATA_LENGTH_MAX),
            ("max_outstanding_r2t", 1, 65535),
            ("max_connections", 1, 65535),
            ("default_time2wait", 0, 3600),
            ("default_time2retain", 0, 3600),
            ("error_recovery_level", 0, 2),
        )
        for name, lo, hi in ranges:
            value = getattr(self, name)
            if not lo <= value <= hi:
                raise ValueError(f"TargetLimits.{name}={value} outside {lo}..{hi}")
        if self.first_burst_length > self.max_burst_length:
            raise ValueError("TargetLimits.first_burst_length exceeds max_burst_length")
        for name in ("header_digests", "data_digests"):
            digests = getattr(self, name)
            if not digests or any(d not in _DIGESTS for d in digests):
                raise ValueError(f"TargetLimits.{name} must be a non-empty subset of {_DIGESTS}")
        if not self.auth_methods or any(m in RESERVED_ANSWERS for m in self.auth_methods):
            raise ValueError("TargetLimits.auth_methods must name at least one method")


@dataclass(slots=True)
class SessionParams:
    """Negotiated connection and session parameters; RFC 7143 defaults until negotiated."""

    header_digest: bool = False
    data_digest: bool = False
    max_connections: int = 1
    initial_r2t: bool = True
    immediate_data: bool = True
    # The initiator's declaration: the most we may put in one data segment we send.
    max_recv_data_segment_length: int = 8192
    # Ours as the initiator knows it: 8192 until we have declared a value.
    target_max_recv_data_segment_length: int = 8192
    max_burst_length: int = 262144
    first_burst_length: int = 65536
    default_time2wait: int = 2
    default_time2retain: int = 20
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    error_recovery_level: int = 0


@dataclass(eq=False)
class LoginFailure(Exception):
    """Ends the login with a Login Response carrying this status (RFC 7143 section 11.13.5).

    Codes used: (2,0) initiator error, (2,1) authentication failure, (2,3) target not found,
    (2,7) missing parameter, (2,9) session type not supported, (3,0) target error.
    """

    status_class: int
    status_detail: int
    reason: str

    def __post_init__(self) -> None:
        # Exception.args drives pickling and repr; keep it in step with the fields.
        super().__init__(self.status_class, self.status_detail, self.reason)

    def __str__(self) -> str:
        return f"login status {self.status_class:02x}{self.status_detail:02x}: {self.reason}"


def _initiator_error(reason: str) -> LoginFailure:
    return LoginFailure(2, 0, reason)


@dataclass
class StepResult:
    """What to send back for one Login Request."""

    response: list[tuple[str, str]]
    # Nothing is outstanding on our side for this stage: the response may carry T=1 if the
    # initiator asked to transit.
    complete: bool


@dataclass
class TextResult:
    """What to send back for one Text Request in full feature phase."""

    response: list[tuple[str, str]]
    # The SendTargets value if the request asked for it; the connection builds that answer.
    send_targets: str | None = None


# ---------------------------------------------------------------------------------------------
# Key catalogue (RFC 7143 section 13)
# ---------------------------------------------------------------------------------------------


class _Fn(Enum):
    LIST = "list"
    AND = "and"
    OR = "or"
    MIN = "min"
    MAX = "max"


@dataclass(frozen=True, slots=True)
class _Spec:
    fn: _Fn
    default: str
    lo: int = 0
    hi: int = 0
    discovery_irrelevant: bool = False
    param: str | None = None  # SessionParams attribute the outcome lands in


_NEGOTIATED: dict[str, _Spec] = {
    "HeaderDigest": _Spec(_Fn.LIST, "None", param="header_digest"),
    "DataDigest": _Spec(_Fn.LIST, "None", param="data_digest"),
    "MaxConnections": _Spec(_Fn.MIN, "1", 1, 65535, True, "max_connections"),
    "InitialR2T": _Spec(_Fn.OR, "Yes", discovery_irrelevant=True, param="initial_r2t"),
    "ImmediateData": _Spec(_Fn.AND, "Yes", discovery_irrelevant=True, param="immediate_data"),
    "MaxBurstLength": _Spec(_Fn.MIN, "262144", 512, _DATA_LENGTH_MAX, True, "max_burst_length"),
    "FirstBurstLength": _Spec(_Fn.MIN, "65536", 512, _DATA_LENGTH_MAX, True, "first_burst_length"),
    "DefaultTime2Wait": _Spec(_Fn.MAX, "2", 0, 3600, param="default_time2wait"),
    "DefaultTime2Retain": _Spec(_Fn.MIN, "20", 0, 3600, param="default_time2retain"),
    "MaxOutstandingR2T": _Spec(_Fn.MIN, "1", 1, 65535, True, "max_outstanding_r2t"),
    "DataPDUInOrder": _Spec(_Fn.OR, "Yes", discovery_irrelevant=True, param="data_pdu_in_order"),
    "DataSequenceInOrder": _Spec(
        _Fn.OR, "Yes", discovery_irrelevant=True, param="data_sequence_in_order"
    ),
    "ErrorRecoveryLevel": _Spec(_Fn.MIN, "0", 0, 2, param="error_recovery_level"),
    # RFC 7143 13.23; we implement only the RFC 3720 task reporting semantics.
    "TaskReporting": _Spec(_Fn.LIST, "RFC3720", discovery_irrelevant=True),
    # RFC 7144: level 1 is RFC 7143 compliance, which is what we offer at most.
    "iSCSIProtocolLevel": _Spec(_Fn.MIN, "0", 0, 31),
    # RFC 7145 (iSER): a TCP target always ends up at No.
    "RDMAExtensions": _Spec(_Fn.AND, "No"),
}

_IDENTITY_KEYS = frozenset({"InitiatorName", "InitiatorAlias", "TargetName", "SessionType"})
# Keys only a target may send (RFC 7143 13.6, 13.8, 13.9).
_TARGET_ONLY_KEYS = frozenset({"TargetAlias", "TargetAddress", "TargetPortalGroupTag"})
# RFC 7143 13.25: answer Reject, never NotUnderstood (SHOULD for the markers, MUST for the
# intervals).
_OBSOLETE_KEYS = frozenset({"IFMarker", "OFMarker", "IFMarkInt", "OFMarkInt"})
# RFC 7145 keys that mean nothing once RDMAExtensions is No, which it always is here.
_ISER_ONLY_KEYS = frozenset({"InitiatorRecvDataSegmentLength", "TargetRecvDataSegmentLength"})
_MRDSL = "MaxRecvDataSegmentLength"

# Every standard key defined outside the security stage; RFC 7143 section 12 forbids them there.
_OPERATIONAL_KEYS = (
    frozenset(_NEGOTIATED)
    | _TARGET_ONLY_KEYS
    | _OBSOLETE_KEYS
    | _ISER_ONLY_KEYS
    | {_MRDSL, "SendTargets"}
)

# iSCSI names are at most 223 bytes (RFC 7143 section 4.2.7.1).
_ISCSI_NAME_MAX = 223
_PROTOCOL_LEVEL = 1

# Keys that belong to an authentication method rather than to the login itself (RFC 7143
# 12.1): the security stage hands them to the authenticator; anywhere else they are an error.
AUTH_KEY_PREFIXES: tuple[str, ...] = ("CHAP_", "SRP_", "KRB_", "SPKM_")


def is_auth_key(key: str) -> bool:
    """True for keys owned by an authentication method (CHAP_A, SRP_U, KRB_AP_REQ, ...)."""
    return key.startswith(AUTH_KEY_PREFIXES)


def _is_security_key(key: str) -> bool:
    return key == "AuthMethod" or is_auth_key(key)


def _parse_number(value: str) -> int | None:
    """A numerical-value: decimal or 0x-prefixed hex, below 2**64; None if malformed."""
    if value[:2] in ("0x", "0X"):
        digits = value[2:]
        if not digits or len(digits) > 16 or not all(c in "0123456789abcdefABCDEF" for c in digits):
            return None
        return int(digits, 16)
    if not value or len(value) > 20 or not value.isascii() or not value.isdigit():
        return None
    number = int(value)
    return number if number < (1 << 64) else None


def _yes(flag: bool) -> str:
    return "Yes" if flag else "No"


# ---------------------------------------------------------------------------------------------
# Login negotiation
# ---------------------------------------------------------------------------------------------


class LoginNegotiator:
    """The target's half of one connection's login key negotiation.

    Call :meth:`step` once per reassembled Login Request, then :meth:`finish` when the login
    enters full feature phase. Every rule violation is raised as :class:`LoginFailure`; the
    caller turns it into the final Login Response.
    """

    def __init__(
        self,
        limits: TargetLimits,
        *,
        portal_group_tag: int = 1,
        target_alias: str | None = None,
        authenticator_factory: Callable[[str], Authenticator] | None = None,
    ) -> None:
        from target.auth import default_authenticator_factory

        if not 0 <= portal_group_tag <= 65535:
            raise ValueError("portal_group_tag must fit in 16 bits")
        if target_alias is not None and (
            "\0" in target_alias or len(target_alias.encode("utf-8")) > VALUE_MAX_LEN
        ):
            raise ValueError("target_alias must be at most 255 UTF-8 bytes without NUL")
        self._limits = limits
        self._portal_group_tag = portal_group_tag
        self._target_alias = target_alias
        self._factory = authenticator_factory or default_authenticator_factory

        self.initiator_name: str | None = None
        self.initiator_alias: str | None = None
        self.session_type: str = SESSION_NORMAL
        self.target_name: str | None = None
        self.params = SessionParams()

        self._stage: Stage | None = None
        self._granted_stage: Stage | None = None  # where a T=1 response sent the initiator
        self._finished = False
        self._authenticator: Authenticator | None = None
        self._auth_done = False
        # Keys the initiator has proposed or declared (or we have settled): seeing one again is a
        # renegotiation, which the target must refuse (RFC 7143 section 6.2).
        self._seen: set[str] = set()
        # Keys whose outcome is fixed or in progress, so we never offer them.
        self._negotiated: set[str] = set()
        self._values: dict[str, str] = {}
        # Our open offers: key -> (offered value, whether the initiator must answer).
        self._offers: dict[str, tuple[str, bool]] = {}
        self._declared_mrdsl = False

    # -- public API ----------------------------------------------------------------------------

    @property
    def authenticator(self) -> Authenticator | None:
        """The authenticator of the method agreed on, once there is one."""
        return self._authenticator

    @property
    def auth_method(self) -> str | None:
        """The AuthMethod in force once one has been selected (``None`` string for none)."""
        return self._authenticator.method if self._authenticator is not None else None

    def step(
        self,
        stage: Stage,
        pairs: list[tuple[str, str]],
        *,
        first: bool,
        transit: bool,
        next_stage: Stage,
    ) -> StepResult:
        """Negotiate the keys of one Login Request received in ``stage`` (its CSG)."""
        if self._finished:
            raise ValueError("login negotiation already finished")
        if first != (self._stage is None):
            raise ValueError("first must be True for the first request of the login only")
        self._check_stage(stage, transit, next_stage)
        _check_unique(pairs, _initiator_error)

        response: list[tuple[str, str]] = []
        if first:
            response += self._first_request(stage, pairs)
        if stage is Stage.SECURITY:
            response += self._security_step(pairs, transit)
            # Nothing is outstanding once authenticated, or while no AuthMethod is under way and
            # leaving the stage would simply mean AuthMethod=None.
            complete = self._auth_done or (
                self._authenticator is None and "None" in self._limits.auth_methods
            )
        else:
            response += self._operational_step(pairs, transit)
            complete = not any(required for _, required in self._offers.values())

        self._stage = stage
        self._granted_stage = next_stage if (complete and transit) else None
        return StepResult(response, complete)

    def finish(self) -> SessionParams:
        """Close the negotiation on entering full feature phase; returns the outcome."""
        if self._finished:
            return self.params
        for key, (offered, _required) in list(self._offers.items()):
            self._settle(key, offered, None)
        self._offers.clear()
        if self._stage is None or self.initiator_name is None:
            raise _initiator_error("login ended before any request was negotiated")
        if not self._auth_done:
            raise LoginFailure(2, 1, "login ended before authentication completed")
        self._check_outcome()
        self._finished = True
        return self.params

    # -- stage handling ------------------------------------------------------------------------

    def _check_stage(self, stage: Stage, transit: bool, next_stage: Stage) -> None:
        if stage not in (Stage.SECURITY, Stage.OPERATIONAL):
            raise _initiator_error(f"login request with CSG={int(stage)}")
        if self._stage is not None:
            expected = self._granted_stage if self._granted_stage is not None else self._stage
            if stage != expected:
                raise _initiator_error(
                    f"login request in stage {int(stage)} where stage {int(expected)} was due"
                )
        if transit and (
            next_stage not in (Stage.OPERATIONAL, Stage.FULL_FEATURE) or next_stage <= stage
        ):
            raise _initiator_error(f"transit from stage {int(stage)} to {int(next_stage)}")

    def _first_request(self, stage: Stage, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        values = dict(pairs)
        session_type = values.get("SessionType", SESSION_NORMAL)
        if session_type not in (SESSION_NORMAL, SESSION_DISCOVERY):
            raise LoginFailure(2, 9, f"SessionType={session_type} is not supported")
        self.session_type = session_type
        name = values.get("InitiatorName")
        if not name:
            raise LoginFailure(2, 7, "InitiatorName missing from the first login request")
        if len(name.encode("utf-8")) > _ISCSI_NAME_MAX:
            raise _initiator_error("InitiatorName longer than 223 bytes")
        self.initiator_name = name
        self.initiator_alias = values.get("InitiatorAlias")

        response: list[tuple[str, str]] = []
        if session_type == SESSION_NORMAL:
            target_name = values.get("TargetName")
            if not target_name:
                raise LoginFailure(2, 7, "TargetName missing from a Normal session login")
            self.target_name = target_name
            # RFC 7143 13.9: the tag goes back in the response to the first request that named
            # a target; the alias travels with it so initiators can show it from the start.
            if self._target_alias is not None:
                response.append(("TargetAlias", self._target_alias))
            response.append(("TargetPortalGroupTag", str(self._portal_group_tag)))
        # A Discovery session has no target to name: any TargetName sent is ignored.

        if stage is Stage.OPERATIONAL:
            # The initiator skipped security negotiation, which only "None" permits.
            self._authenticator = self._make_authenticator("None")
            if self._authenticator is None:
                raise LoginFailure(2, 1, "this target requires authentication")
            self._auth_done = True
        return response

    def _declare_identity(self, key: str, value: str) -> None:
        """Identity keys may reappear with the same value (libiscsi does); a change is an error."""
        if key == "InitiatorName":
            current: str | None = self.initiator_name
        elif key == "InitiatorAlias":
            if self.initiator_alias is None:
                self.initiator_alias = value
                return
            current = self.initiator_alias
        elif key == "SessionType":
            current = self.session_type
        else:  # TargetName
            if self.session_type == SESSION_DISCOVERY:
                return
            current = self.target_name
        if value != current:
            raise _initiator_error(f"{key} changed during login")

    def _note_seen(self, key: str) -> None:
        if key in self._seen or key in self._negotiated:
            raise _initiator_error(f"{key} negotiated more than once in one login")
        self._seen.add(key)

    # -- security stage ------------------------------------------------------------------------

    def _make_authenticator(self, method: str) -> Authenticator | None:
        if method not in self._limits.auth_methods:
            return None
        try:
            return self._factory(method)
        except LookupError:
            return None

    def _security_step(self, pairs: list[tuple[str, str]], transit: bool) -> list[tuple[str, str]]:
        response: list[tuple[str, str]] = []
        method_keys: list[tuple[str, str]] = []
        for key, value in pairs:
            if key in _IDENTITY_KEYS:
                self._declare_identity(key, value)
            elif key == "AuthMethod":
                self._note_seen(key)
                response.append((key, self._select_auth_method(value)))
            elif is_auth_key(key):
                method_keys.append((key, value))
            elif key in _OPERATIONAL_KEYS:
                # RFC 7143 section 12: only identity keys, AuthMethod and the method's own keys
                # are used in this stage; "Other keys MUST NOT be used".
                raise _initiator_error(f"{key} is not allowed in the security stage")
            else:
                self._note_seen(key)
                response.append((key, NOT_UNDERSTOOD))

        if self._authenticator is not None:
            if method_keys or not self._auth_done:
                answer, done = self._authenticator.step(method_keys)
                response += answer
                self._auth_done = done
        elif method_keys:
            raise LoginFailure(2, 1, f"{method_keys[0][0]} sent before AuthMethod was negotiated")
        elif transit:
            # No AuthMethod offered at all: leaving the stage means authenticating with None.
            self._authenticator = self._make_authenticator("None")
            if self._authenticator is None:
                raise LoginFailure(2, 1, "this target requires authentication")
            self._auth_done = True
        return response

    def _select_auth_method(self, value: str) -> str:
        offered = value.split(",")
        if any(method in RESERVED_ANSWERS for method in offered):
            raise _initiator_error(f"AuthMethod={value} proposes a reserved constant")
        for method in offered:
            authenticator = self._make_authenticator(method)
            if authenticator is not None:
                self._authenticator = authenticator
                self._auth_done = False
                return method
        # The RFC lets the target answer Reject here, but the login cannot go anywhere without
        # an agreed method, so we end it with the status that says why.
        raise LoginFailure(2, 1, f"no acceptable AuthMethod in {value}")

    # -- operational stage ---------------------------------------------------------------------

    def _operational_step(
        self, pairs: list[tuple[str, str]], transit: bool
    ) -> list[tuple[str, str]]:
        answered = self._settle_offers(pairs)
        slots: list[tuple[str, str]] = []
        proposals: list[tuple[str, str]] = []
        for key, value in pairs:
            if key in answered:
                continue
            if key in _IDENTITY_KEYS:
                self._declare_identity(key, value)
                continue
            if _is_security_key(key):
                raise _initiator_error(f"security key {key} in the operational stage")
            if key in _TARGET_ONLY_KEYS or key == "SendTargets":
                raise _initiator_error(f"{key} may not be sent by the initiator during login")
            self._note_seen(key)
            if key == _MRDSL:
                self._take_initiator_mrdsl(value)
                slots.append((key, self._declare_mrdsl()))
            elif key in _OBSOLETE_KEYS:
                slots.append((key, REJECT))
            elif key in _ISER_ONLY_KEYS:
                slots.append((key, IRRELEVANT))
            elif key in _NEGOTIATED:
                _check_not_reserved(key, value, _initiator_error)
                slots.append((key, ""))
                proposals.append((key, value))
            else:
                slots.append((key, NOT_UNDERSTOOD))

        # FirstBurstLength is bounded by the MaxBurstLength outcome and may be Irrelevant
        # depending on InitialR2T/ImmediateData, so it is decided after everything else.
        proposals.sort(key=lambda kv: kv[0] == "FirstBurstLength")
        decided = {key: self._accept(key, value) for key, value in proposals}
        response = [(key, decided.get(key, value)) for key, value in slots]

        if not self._declared_mrdsl:
            # Our receive limit is declarative and must reach the initiator even when it did
            # not declare its own; until then it would assume 8192.
            response.append((_MRDSL, self._declare_mrdsl()))
        if transit:
            response += self._make_offers()
        return response

    def _take_initiator_mrdsl(self, value: str) -> None:
        number = _parse_number(value)
        if number is None or not 512 <= number <= _DATA_LENGTH_MAX:
            # A declaration has no answer slot for Reject (ours occupies it), so an inadmissible
            # declaration can only end the login.
            raise _initiator_error(f"MaxRecvDataSegmentLength={value} is out of range")
        self.params.max_recv_data_segment_length = number

    def _declare_mrdsl(self) -> str:
        self._declared_mrdsl = True
        ours = self._limits.max_recv_data_segment_length
        self.params.target_max_recv_data_segment_length = ours
        return str(ours)

    def _accept(self, key: str, value: str) -> str:
        """Answer an initiator proposal for a negotiated key and record the outcome."""
        spec = _NEGOTIATED[key]
        self._negotiated.add(key)
        if spec.discovery_irrelevant and self.session_type == SESSION_DISCOVERY:
            return IRRELEVANT
        if key == "FirstBurstLength" and self._first_burst_irrelevant():
            return IRRELEVANT
        if spec.fn is _Fn.LIST:
            ours = self._our_list(key)
            chosen = next((v for v in value.split(",") if v in ours), None)
            if chosen is None:
                return REJECT
            result = chosen
        elif spec.fn in (_Fn.AND, _Fn.OR):
            if value not in ("Yes", "No"):
                return REJECT
            theirs = value == "Yes"
            mine = self._our_bool(key)
            result = _yes(theirs and mine if spec.fn is _Fn.AND else theirs or mine)
        else:
            number = _parse_number(value)
            if number is None or not spec.lo <= number <= spec.hi:
                return REJECT
            mine_n = self._our_number(key)
            result = str(min(number, mine_n) if spec.fn is _Fn.MIN else max(number, mine_n))
        self._record(key, result)
        return result

    def _record(self, key: str, value: str) -> None:
        self._values[key] = value
        spec = _NEGOTIATED[key]
        if spec.param is None:
            return
        if spec.fn is _Fn.LIST:
            setattr(self.params, spec.param, value == "CRC32C")
        elif spec.fn in (_Fn.AND, _Fn.OR):
            setattr(self.params, spec.param, value == "Yes")
        else:
            setattr(self.params, spec.param, int(value))

    def _our_list(self, key: str) -> tuple[str, ...]:
        if key == "HeaderDigest":
            return self._limits.header_digests
        if key == "DataDigest":
            return self._limits.data_digests
        return ("RFC3720",)

    def _our_bool(self, key: str) -> bool:
        limits = self._limits
        return {
            "InitialR2T": limits.initial_r2t,
            "ImmediateData": limits.immediate_data,
            "DataPDUInOrder": limits.data_pdu_in_order,
            "DataSequenceInOrder": limits.data_sequence_in_order,
            "RDMAExtensions": False,
        }[key]

    def _our_number(self, key: str) -> int:
        limits = self._limits
        if key == "FirstBurstLength":
            return min(limits.first_burst_length, self._prospective_int("MaxBurstLength"))
        return {
            "MaxConnections": limits.max_connections,
            "MaxBurstLength": limits.max_burst_length,
            "DefaultTime2Wait": limits.default_time2wait,
            "DefaultTime2Retain": limits.default_time2retain,
            "MaxOutstandingR2T": limits.max_outstanding_r2t,
            "ErrorRecoveryLevel": limits.error_recovery_level,
            "iSCSIProtocolLevel": _PROTOCOL_LEVEL,
        }[key]

    def _prospective(self, key: str) -> str:
        """The value a key is heading for: settled, offered, about to be offered, or default."""
        if key in self._values:
            return self._values[key]
        if key in self._offers:
            return self._offers[key][0]
        if key not in self._negotiated and self.session_type == SESSION_NORMAL:
            if key == "InitialR2T" and not self._limits.initial_r2t:
                return "No"
            if key == "ImmediateData" and not self._limits.immediate_data:
                return "No"
        return _NEGOTIATED[key].default

    def _prospective_int(self, key: str) -> int:
        return int(self._prospective(key))

    def _first_burst_irrelevant(self) -> bool:
        # RFC 7143 13.14: irrelevant when InitialR2T=Yes and ImmediateData=No, i.e. when no
        # unsolicited data can ever be sent.
        return (
            self._prospective("InitialR2T") == "Yes" and self._prospective("ImmediateData") == "No"
        )

    def _make_offers(self) -> list[tuple[str, str]]:
        """Offer only what the initiator left at an RFC default we cannot or would rather not use."""
        limits = self._limits
        offers: list[tuple[str, str]] = []

        def offer(key: str, value: str, required: bool) -> None:
            self._offers[key] = (value, required)
            self._negotiated.add(key)
            if not required:
                # An AND offer of No decides the outcome by itself (RFC 7143 6.2.2).
                self._record(key, value)
            offers.append((key, value))

        def untouched(key: str) -> bool:
            return key not in self._negotiated and key not in self._seen

        for key, ours in (
            ("HeaderDigest", limits.header_digests),
            ("DataDigest", limits.data_digests),
        ):
            if untouched(key) and "None" not in ours:
                offer(key, ",".join(ours), True)
        if self.session_type == SESSION_NORMAL:
            if untouched("InitialR2T") and not limits.initial_r2t:
                offer("InitialR2T", "No", True)
            if untouched("ImmediateData") and not limits.immediate_data:
                offer("ImmediateData", "No", False)
            if (
                untouched("MaxBurstLength")
                and int(_NEGOTIATED["MaxBurstLength"].default) > limits.max_burst_length
            ):
                offer("MaxBurstLength", str(limits.max_burst_length), True)
            if untouched("FirstBurstLength") and not self._first_burst_irrelevant():
                bound = min(limits.first_burst_length, self._prospective_int("MaxBurstLength"))
                if int(_NEGOTIATED["FirstBurstLength"].default) > bound:
                    offer("FirstBurstLength", str(bound), True)
        if (
            untouched("DefaultTime2Retain")
            and int(_NEGOTIATED["DefaultTime2Retain"].default) > limits.default_time2retain
        ):
            offer("DefaultTime2Retain", str(limits.default_time2retain), True)
        if (
            untouched("DefaultTime2Wait")
            and int(_NEGOTIATED["DefaultTime2Wait"].default) < limits.default_time2wait
        ):
            offer("DefaultTime2Wait", str(limits.default_time2wait), True)
        return offers

    def _settle_offers(self, pairs: list[tuple[str, str]]) -> set[str]:
        """Apply the initiator's answers to our offers from the previous response."""
        if not self._offers:
            return set()
        values = dict(pairs)
        answered: set[str] = set()
        for key, (offered, _required) in self._offers.items():
            answer = values.get(key)
            if answer is not None:
                answered.add(key)
            self._settle(key, offered, answer)
        self._offers.clear()
        return answered

    def _settle(self, key: str, offered: str, answer: str | None) -> None:
        spec = _NEGOTIATED[key]
        self._seen.add(key)
        if answer is None:
            # RFC 7143 requires an answer; an initiator that stays silent gets the value we
            # offered, which is the one we can honour (the same stance Linux LIO takes).
            self._record(key, offered)
            return
        if answer in RESERVED_ANSWERS:
            # RFC 7143 6.2: after Reject (or Irrelevant) the key keeps its current value; an
            # optional-answer offer (AND with No) has already set that value.
            return
        if spec.fn is _Fn.LIST:
            admissible = answer in offered.split(",")
        elif spec.fn in (_Fn.AND, _Fn.OR):
            if answer not in ("Yes", "No"):
                admissible = False
            else:
                mine, theirs = offered == "Yes", answer == "Yes"
                outcome = (mine and theirs) if spec.fn is _Fn.AND else (mine or theirs)
                admissible = outcome == theirs
        else:
            number = _parse_number(answer)
            admissible = (
                number is not None
                and spec.lo <= number <= spec.hi
                and (number <= int(offered) if spec.fn is _Fn.MIN else number >= int(offered))
            )
        if not admissible:
            raise _initiator_error(f"{key}={answer} is not an admissible answer to {key}={offered}")
        self._record(key, answer)

    # -- outcome -------------------------------------------------------------------------------

    def _check_outcome(self) -> None:
        """Cross-key rules and limits that defaults (left by Reject answers) could break."""
        params, limits = self.params, self._limits
        if not params.header_digest and "None" not in limits.header_digests:
            raise _initiator_error("login ended without the header digest this target requires")
        if not params.data_digest and "None" not in limits.data_digests:
            raise _initiator_error("login ended without the data digest this target requires")
        if params.default_time2retain > limits.default_time2retain:
            raise _initiator_error("DefaultTime2Retain above this target's limit")
        if self.session_type == SESSION_DISCOVERY:
            return
        if params.max_burst_length > limits.max_burst_length:
            raise _initiator_error("MaxBurstLength above this target's limit")
        if params.immediate_data and not limits.immediate_data:
            raise _initiator_error("ImmediateData=Yes although this target refuses it")
        if not (params.initial_r2t and not params.immediate_data):
            if params.first_burst_length > params.max_burst_length:
                raise _initiator_error("FirstBurstLength exceeds MaxBurstLength")
            if params.first_burst_length > limits.first_burst_length:
                raise _initiator_error("FirstBurstLength above this target's limit")


def _check_unique(pairs: list[tuple[str, str]], error: Callable[[str], Exception]) -> None:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        for key in keys:
            if key in seen:
                raise error(f"{key} appears twice in one request")
            seen.add(key)


def _check_not_reserved(key: str, value: str, error: Callable[[str], Exception]) -> None:
    if any(item in RESERVED_ANSWERS for item in value.split(",")):
        raise error(f"{key}={value} proposes a reserved constant")


# ---------------------------------------------------------------------------------------------
# Text negotiation in full feature phase
# ---------------------------------------------------------------------------------------------


class TextNegotiator:
    """Keys in Text Requests after login (RFC 7143 section 6.4 and the Use of each key).

    SendTargets is passed back to the caller, who owns the target list. The only other keys a
    Text Request may carry after login are the ones whose Use is ALL: MaxRecvDataSegmentLength
    (a fresh declaration from the initiator, applied to ``params``) and InitiatorAlias. Standard
    keys that can only be negotiated during login are answered Reject; unknown and private (X-,
    X#) keys NotUnderstood. Malformed requests raise :class:`NegotiationError`.
    """

    def __init__(self, params: SessionParams) -> None:
        self.params = params
        self.initiator_alias: str | None = None

    def step(self, pairs: list[tuple[str, str]]) -> TextResult:
        _check_unique(pairs, NegotiationError)
        result = TextResult([])
        for key, value in pairs:
            if key in _TARGET_ONLY_KEYS:
                raise NegotiationError(f"{key} may not be sent by an initiator")
            if key == "SendTargets":
                result.send_targets = value
            elif key == _MRDSL:
                number = _parse_number(value)
                if number is None or not 512 <= number <= _DATA_LENGTH_MAX:
                    result.response.append((key, REJECT))
                else:
                    self.params.max_recv_data_segment_length = number
            elif key == "InitiatorAlias":
                self.initiator_alias = value
            elif key in _OPERATIONAL_KEYS or key in _IDENTITY_KEYS or _is_security_key(key):
                _check_not_reserved(key, value, NegotiationError)
                result.response.append((key, REJECT))
            else:
                result.response.append((key, NOT_UNDERSTOOD))
        return result
