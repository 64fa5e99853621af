"""Login/Text key format and negotiation (RFC 7143 sections 6, 12, 13).

The initiator key sets below are the ones open-iscsi (usr/login.c) and libiscsi (lib/login.c)
put in their Login Requests with default settings, in their order. What each initiator accepts
back is modelled from the same sources so the tests fail if we answer something it would choke
on.
"""

from __future__ import annotations

import contextlib
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from target.keys import (
    LONG_VALUE_MAX_LEN,
    VALUE_MAX_LEN,
    LoginFailure,
    LoginNegotiator,
    NegotiationError,
    SessionParams,
    Stage,
    StepResult,
    TargetLimits,
    TextFormatError,
    TextNegotiator,
    encode_text,
    parse_text,
)

INITIATOR = "iqn.2004-10.com.ubuntu:01:5c0ffee1d00d"
TARGET = "iqn.2024-01.org.emuhba:disk0"

Pairs = list[tuple[str, str]]

# ---------------------------------------------------------------------------------------------
# Real initiator key sets
# ---------------------------------------------------------------------------------------------

# open-iscsi always starts in the security stage (it always has an auth client) and offers
# AuthMethod=None when no CHAP credentials are configured.
OPEN_ISCSI_SECURITY_NORMAL: Pairs = [
    ("InitiatorName", INITIATOR),
    ("InitiatorAlias", "host1"),
    ("TargetName", TARGET),
    ("SessionType", "Normal"),
    ("AuthMethod", "None"),
]

# fill_op_params_text() with iscsid.conf defaults, Normal session over TCP.
OPEN_ISCSI_OPERATIONAL_NORMAL: Pairs = [
    ("HeaderDigest", "None"),
    ("DataDigest", "None"),
    ("DefaultTime2Wait", "2"),
    ("DefaultTime2Retain", "0"),
    ("IFMarker", "No"),
    ("OFMarker", "No"),
    ("ErrorRecoveryLevel", "0"),
    ("InitialR2T", "No"),
    ("ImmediateData", "Yes"),
    ("MaxBurstLength", "16776192"),
    ("FirstBurstLength", "262144"),
    ("MaxOutstandingR2T", "1"),
    ("MaxConnections", "1"),
    ("DataPDUInOrder", "Yes"),
    ("DataSequenceInOrder", "Yes"),
    ("MaxRecvDataSegmentLength", "262144"),
]

OPEN_ISCSI_SECURITY_DISCOVERY: Pairs = [
    ("InitiatorName", INITIATOR),
    ("SessionType", "Discovery"),
    ("AuthMethod", "None"),
]

# Discovery sessions only offer the keys relevant to them; the default discovery
# MaxRecvDataSegmentLength (32768) is why open-iscsi goes through this stage at all.
OPEN_ISCSI_OPERATIONAL_DISCOVERY: Pairs = [
    ("HeaderDigest", "None"),
    ("DataDigest", "None"),
    ("DefaultTime2Wait", "2"),
    ("DefaultTime2Retain", "0"),
    ("IFMarker", "No"),
    ("OFMarker", "No"),
    ("ErrorRecoveryLevel", "0"),
    ("MaxRecvDataSegmentLength", "32768"),
]

# iscsi_login_async() without CHAP credentials: straight into the operational stage, T=1 to
# full feature phase, every key in one request.
LIBISCSI_OPERATIONAL_NORMAL: Pairs = [
    ("InitiatorName", "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test"),
    ("TargetName", TARGET),
    ("SessionType", "Normal"),
    ("HeaderDigest", "None,CRC32C"),
    ("DataDigest", "None"),
    ("InitialR2T", "No"),
    ("ImmediateData", "Yes"),
    ("MaxBurstLength", "262144"),
    ("FirstBurstLength", "262144"),
    ("DefaultTime2Wait", "2"),
    ("DefaultTime2Retain", "0"),
    ("MaxOutstandingR2T", "1"),
    ("ErrorRecoveryLevel", "0"),
    ("IFMarker", "No"),
    ("OFMarker", "No"),
    ("MaxConnections", "1"),
    ("MaxRecvDataSegmentLength", "262144"),
    ("DataPDUInOrder", "Yes"),
    ("DataSequenceInOrder", "Yes"),
]

LIBISCSI_OPERATIONAL_DISCOVERY: Pairs = [
    (k, "Discovery" if k == "SessionType" else v)
    for k, v in LIBISCSI_OPERATIONAL_NORMAL
    if k != "TargetName"
]

# With CHAP credentials configured libiscsi opens the security stage offering CHAP or None.
LIBISCSI_SECURITY_CHAP_OFFER: Pairs = [
    ("InitiatorName", "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test"),
    ("TargetName", TARGET),
    ("SessionType", "Normal"),
    ("AuthMethod", "CHAP,None"),
]

# ---------------------------------------------------------------------------------------------
# What those initiators accept in a Login Response
# ---------------------------------------------------------------------------------------------

# get_security_text_keys(): these, or keys the auth library knows; anything else fails login.
OPEN_ISCSI_SECURITY_ACCEPTS = {
    "TargetAlias",
    "TargetAddress",
    "TargetPortalGroupTag",
    "AuthMethod",
    "CHAP_A",
    "CHAP_I",
    "CHAP_C",
    "CHAP_N",
    "CHAP_R",
}
# get_op_params_text_keys(): any other key is "couldn't recognize text" and fails login.
OPEN_ISCSI_OPERATIONAL_ACCEPTS = {
    "TargetAlias",
    "TargetAddress",
    "TargetPortalGroupTag",
    "InitialR2T",
    "ImmediateData",
    "MaxRecvDataSegmentLength",
    "FirstBurstLength",
    "MaxBurstLength",
    "HeaderDigest",
    "DataDigest",
    "DefaultTime2Wait",
    "DefaultTime2Retain",
    "OFMarker",
    "OFMarkInt",
    "IFMarker",
    "IFMarkInt",
    "DataPDUInOrder",
    "DataSequenceInOrder",
    "MaxOutstandingR2T",
    "MaxConnections",
    "ErrorRecoveryLevel",
    "RDMAExtensions",
    "InitiatorRecvDataSegmentLength",
    "TargetRecvDataSegmentLength",
}


