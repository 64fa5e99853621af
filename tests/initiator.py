"""A minimal iSCSI initiator for driving the sans-IO target in tests (no sockets).

It speaks just enough of RFC 7143 to log in, send commands and data, and decode what comes back;
it is also what the fuzz tests use to produce valid-then-mutated traffic.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from target import pdu as P
from target.connection import Connection
from target.keys import encode_text, parse_text

GRID = P.BHS_GRID


@dataclass
class Pdu:
    opcode: int
    flags: int
    b2: int
    b3: int
    field8: int
    words: tuple[int, ...]  # w16 .. w44
    data: bytes
    raw: bytes

    @property
    def itt(self) -> int:
        return self.words[0]

    def w(self, offset: int) -> int:
        return self.words[(offset - 16) // 4]

    @property
    def text(self) -> dict[str, str]:
        return dict(parse_text(self.data))


def bhs(opcode: int, flags: int, b2: int = 0, b3: int = 0, dlen: int = 0, field8: int = 0,
        *words: int, immediate: bool = False) -> bytearray:
    ws = list(words) + [0] * (8 - len(words))
    buf = bytearray(48)
    GRID.pack_into(buf, 0, opcode | (0x40 if immediate else 0), flags, b2, b3, dlen, field8, *ws)
    return buf


def frame(header: bytes | bytearray, data: bytes = b"", *, hdigest: bool = False,
          ddigest: bool = False) -> bytes:
    out = bytearray(header)
    if hdigest:
        out += P.digest_bytes(P.crc32c(header))
    if data:
        padded = data + b"\0" * P.pad4(len(data))
        out += padded
        if ddigest:
            out += P.digest_bytes(P.crc32c(padded))
    return bytes(out)


@dataclass
class TestInitiator:
    __test__ = False  # not a pytest test class

    conn: Connection
    name: str = "iqn.2026-11.test:initiator"
    isid: bytes = b"\x80\x00\x00\x00\x00\x01"
    cmdsn: int = 1
    exp_statsn: int = 0
    itt: int = 0x1000
    hdigest: bool = False
    ddigest: bool = False
    first_burst: int = 65536
    received: list[Pdu] = field(default_factory=list)
    _pending: bytearray = field(default_factory=bytearray)

    # ------------------------------------------------------------- plumbing
    def send(self, header: bytes | bytearray, data: bytes = b"") -> list[Pdu]:
        self.conn.receive_data(frame(header, data, hdigest=self.hdigest, ddigest=self.ddigest))
        return self.collect()

    def send_raw(self, raw: bytes) -> list[Pdu]:
        self.conn.receive_data(raw)
        return self.collect()

    def collect(self) -> list[Pdu]:
        conn = self.conn
        while True:
            for piece in conn.data_to_send():
                self._pending += bytes(piece)
            # Like the asyncio adapter: output handed over, held commands may start (and answer).
            written = getattr(conn, "output_written", None)
            if written is None:
                break
            written()
            if not conn.has_output():
                break
        out: list[Pdu] = []
        while len(self._pending) >= 48:
            hdr_len = 48 + (4 if self.hdigest else 0)
            words = GRID.unpack_from(self._pending, 0)
            dsl = words[4] & 0xFFFFFF
            data_len = dsl + P.pad4(dsl) + (4 if self.ddigest and dsl else 0)
            if len(self._pending) < hdr_len + data_len:
                break
            raw = bytes(self._pending[:hdr_len + data_len])
            if self.hdigest:
                assert P.digest_value(raw[48:52]) == P.crc32c(raw[:48]), "bad header digest"
            data = raw[hdr_len:hdr_len + dsl]
            if self.ddigest and dsl:
                padded = raw[hdr_len:hdr_len + dsl + P.pad4(dsl)]
                assert P.digest_value(raw[-4:]) == P.crc32c(padded), "bad data digest"
            del self._pending[:hdr_len + data_len]
            pdu = Pdu(words[0] & 0x3F, words[1], words[2], words[3], words[5], words[6:], data, raw)
            if pdu.opcode in (P.Opcode.SCSI_RESPONSE, P.Opcode.LOGIN_RESPONSE, P.Opcode.TEXT_RESPONSE,
                              P.Opcode.LOGOUT_RESPONSE, P.Opcode.TASK_MGMT_RESPONSE,
                              P.Opcode.REJECT) or (pdu.opcode == P.Opcode.DATA_IN and pdu.flags & 1):
                self.exp_statsn = (pdu.w(24) + 1) & 0xFFFFFFFF
            out.append(pdu)
        self.received.extend(out)
        return out

    def next_itt(self) -> int:
        self.itt += 1
        return self.itt

    # ------------------------------------------------------------- login
    def login_pdu(self, pairs: list[tuple[str, str]], *, csg: int, nsg: int, transit: bool,
                  tsih: int = 0, cont: bool = False, itt: int = 0x77,
                  cid: int = 0) -> tuple[bytearray, bytes]:
        text = encode_text(pairs)
        flags = (0x80 if transit else 0) | (0x40 if cont else 0) | (csg << 2) | nsg
        field8 = (int.from_bytes(self.isid, "big") << 16) | tsih
        return bhs(P.Opcode.LOGIN_REQUEST, flags, 0, 0, len(text), field8, itt, cid << 16,
                   self.cmdsn, self.exp_statsn, immediate=True), text

    def login(self, target: str | None, *, extra: list[tuple[str, str]] | None = None,
              digests: bool = False, discovery: bool = False) -> Pdu:
        """Security stage then operational stage, then full feature phase."""
        pairs = [("InitiatorName", self.name),
                 ("SessionType", "Discovery" if discovery else "Normal"),
                 ("AuthMethod", "None")]
        if target:
            pairs.append(("TargetName", target))
        header, text = self.login_pdu(pairs, csg=0, nsg=1, transit=True)
        (resp,) = self.send(header, text)
        assert resp.opcode == P.Opcode.LOGIN_RESPONSE, resp
        assert resp.w(36) >> 16 == 0, f"login refused {resp.w(36) >> 24}/{(resp.w(36) >> 16) & 0xFF}"
        ops = [("HeaderDigest", "CRC32C" if digests else "None"),
               ("DataDigest", "CRC32C" if digests else "None"),
               ("ErrorRecoveryLevel", "0"), ("InitialR2T", "No"), ("ImmediateData", "Yes"),
               ("MaxBurstLength", "262144"), ("FirstBurstLength", "65536"),
               ("MaxRecvDataSegmentLength", "65536"), ("MaxOutstandingR2T", "1"),
               ("DefaultTime2Wait", "2"), ("DefaultTime2Retain", "0"),
               ("DataPDUInOrder", "Yes"), ("DataSequenceInOrder", "Yes")]
        if discovery:
            ops = [p for p in ops if p[0] in ("HeaderDigest", "DataDigest", "MaxRecvDataSegmentLength")]
        ops += extra or []
        header, text = self.login_pdu(ops, csg=1, nsg=3, transit=True)
        (resp,) = self.send(header, text)
        assert resp.opcode == P.Opcode.LOGIN_RESPONSE
        assert resp.w(36) >> 16 == 0, f"login refused {resp.w(36) >> 24}/{(resp.w(36) >> 16) & 0xFF}"
        assert resp.flags & 0x80 and resp.flags & 3 == 3, "no transit to full feature"
        self.cmdsn = resp.w(28)
        self.hdigest = self.ddigest = digests
        return resp

    # ------------------------------------------------------------- full feature
    def command(self, cdb: bytes, *, lun: int = 0, read: int = 0, write: bytes | None = None,
                edtl: int | None = None, immediate_data: int | None = None, itt: int | None = None,
                cmdsn: int | None = None, immediate: bool = False, attr: int = 1) -> tuple[int, list[Pdu]]:
        itt = self.next_itt() if itt is None else itt
        if edtl is None:
            edtl = read if read else (len(write) if write is not None else 0)
        flags = 0x80 | attr | (0x40 if read else 0) | (0x20 if write is not None else 0)
        imm = b""
        if write is not None:
            imm = write[: immediate_data if immediate_data is not None else 65536]
        cdb16 = cdb[:16].ljust(16, b"\0")
        sn = self.cmdsn if cmdsn is None else cmdsn
        header = bhs(P.Opcode.SCSI_COMMAND, flags, 0, 0, len(imm), P.encode_lun(lun), itt, edtl, sn,
                     self.exp_statsn, immediate=immediate)
        header[32:48] = cdb16
        if cmdsn is None and not immediate:
            self.cmdsn = (self.cmdsn + 1) & 0xFFFFFFFF
        return itt, self.send(bytes(header), imm)

    def data_out(self, itt: int, ttt: int, offset: int, data: bytes, *, final: bool = True,
                 datasn: int = 0, lun: int = 0) -> list[Pdu]:
        header = bhs(P.Opcode.DATA_OUT, 0x80 if final else 0, 0, 0, len(data), P.encode_lun(lun),
                     itt, ttt, 0, self.exp_statsn, 0, datasn, offset, 0)
        return self.send(bytes(header), data)

    def write(self, cdb: bytes, data: bytes, *, lun: int = 0, immediate_data: int | None = None,
              burst: int = 65536) -> list[Pdu]:
        """Send a write and answer every R2T until the response arrives."""
        itt, got = self.command(cdb, lun=lun, write=data, immediate_data=immediate_data)
        sent = min(len(data), immediate_data if immediate_data is not None else 65536)
        out = list(got)
        # InitialR2T=No: the rest of the first burst goes unsolicited.
        unsolicited_end = min(len(data), self.first_burst)
        pos, sn = sent, 0
        while pos < unsolicited_end:
            n = min(burst, unsolicited_end - pos)
            out += self.data_out(itt, 0xFFFFFFFF, pos, data[pos:pos + n],
                                 final=pos + n >= unsolicited_end, datasn=sn)
            pos += n
            sn += 1
        pending = [p for p in out if p.opcode == P.Opcode.R2T]
        while pending:
            r2t = pending.pop(0)
            off, length = r2t.w(40), r2t.w(44)
            pos = off
            sn = 0
            while pos < off + length:
                n = min(burst, off + length - pos)
                got = self.data_out(itt, r2t.w(20), pos, data[pos:pos + n],
                                    final=pos + n >= off + length, datasn=sn)
                sn += 1
                out += got
                pending += [p for p in got if p.opcode == P.Opcode.R2T]
                pos += n
        return out

    def text(self, pairs: list[tuple[str, str]]) -> list[Pdu]:
        body = encode_text(pairs)
        header = bhs(P.Opcode.TEXT_REQUEST, 0x80, 0, 0, len(body), 0, self.next_itt(), 0xFFFFFFFF,
                     self.cmdsn, self.exp_statsn)
        self.cmdsn += 1
        return self.send(bytes(header), body)

    def tmf(self, function: int, *, lun: int = 0, rtt: int = 0xFFFFFFFF, ref_cmdsn: int = 0,
            immediate: bool = True) -> list[Pdu]:
        header = bhs(P.Opcode.TASK_MGMT_REQUEST, 0x80 | function, 0, 0, 0, P.encode_lun(lun),
                     self.next_itt(), rtt, self.cmdsn, self.exp_statsn, ref_cmdsn, 0,
                     immediate=immediate)
        if not immediate:
            self.cmdsn += 1
        return self.send(bytes(header))

    def nop(self, data: bytes = b"") -> list[Pdu]:
        header = bhs(P.Opcode.NOP_OUT, 0x80, 0, 0, len(data), 0, self.next_itt(), 0xFFFFFFFF,
                     self.cmdsn, self.exp_statsn, immediate=True)
        return self.send(bytes(header), data)

    def logout(self, reason: int = 0) -> list[Pdu]:
        header = bhs(P.Opcode.LOGOUT_REQUEST, 0x80 | reason, 0, 0, 0, 0, self.next_itt(), 0,
                     self.cmdsn, self.exp_statsn, immediate=True)
        return self.send(bytes(header))


def read10(lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", 0x28, flags, lba, 0, blocks, 0)


def write10(lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, flags, lba, 0, blocks, 0)


def inquiry(alloc: int = 96, evpd: int = 0, page: int = 0) -> bytes:
    return struct.pack(">BBBHB", 0x12, evpd, page, alloc, 0)


def scsi_status(pdus: list[Pdu]) -> tuple[int, Any]:
    """(status, sense bytes) from the final PDU of a command."""
    last = pdus[-1]
    if last.opcode == P.Opcode.DATA_IN:
        return last.b3, b""
    assert last.opcode == P.Opcode.SCSI_RESPONSE, last
    sense = last.data[2:2 + int.from_bytes(last.data[:2], "big")] if last.data else b""
    return last.b3, sense


def read_data(pdus: list[Pdu]) -> bytes:
    return b"".join(p.data for p in pdus if p.opcode == P.Opcode.DATA_IN)