def assert_open_iscsi_accepts(stage: Stage, response: Pairs, *, normal: bool) -> None:
    keys = [k for k, _ in response]
    assert len(keys) == len(set(keys)), keys
    for key, value in response:
        if stage is Stage.SECURITY:
            assert key in OPEN_ISCSI_SECURITY_ACCEPTS, key
            if key == "AuthMethod":
                assert value == "None"
            continue
        assert key in OPEN_ISCSI_OPERATIONAL_ACCEPTS, key
        if key in ("HeaderDigest", "DataDigest"):
            assert value in ("None", "CRC32C")
        if key in ("MaxOutstandingR2T", "MaxConnections") and normal:
            assert value == "1"
        if key == "ErrorRecoveryLevel":
            assert value == "0"
        if key == "MaxRecvDataSegmentLength":
            assert 512 <= int(value) < 1 << 24


# iscsi_process_login_reply() looks only at these keys and ignores the rest.
LIBISCSI_PARSES = {
    "TargetAddress",
    "HeaderDigest",
    "FirstBurstLength",
    "InitialR2T",
    "ImmediateData",
    "MaxBurstLength",
    "MaxRecvDataSegmentLength",
    "AuthMethod",
}


def assert_libiscsi_accepts(response: Pairs, *, normal: bool = True) -> None:
    for key, value in response:
        if key not in LIBISCSI_PARSES:
            continue
        # It strtol()s the numbers it keeps and has no notion of Reject for them.
        assert value not in ("Reject", "NotUnderstood"), (key, value)
        if key == "MaxRecvDataSegmentLength":
            assert 512 <= int(value) < 1 << 24
        if key == "HeaderDigest":
            assert value in ("None", "CRC32C")
        if normal and key in ("FirstBurstLength", "MaxBurstLength"):
            assert 512 <= int(value) < 1 << 24


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def negotiator(limits: TargetLimits | None = None, **kwargs: object) -> LoginNegotiator:
    return LoginNegotiator(limits or TargetLimits(), **kwargs)  # type: ignore[arg-type]


def security(n: LoginNegotiator, pairs: Pairs, *, first: bool = True) -> StepResult:
    return n.step(Stage.SECURITY, pairs, first=first, transit=True, next_stage=Stage.OPERATIONAL)


def operational(
    n: LoginNegotiator, pairs: Pairs, *, first: bool = False, transit: bool = True
) -> StepResult:
    return n.step(
        Stage.OPERATIONAL, pairs, first=first, transit=transit, next_stage=Stage.FULL_FEATURE
    )


def logged_in_normal(limits: TargetLimits | None = None, **kwargs: object) -> LoginNegotiator:
    """A negotiator past a plain security stage of a Normal session."""
    n = negotiator(limits, **kwargs)
    assert security(n, [("InitiatorName", INITIATOR), ("TargetName", TARGET)]).complete
    return n


def answer(response: Pairs, key: str) -> str:
    values = [v for k, v in response if k == key]
    assert len(values) == 1, (key, response)
    return values[0]


def failure(exc: pytest.ExceptionInfo[LoginFailure]) -> tuple[int, int]:
    return exc.value.status_class, exc.value.status_detail


# ---------------------------------------------------------------------------------------------
# Text format
# ---------------------------------------------------------------------------------------------


class TestParseText:
    def test_pairs_in_order_with_and_without_trailing_nul(self) -> None:
        data = b"InitiatorName=iqn.x\0SessionType=Normal\0"
        expected = [("InitiatorName", "iqn.x"), ("SessionType", "Normal")]
        assert parse_text(data) == expected
        assert parse_text(data[:-1]) == expected
        assert parse_text(memoryview(data + b"\0\0\0")) == expected

    def test_empty_input(self) -> None:
        assert parse_text(b"") == []
        assert parse_text(b"\0\0") == []

    def test_value_may_contain_equals_and_be_empty(self) -> None:
        assert parse_text(b"CHAP_C=0bAAAA==\0InitiatorAlias=\0") == [
            ("CHAP_C", "0bAAAA=="),
            ("InitiatorAlias", ""),
        ]

    def test_utf8_values(self) -> None:
        assert parse_text("TargetAlias=Disque été\0".encode()) == [("TargetAlias", "Disque été")]

    @pytest.mark.parametrize(
        "data",
        [
            b"InitiatorName\0",  # no '='
            b"A=1\0\0B=2\0",  # empty item in the middle
            b"=value\0",  # empty key
            b"1Key=v\0",  # key must start with a letter
            b"Key Name=v\0",  # space not in the key alphabet
            b"K\xc3\xa9y=v\0",  # non-ASCII key
            b"InitiatorAlias=\xff\xfe\0",  # not UTF-8
        ],
    )
    def test_malformed(self, data: bytes) -> None:
        with pytest.raises(TextFormatError):
            parse_text(data)

    def test_key_length_limit(self) -> None:
        ok = "X-" + "k" * 61
        assert parse_text(f"{ok}=1".encode()) == [(ok, "1")]
        with pytest.raises(TextFormatError):
            parse_text(f"{ok}k=1".encode())

    def test_simple_value_limit_is_255(self) -> None:
        assert parse_text(b"TargetName=" + b"a" * VALUE_MAX_LEN)
        with pytest.raises(TextFormatError):
            parse_text(b"TargetName=" + b"a" * (VALUE_MAX_LEN + 1))

    def test_long_values_for_auth_list_and_private_keys(self) -> None:
        chap_c = "0x" + "ab" * 1024  # a 1024-byte CHAP challenge in hex
        assert parse_text(f"CHAP_C={chap_c}".encode()) == [("CHAP_C", chap_c)]
        assert parse_text(b"X-com.example.blob=" + b"v" * LONG_VALUE_MAX_LEN)
        with pytest.raises(TextFormatError):
            parse_text(b"X-com.example.blob=" + b"v" * (LONG_VALUE_MAX_LEN + 1))

    def test_rfc7144_and_public_extension_key_names(self) -> None:
        assert parse_text(b"iSCSIProtocolLevel=1\0X#NodeArchitecture=Linux\0") == [
            ("iSCSIProtocolLevel", "1"),
            ("X#NodeArchitecture", "Linux"),
        ]


class TestEncodeText:
    def test_each_pair_nul_terminated(self) -> None:
        assert encode_text([("A", "1"), ("TargetAlias", "é")]) == "A=1\0TargetAlias=é\0".encode()
        assert encode_text([]) == b""

    @pytest.mark.parametrize(
        "pair", [("Bad Key", "v"), ("", "v"), ("Key", "a\0b"), ("K" * 64, "v"), ("Key", "\ud800")]
    )
    def test_unencodable(self, pair: tuple[str, str]) -> None:
        with pytest.raises(TextFormatError):
            encode_text([pair])


_key_chars = st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-+@_#")
keys = st.builds(
    lambda head, tail: head + tail,
    st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"),
    st.text(_key_chars, max_size=62),
)
values = st.text(st.characters(blacklist_characters="\0", blacklist_categories=["Cs"])).filter(
    lambda v: len(v.encode("utf-8")) <= VALUE_MAX_LEN
)


@given(st.binary(max_size=600))
def test_parse_text_only_raises_text_format_error(data: bytes) -> None:
    try:
        pairs = parse_text(data)
    except TextFormatError:
        return
    for key, value in pairs:
        assert isinstance(key, str) and isinstance(value, str)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["HeaderDigest", "MaxBurstLength", "X-a", "=", "A=B", ""]),
            st.binary(max_size=300),
        ),
        max_size=6,
    ),
    st.binary(max_size=3),
)
def test_parse_text_structured_garbage(items: list[tuple[str, bytes]], tail: bytes) -> None:
    # Near-valid input reaches the per-item checks that random bytes rarely get to.
    data = b"\0".join(k.encode() + b"=" + v for k, v in items) + tail
    with contextlib.suppress(TextFormatError):
        parse_text(data)


@given(st.lists(st.tuples(keys, values), max_size=8))
def test_encode_parse_round_trip(pairs: Pairs) -> None:
    assert parse_text(encode_text(pairs)) == pairs


# ---------------------------------------------------------------------------------------------
# Whole logins from real initiators
# ---------------------------------------------------------------------------------------------


class TestOpenIscsi:
    def test_normal_session(self) -> None:
        n = negotiator(target_alias="emuhba disk 0")
        sec = security(n, OPEN_ISCSI_SECURITY_NORMAL)
        assert sec.complete
        assert sec.response == [
            ("TargetAlias", "emuhba disk 0"),
            ("TargetPortalGroupTag", "1"),
            ("AuthMethod", "None"),
        ]
        assert_open_iscsi_accepts(Stage.SECURITY, sec.response, normal=True)
        assert (n.initiator_name, n.initiator_alias, n.target_name, n.session_type) == (
            INITIATOR,
            "host1",
            TARGET,
            "Normal",
        )

        op = operational(n, OPEN_ISCSI_OPERATIONAL_NORMAL)
        assert op.complete
        assert_open_iscsi_accepts(Stage.OPERATIONAL, op.response, normal=True)
        # Every key answered, in the initiator's order; markers rejected per RFC 7143 13.25.
        assert [k for k, _ in op.response] == [k for k, _ in OPEN_ISCSI_OPERATIONAL_NORMAL]
        assert answer(op.response, "IFMarker") == "Reject"
        assert answer(op.response, "MaxBurstLength") == "1048576"
        assert answer(op.response, "MaxRecvDataSegmentLength") == "262144"

        params = n.finish()
        assert params == SessionParams(
            header_digest=False,
            data_digest=False,
            max_connections=1,
            initial_r2t=False,
            immediate_data=True,
            max_recv_data_segment_length=262144,
            target_max_recv_data_segment_length=262144,
            max_burst_length=1048576,
            first_burst_length=262144,
            default_time2wait=2,
            default_time2retain=0,
            max_outstanding_r2t=1,
            data_pdu_in_order=True,
            data_sequence_in_order=True,
            error_recovery_level=0,
        )

    def test_normal_session_with_digests_preferred(self) -> None:
        n = negotiator()
        security(n, OPEN_ISCSI_SECURITY_NORMAL)
        pairs = [
            (k, "CRC32C,None" if k in ("HeaderDigest", "DataDigest") else v)
            for k, v in OPEN_ISCSI_OPERATIONAL_NORMAL
        ]
        op = operational(n, pairs)
        assert answer(op.response, "HeaderDigest") == "CRC32C"
        assert answer(op.response, "DataDigest") == "CRC32C"
        assert_open_iscsi_accepts(Stage.OPERATIONAL, op.response, normal=True)
        params = n.finish()
        assert params.header_digest and params.data_digest

    def test_discovery_session(self) -> None:
        n = negotiator(target_alias="not for discovery")
        sec = security(n, OPEN_ISCSI_SECURITY_DISCOVERY)
        assert sec.response == [("AuthMethod", "None")]
        assert_open_iscsi_accepts(Stage.SECURITY, sec.response, normal=False)
        op = operational(n, OPEN_ISCSI_OPERATIONAL_DISCOVERY)
        assert op.complete
        assert_open_iscsi_accepts(Stage.OPERATIONAL, op.response, normal=False)
        assert [k for k, _ in op.response] == [k for k, _ in OPEN_ISCSI_OPERATIONAL_DISCOVERY]
        params = n.finish()
        assert n.session_type == "Discovery" and n.target_name is None
        assert params.max_recv_data_segment_length == 32768
        assert params.target_max_recv_data_segment_length == 262144

    def test_discovery_straight_to_full_feature(self) -> None:
        # With the default 8192 MaxRecvDataSegmentLength open-iscsi skips the operational
        # stage; both sides then keep the RFC defaults, including our 8192.
        n = negotiator()
        result = n.step(
            Stage.SECURITY,
            OPEN_ISCSI_SECURITY_DISCOVERY,
            first=True,
            transit=True,
            next_stage=Stage.FULL_FEATURE,
        )
        assert result.complete
        params = n.finish()
        assert params.max_recv_data_segment_length == 8192
        assert params.target_max_recv_data_segment_length == 8192


class TestLibiscsi:
    def test_normal_session_without_security_stage(self) -> None:
        n = negotiator(target_alias="emuhba")
        op = n.step(
            Stage.OPERATIONAL,
            LIBISCSI_OPERATIONAL_NORMAL,
            first=True,
            transit=True,
            next_stage=Stage.FULL_FEATURE,
        )
        # libiscsi re-sends every key if T comes back 0, which would be a renegotiation:
        # the first answer must complete the stage.
        assert op.complete
        assert_libiscsi_accepts(op.response)
        assert op.response[:2] == [("TargetAlias", "emuhba"), ("TargetPortalGroupTag", "1")]
        assert answer(op.response, "HeaderDigest") == "None"  # initiator's order wins
        assert n.auth_method == "None"
        params = n.finish()
        assert params.max_burst_length == 262144
        assert params.first_burst_length == 262144
        assert not params.initial_r2t and params.immediate_data

    def test_discovery_session_answers_irrelevant(self) -> None:
        n = negotiator()
        op = n.step(
            Stage.OPERATIONAL,
            LIBISCSI_OPERATIONAL_DISCOVERY,
            first=True,
            transit=True,
            next_stage=Stage.FULL_FEATURE,
        )
        assert op.complete
        irrelevant = {
            "InitialR2T",
            "ImmediateData",
            "MaxBurstLength",
            "FirstBurstLength",
            "MaxOutstandingR2T",
            "MaxConnections",
            "DataPDUInOrder",
            "DataSequenceInOrder",
        }
        for key, value in op.response:
            assert (value == "Irrelevant") == (key in irrelevant), (key, value)
        assert ("TargetPortalGroupTag", "1") not in op.response
        assert_libiscsi_accepts(op.response, normal=False)
        assert answer(op.response, "ErrorRecoveryLevel") == "0"
        assert answer(op.response, "DefaultTime2Retain") == "0"
        assert n.finish().max_recv_data_segment_length == 262144

    def test_chap_offered_none_accepted_then_names_repeated(self) -> None:
        # libiscsi keeps sending InitiatorName/TargetName/SessionType while its CHAP state has
        # not advanced, i.e. again in the operational stage when the target chose None.
        n = negotiator()
        sec = security(n, LIBISCSI_SECURITY_CHAP_OFFER)
        assert answer(sec.response, "AuthMethod") == "None" and sec.complete
        op = operational(n, LIBISCSI_OPERATIONAL_NORMAL)
        assert op.complete
        assert_libiscsi_accepts(op.response)
        assert "InitiatorName" not in dict(op.response)
        n.finish()


# ---------------------------------------------------------------------------------------------
# Individual rules
# ---------------------------------------------------------------------------------------------


class TestListNegotiation:
    @pytest.mark.parametrize(
        ("offer", "chosen"),
        [
            ("CRC32C,None", "CRC32C"),
            ("None,CRC32C", "None"),
            ("X-com.example.crc64,CRC32C", "CRC32C"),  # values we do not know are skipped
            ("md5,sha1", "Reject"),
        ],
    )
    def test_first_supported_initiator_value(self, offer: str, chosen: str) -> None:
        n = logged_in_normal()
        op = operational(n, [("HeaderDigest", offer)], transit=False)
        assert answer(op.response, "HeaderDigest") == chosen
        assert n.params.header_digest == (chosen == "CRC32C")

    def test_none_only_when_target_allows_it(self) -> None:
        n = logged_in_normal(TargetLimits(header_digests=("CRC32C",)))
        op = operational(n, [("HeaderDigest", "None")])
        assert answer(op.response, "HeaderDigest") == "Reject"
        with pytest.raises(LoginFailure) as exc:
            n.finish()
        assert failure(exc) == (2, 0)

    def test_task_reporting(self) -> None:
        n = logged_in_normal()
        op = operational(n, [("TaskReporting", "FastAbort,RFC3720")])
        assert answer(op.response, "TaskReporting") == "RFC3720"
        n = logged_in_normal()
        assert (
            answer(operational(n, [("TaskReporting", "FastAbort")]).response, "TaskReporting")
            == "Reject"
        )


class TestNumericalNegotiation:
    @pytest.mark.parametrize(
        ("key", "offer", "expected", "attr"),
        [
            ("MaxConnections", "4", "1", "max_connections"),
            ("MaxBurstLength", "65536", "65536", "max_burst_length"),
            ("MaxBurstLength", "16776192", "1048576", "max_burst_length"),
            ("FirstBurstLength", "1048576", "262144", "first_burst_length"),
            ("FirstBurstLength", "8192", "8192", "first_burst_length"),
            ("MaxOutstandingR2T", "32", "8", "max_outstanding_r2t"),
            ("MaxOutstandingR2T", "1", "1", "max_outstanding_r2t"),
            ("DefaultTime2Retain", "3600", "20", "default_time2retain"),
            ("DefaultTime2Retain", "0", "0", "default_time2retain"),
            ("ErrorRecoveryLevel", "2", "0", "error_recovery_level"),
            ("DefaultTime2Wait", "0", "2", "default_time2wait"),  # Maximum
            ("DefaultTime2Wait", "10", "10", "default_time2wait"),
            ("MaxBurstLength", "0x10000", "65536", "max_burst_length"),  # hex constant
        ],
    )
    def test_result_function(self, key: str, offer: str, expected: str, attr: str) -> None:
        n = logged_in_normal()
        op = operational(n, [(key, offer)], transit=False)
        assert answer(op.response, key) == expected
        assert getattr(n.params, attr) == int(expected)

    def test_protocol_level_capped_at_rfc7143(self) -> None:
        n = logged_in_normal()
        assert (
            answer(operational(n, [("iSCSIProtocolLevel", "2")]).response, "iSCSIProtocolLevel")
            == "1"
        )

    @pytest.mark.parametrize(
        ("key", "lo", "hi"),
        [
            ("MaxBurstLength", 512, (1 << 24) - 1),
            ("FirstBurstLength", 512, (1 << 24) - 1),
            ("MaxConnections", 1, 65535),
            ("DefaultTime2Wait", 0, 3600),
            ("DefaultTime2Retain", 0, 3600),
            ("MaxOutstandingR2T", 1, 65535),
            ("ErrorRecoveryLevel", 0, 2),
        ],
    )
    def test_range_bounds(self, key: str, lo: int, hi: int) -> None:
        for value, admissible in ((lo, True), (hi, True), (lo - 1, False), (hi + 1, False)):
            if value < 0:
                continue
            n = logged_in_normal()
            before = getattr(n.params, _ATTR[key])
            result = answer(operational(n, [(key, str(value))], transit=False).response, key)
            assert (result != "Reject") == admissible, (key, value, result)
            if not admissible:
                assert getattr(n.params, _ATTR[key]) == before  # left at its default

    @pytest.mark.parametrize("value", ["", "abc", "-1", "0x", "0xZZ", "1.5", " 512", "+512", "٥١٢"])
    def test_malformed_numbers_rejected(self, value: str) -> None:
        n = logged_in_normal()
        assert (
            answer(operational(n, [("MaxBurstLength", value)]).response, "MaxBurstLength")
            == "Reject"
        )
        assert n.params.max_burst_length == 262144


_ATTR = {
    "MaxBurstLength": "max_burst_length",
    "FirstBurstLength": "first_burst_length",
    "MaxConnections": "max_connections",
    "DefaultTime2Wait": "default_time2wait",
    "DefaultTime2Retain": "default_time2retain",
    "MaxOutstandingR2T": "max_outstanding_r2t",
    "ErrorRecoveryLevel": "error_recovery_level",
}


class TestBooleanNegotiation:
    @pytest.mark.parametrize(
        ("key", "ours", "offer", "expected"),
        [
            # OR: either side's Yes wins.
            ("InitialR2T", False, "Yes", "Yes"),
            ("InitialR2T", False, "No", "No"),
            ("InitialR2T", True, "No", "Yes"),
            ("DataPDUInOrder", False, "No", "No"),
            ("DataPDUInOrder", True, "No", "Yes"),
            ("DataSequenceInOrder", False, "Yes", "Yes"),
            ("DataSequenceInOrder", False, "No", "No"),
            # AND: either side's No wins.
            ("ImmediateData", True, "Yes", "Yes"),
            ("ImmediateData", True, "No", "No"),
            ("ImmediateData", False, "Yes", "No"),
        ],
    )
    def test_result_function(self, key: str, ours: bool, offer: str, expected: str) -> None:
        field = {
            "InitialR2T": "initial_r2t",
            "DataPDUInOrder": "data_pdu_in_order",
            "DataSequenceInOrder": "data_sequence_in_order",
            "ImmediateData": "immediate_data",
        }[key]
        n = logged_in_normal(TargetLimits(**{field: ours}))  # type: ignore[arg-type]
        op = operational(n, [(key, offer)], transit=False)
        assert answer(op.response, key) == expected
        assert getattr(n.params, field) == (expected == "Yes")

    @pytest.mark.parametrize("value", ["yes", "YES", "1", "true", ""])
    def test_malformed_boolean_rejected(self, value: str) -> None:
        n = logged_in_normal()
        assert (
            answer(operational(n, [("ImmediateData", value)]).response, "ImmediateData") == "Reject"
        )

    def test_rdma_extensions_always_no_over_tcp(self) -> None:
        n = logged_in_normal()
        op = operational(n, [("RDMAExtensions", "Yes"), ("InitiatorRecvDataSegmentLength", "8192")])
        assert op.response[:2] == [
            ("RDMAExtensions", "No"),
            ("InitiatorRecvDataSegmentLength", "Irrelevant"),
        ]


class TestDeclarations:
    def test_mrdsl_declared_once_even_if_initiator_is_silent(self) -> None:
        n = logged_in_normal(TargetLimits(max_recv_data_segment_length=65536))
        first = operational(n, [("HeaderDigest", "None")], transit=False)
        assert answer(first.response, "MaxRecvDataSegmentLength") == "65536"
        second = operational(n, [("DataDigest", "None")])
        assert "MaxRecvDataSegmentLength" not in dict(second.response)
        params = n.finish()
        assert params.max_recv_data_segment_length == 8192  # initiator never declared
        assert params.target_max_recv_data_segment_length == 65536

    def test_mrdsl_answer_is_our_declaration(self) -> None:
        n = logged_in_normal()
        op = operational(n, [("MaxRecvDataSegmentLength", "4096")], transit=False)
        assert op.response == [("MaxRecvDataSegmentLength", "262144")]
        assert n.params.max_recv_data_segment_length == 4096

    @pytest.mark.parametrize("value", ["511", "16777216", "lots", ""])
    def test_inadmissible_mrdsl_fails_login(self, value: str) -> None:
        n = logged_in_normal()
        with pytest.raises(LoginFailure) as exc:
            operational(n, [("MaxRecvDataSegmentLength", value)])
        assert failure(exc) == (2, 0)

    def test_initiator_alias_may_arrive_later(self) -> None:
        n = logged_in_normal()
        operational(n, [("InitiatorAlias", "late alias")])
        assert n.initiator_alias == "late alias"


class TestIrrelevant:
    @pytest.mark.parametrize("fbl_first", [True, False])
    def test_first_burst_irrelevant_without_unsolicited_data(self, fbl_first: bool) -> None:
        pairs = [("InitialR2T", "Yes"), ("ImmediateData", "No")]
        pairs = (
            [("FirstBurstLength", "65536"), *pairs]
            if fbl_first
            else [*pairs, ("FirstBurstLength", "65536")]
        )
        n = logged_in_normal()
        op = operational(n, pairs)
        assert answer(op.response, "FirstBurstLength") == "Irrelevant"
        n.finish()

    def test_first_burst_relevant_with_immediate_data(self) -> None:
        n = logged_in_normal()
        op = operational(
            n, [("FirstBurstLength", "65536"), ("InitialR2T", "Yes"), ("ImmediateData", "Yes")]
        )
        assert answer(op.response, "FirstBurstLength") == "65536"

    def test_first_burst_bounded_by_max_burst_of_same_request(self) -> None:
        n = logged_in_normal()
        op = operational(n, [("FirstBurstLength", "262144"), ("MaxBurstLength", "16384")])
        assert answer(op.response, "FirstBurstLength") == "16384"
        params = n.finish()
        assert params.first_burst_length <= params.max_burst_length


class TestUnknownKeys:
    @pytest.mark.parametrize("key", ["X-com.example.Foo", "X#NodeArchitecture", "FutureKey"])
    def test_not_understood_in_both_stages(self, key: str) -> None:
        n = negotiator()
        sec = security(n, [("InitiatorName", INITIATOR), ("TargetName", TARGET), (key, "1")])
        assert answer(sec.response, key) == "NotUnderstood"
        n = logged_in_normal()
        assert operational(n, [(key, "Reject")]).response[0] == (key, "NotUnderstood")

    def test_markers_rejected_not_not_understood(self) -> None:
        n = logged_in_normal()
        op = operational(
            n,
            [
                ("IFMarker", "Yes"),
                ("OFMarker", "No"),
                ("IFMarkInt", "2048~8192"),
                ("OFMarkInt", "8192"),
            ],
        )
        assert [v for _, v in op.response[:4]] == ["Reject"] * 4


class TestProtocolErrors:
    def test_key_twice_in_one_request(self) -> None:
        n = logged_in_normal()
        with pytest.raises(LoginFailure) as exc:
            operational(n, [("MaxBurstLength", "65536"), ("MaxBurstLength", "65536")])
        assert failure(exc) == (2, 0)

    def test_key_renegotiated_in_a_later_request(self) -> None:
        n = logged_in_normal()
        operational(n, [("MaxBurstLength", "65536")], transit=False)
        with pytest.raises(LoginFailure) as exc:
            operational(n, [("MaxBurstLength", "65536")])
        assert failure(exc) == (2, 0)

    def test_unknown_key_twice_across_requests(self) -> None:
        n = logged_in_normal()
        operational(n, [("X-com.example.Foo", "1")], transit=False)
        with pytest.raises(LoginFailure):
            operational(n, [("X-com.example.Foo", "1")])

    def test_identity_key_changed(self) -> None:
        n = logged_in_normal()
        with pytest.raises(LoginFailure) as exc:
            operational(n, [("InitiatorName", "iqn.1994-05.com.redhat:other")])
        assert failure(exc) == (2, 0)
        n = logged_in_normal()
        with pytest.raises(LoginFailure):
            operational(n, [("SessionType", "Discovery")])

    @pytest.mark.parametrize("value", ["Reject", "Irrelevant", "NotUnderstood", "None,Reject"])
    def test_reserved_constant_as_proposal(self, value: str) -> None:
        key = "HeaderDigest" if "," in value else "MaxBurstLength"
        n = logged_in_normal()
        with pytest.raises(LoginFailure) as exc:
            operational(n, [(key, value)])
        assert failure(exc) == (2, 0)

    @pytest.mark.parametrize("key", ["AuthMethod", "CHAP_A", "SRP_U"])
    def test_security_key_in_operational_stage(self, key: str) -> None:
        n = logged_in_normal()
        with pytest.raises(LoginFailure) as exc:
            operational(n, [(key, "5")])
        assert failure(exc) == (2, 0)

    @pytest.mark.parametrize(
        "key", ["HeaderDigest", "MaxRecvDataSegmentLength", "IFMarker", "SendTargets"]
    )
    def test_operational_key_in_security_stage(self, key: str) -> None:
        n = negotiator()
        with pytest.raises(LoginFailure) as exc:
            security(
                n,
                [
                    ("InitiatorName", INITIATOR),
                    ("TargetName", TARGET),
                    ("AuthMethod", "None"),
                    (key, "None"),
                ],
            )
        assert failure(exc) == (2, 0)

    @pytest.mark.parametrize(
        "key", ["TargetAlias", "TargetAddress", "TargetPortalGroupTag", "SendTargets"]
    )
    def test_target_only_or_full_feature_keys_from_initiator(self, key: str) -> None:
        n = logged_in_normal()
        with pytest.raises(LoginFailure) as exc:
            operational(n, [(key, "1")])
        assert failure(exc) == (2, 0)


class TestSessionType:
    def test_normal_requires_target_name(self) -> None:
        n = negotiator()
        with pytest.raises(LoginFailure) as exc:
            security(n, [("InitiatorName", INITIATOR), ("SessionType", "Normal")])
        assert failure(exc) == (2, 7)

    def test_session_type_defaults_to_normal(self) -> None:
        n = negotiator()
        with pytest.raises(LoginFailure) as exc:
            security(n, [("InitiatorName", INITIATOR)])
        assert failure(exc) == (2, 7)

    @pytest.mark.parametrize(
        "pairs", [[("TargetName", TARGET)], [("InitiatorName", ""), ("TargetName", TARGET)]]
    )
    def test_initiator_name_required(self, pairs: Pairs) -> None:
        n = negotiator()
        with pytest.raises(LoginFailure) as exc:
            security(n, pairs)
        assert failure(exc) == (2, 7)

    def test_overlong_initiator_name(self) -> None:
        n = negotiator()
        with pytest.raises(LoginFailure) as exc:
            security(n, [("InitiatorName", "iqn." + "a" * 220), ("TargetName", TARGET)])
        assert failure(exc) == (2, 0)

    def test_unsupported_session_type(self) -> None:
        n = negotiator()
        with pytest.raises(LoginFailure) as exc:
            security(n, [("InitiatorName", INITIATOR), ("SessionType", "Boot")])
        assert failure(exc) == (2, 9)

    def test_discovery_ignores_target_name(self) -> None:
        n = negotiator()
        sec = security(
            n, [("InitiatorName", INITIATOR), ("SessionType", "Discovery"), ("TargetName", TARGET)]
        )
        assert n.target_name is None
        assert "TargetPortalGroupTag" not in dict(sec.response)
        # Repeating it later is not a change of name either.
        operational(n, [("TargetName", "iqn.2000-01.com.example:other")])

    def test_portal_group_tag_and_alias_only_in_first_response(self) -> None:
        n = negotiator(portal_group_tag=7)
        first = n.step(
            Stage.SECURITY,
            [("InitiatorName", INITIATOR), ("TargetName", TARGET)],
            first=True,
            transit=False,
            next_stage=Stage.SECURITY,
        )
        assert first.response == [("TargetPortalGroupTag", "7")]  # no alias configured
        again = security(n, [("AuthMethod", "None")], first=False)
        assert again.response == [("AuthMethod", "None")]


class TestStages:
    def test_cannot_go_back(self) -> None:
        n = logged_in_normal()
        operational(n, [], transit=False)
        with pytest.raises(LoginFailure) as exc:
            security(n, [], first=False)
        assert failure(exc) == (2, 0)

    def test_cannot_change_stage_without_target_transit(self) -> None:
        n = negotiator()
        n.step(
            Stage.SECURITY,
            [("InitiatorName", INITIATOR), ("TargetName", TARGET)],
            first=True,
            transit=False,
            next_stage=Stage.SECURITY,
        )
        with pytest.raises(LoginFailure):
            operational(n, [])

    @pytest.mark.parametrize(
        ("stage", "next_stage"),
        [
            (Stage.FULL_FEATURE, Stage.FULL_FEATURE),
            (Stage.OPERATIONAL, Stage.SECURITY),
            (Stage.OPERATIONAL, Stage.OPERATIONAL),
        ],
    )
    def test_invalid_stage_codes(self, stage: Stage, next_stage: Stage) -> None:
        n = negotiator()
        with pytest.raises(LoginFailure) as exc:
            n.step(
                stage,
                [("InitiatorName", INITIATOR), ("TargetName", TARGET)],
                first=True,
                transit=True,
                next_stage=next_stage,
            )
        assert failure(exc) == (2, 0)

    def test_first_flag_must_match(self) -> None:
        n = negotiator()
        with pytest.raises(ValueError):
            security(n, [("InitiatorName", INITIATOR)], first=False)
        n = logged_in_normal()
        with pytest.raises(ValueError):
            operational(n, [], first=True)

    def test_step_after_finish(self) -> None:
        n = logged_in_normal()
        operational(n, [])
        params = n.finish()
        assert n.finish() is params
        with pytest.raises(ValueError):
            operational(n, [])


class TestAuthSkipping:
    def test_skipping_security_needs_none(self) -> None:
        n = negotiator(TargetLimits(auth_methods=("CHAP",)))
        with pytest.raises(LoginFailure) as exc:
            operational(n, [("InitiatorName", INITIATOR), ("TargetName", TARGET)], first=True)
        assert failure(exc) == (2, 1)

    def test_transit_without_auth_method_means_none(self) -> None:
        n = logged_in_normal()
        assert n.auth_method == "None"

    def test_transit_without_auth_method_when_required(self) -> None:
        n = negotiator(TargetLimits(auth_methods=("CHAP",)))
        with pytest.raises(LoginFailure) as exc:
            security(n, [("InitiatorName", INITIATOR), ("TargetName", TARGET)])
        assert failure(exc) == (2, 1)

    def test_no_acceptable_auth_method(self) -> None:
        n = negotiator()
        with pytest.raises(LoginFailure) as exc:
            security(
                n,
                [("InitiatorName", INITIATOR), ("TargetName", TARGET), ("AuthMethod", "CHAP,SRP")],
            )
        assert failure(exc) == (2, 1)

    def test_auth_method_twice(self) -> None:
        n = negotiator()
        n.step(
            Stage.SECURITY,
            [("InitiatorName", INITIATOR), ("TargetName", TARGET), ("AuthMethod", "None")],
            first=True,
            transit=False,
            next_stage=Stage.SECURITY,
        )
        with pytest.raises(LoginFailure) as exc:
            security(n, [("AuthMethod", "None")], first=False)
        assert failure(exc) == (2, 0)


class TestTargetOffers:
    def test_initial_r2t_offered_when_initiator_is_silent(self) -> None:
        n = logged_in_normal()
        op = operational(n, [("ImmediateData", "Yes")])
        assert answer(op.response, "InitialR2T") == "No"
        assert not op.complete  # waiting for the answer: T must stay 0
        done = operational(n, [("InitialR2T", "No")])
        assert done.complete and "InitialR2T" not in dict(done.response)
        assert not n.finish().initial_r2t

    def test_offer_answered_yes(self) -> None:
        n = logged_in_normal()
        operational(n, [])
        operational(n, [("InitialR2T", "Yes")])
        assert n.finish().initial_r2t

    def test_offer_answered_reject_keeps_default(self) -> None:
        n = logged_in_normal()
        operational(n, [])
        operational(n, [("InitialR2T", "Reject")])
        assert n.finish().initial_r2t

    def test_unanswered_offer_settles_at_offered_value(self) -> None:
        n = logged_in_normal()
        operational(n, [])
        assert operational(n, []).complete
        assert not n.finish().initial_r2t

    def test_no_offer_without_transit(self) -> None:
        n = logged_in_normal()
        op = operational(n, [], transit=False)
        assert op.complete and op.response == [("MaxRecvDataSegmentLength", "262144")]

    def test_no_offer_when_default_suits_us(self) -> None:
        n = logged_in_normal(TargetLimits(initial_r2t=True))
        assert operational(n, []).response == [("MaxRecvDataSegmentLength", "262144")]

    def test_no_session_offers_in_discovery(self) -> None:
        n = negotiator(TargetLimits(max_burst_length=16384, first_burst_length=8192))
        security(n, OPEN_ISCSI_SECURITY_DISCOVERY)
        op = operational(n, [])
        assert op.complete and op.response == [("MaxRecvDataSegmentLength", "262144")]
        n.finish()

    def test_immediate_data_no_needs_no_answer(self) -> None:
        n = logged_in_normal(TargetLimits(immediate_data=False, initial_r2t=True))
        op = operational(n, [])
        assert answer(op.response, "ImmediateData") == "No"
        assert op.complete
        assert not n.finish().immediate_data

    def test_immediate_data_no_optional_answer_accepted(self) -> None:
        n = logged_in_normal(TargetLimits(immediate_data=False))
        operational(n, [])
        operational(n, [("ImmediateData", "No"), ("InitialR2T", "No")])
        params = n.finish()
        assert not params.immediate_data and not params.initial_r2t

    def test_burst_limits_below_rfc_defaults_are_offered(self) -> None:
        n = logged_in_normal(
            TargetLimits(max_burst_length=16384, first_burst_length=8192, initial_r2t=True)
        )
        op = operational(n, [])
        assert answer(op.response, "MaxBurstLength") == "16384"
        assert answer(op.response, "FirstBurstLength") == "8192"
        assert not op.complete
        operational(n, [("MaxBurstLength", "8192"), ("FirstBurstLength", "4096")])
        params = n.finish()
        assert (params.max_burst_length, params.first_burst_length) == (8192, 4096)

    def test_inadmissible_answer_to_minimum_offer(self) -> None:
        n = logged_in_normal(TargetLimits(max_burst_length=16384, first_burst_length=8192))
        operational(n, [("InitialR2T", "No"), ("FirstBurstLength", "4096")])
        with pytest.raises(LoginFailure) as exc:
            operational(n, [("MaxBurstLength", "65536")])
        assert failure(exc) == (2, 0)

    def test_rejected_required_offer_fails_at_finish(self) -> None:
        n = logged_in_normal(
            TargetLimits(max_burst_length=16384, first_burst_length=8192, initial_r2t=True)
        )
        operational(n, [("FirstBurstLength", "4096")])
        operational(n, [("MaxBurstLength", "Reject")])
        with pytest.raises(LoginFailure) as exc:
            n.finish()
        assert failure(exc) == (2, 0)

    def test_required_digest_offered(self) -> None:
        limits = TargetLimits(
            header_digests=("CRC32C",), data_digests=("CRC32C",), initial_r2t=True
        )
        n = logged_in_normal(limits)
        op = operational(n, [])
        assert answer(op.response, "HeaderDigest") == "CRC32C"
        assert answer(op.response, "DataDigest") == "CRC32C"
        with pytest.raises(LoginFailure):
            operational(n, [("HeaderDigest", "None"), ("DataDigest", "CRC32C")])

    def test_time2retain_and_time2wait_offers(self) -> None:
        n = logged_in_normal(
            TargetLimits(default_time2retain=5, default_time2wait=4, initial_r2t=True)
        )
        op = operational(n, [])
        assert answer(op.response, "DefaultTime2Retain") == "5"
        assert answer(op.response, "DefaultTime2Wait") == "4"
        operational(n, [("DefaultTime2Retain", "0"), ("DefaultTime2Wait", "9")])
        params = n.finish()
        assert (params.default_time2retain, params.default_time2wait) == (0, 9)

    def test_answer_to_offer_is_not_a_renegotiation_but_repeat_is(self) -> None:
        n = logged_in_normal()
        operational(n, [])
        operational(n, [("InitialR2T", "No")], transit=False)
        with pytest.raises(LoginFailure):
            operational(n, [("InitialR2T", "No")])


class TestFinish:
    def test_first_burst_above_max_burst_negotiated_later(self) -> None:
        n = logged_in_normal()
        operational(n, [("FirstBurstLength", "262144")], transit=False)
        operational(n, [("MaxBurstLength", "65536"), ("InitialR2T", "No")])
        with pytest.raises(LoginFailure) as exc:
            n.finish()
        assert failure(exc) == (2, 0)

    def test_immediate_data_refused_but_rejected_offer(self) -> None:
        n = logged_in_normal(TargetLimits(immediate_data=False))
        op = operational(n, [("ImmediateData", "maybe"), ("InitialR2T", "No")])
        assert answer(op.response, "ImmediateData") == "Reject"
        with pytest.raises(LoginFailure):
            n.finish()


class TestTextNegotiator:
    def test_send_targets_and_declarations(self) -> None:
        params = SessionParams()
        text = TextNegotiator(params)
        result = text.step(
            [("SendTargets", "All"), ("MaxRecvDataSegmentLength", "65536"), ("InitiatorAlias", "h")]
        )
        assert result.send_targets == "All" and result.response == []
        assert params.max_recv_data_segment_length == 65536
        assert text.initiator_alias == "h"

    def test_login_only_and_unknown_keys(self) -> None:
        text = TextNegotiator(SessionParams())
        result = text.step(
            [
                ("MaxBurstLength", "65536"),
                ("HeaderDigest", "CRC32C"),
                ("X-com.example.Foo", "1"),
                ("MaxRecvDataSegmentLength", "1"),
            ]
        )
        assert result.send_targets is None
        assert result.response == [
            ("MaxBurstLength", "Reject"),
            ("HeaderDigest", "Reject"),
            ("X-com.example.Foo", "NotUnderstood"),
            ("MaxRecvDataSegmentLength", "Reject"),
        ]

    @pytest.mark.parametrize(
        "pairs",
        [
            [("SendTargets", "All"), ("SendTargets", "All")],
            [("TargetAddress", "10.0.0.1:3260,1")],
            [("InitialR2T", "Irrelevant")],
        ],
    )
    def test_protocol_errors(self, pairs: Pairs) -> None:
        with pytest.raises(NegotiationError):
            TextNegotiator(SessionParams()).step(pairs)


class TestTypes:
    @pytest.mark.parametrize(
        "kwargs",
        [
            {"max_recv_data_segment_length": 511},
            {"max_burst_length": 1 << 24},
            {"first_burst_length": 2 << 20},  # above max_burst_length
            {"max_connections": 0},
            {"error_recovery_level": 3},
            {"header_digests": ()},
            {"data_digests": ("CRC64",)},
            {"auth_methods": ()},
        ],
    )
    def test_limits_validated(self, kwargs: dict[str, object]) -> None:
        with pytest.raises(ValueError):
            TargetLimits(**kwargs)  # type: ignore[arg-type]

    def test_negotiator_arguments_validated(self) -> None:
        with pytest.raises(ValueError):
            LoginNegotiator(TargetLimits(), portal_group_tag=65536)
        with pytest.raises(ValueError):
            LoginNegotiator(TargetLimits(), target_alias="a" * 256)

    def test_login_failure_carries_status(self) -> None:
        exc = LoginFailure(2, 7, "TargetName missing")
        assert str(exc) == "login status 0207: TargetName missing"
        copy = pickle.loads(pickle.dumps(exc))
        assert (copy.status_class, copy.status_detail, copy.reason) == (2, 7, "TargetName missing")
        assert hash(exc) != hash(copy)  # identity-hashed like any exception

    def test_stage_codes(self) -> None:
        assert [int(s) for s in Stage] == [0, 1, 3]
