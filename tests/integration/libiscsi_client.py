"""A small synchronous iSCSI initiator for the tests: libiscsi itself, driven through ctypes.

libiscsi-bin ships no dd-like tool, so data integrity is checked with the library those tools are
built on. Only the stable C entry points are used; every CDB is built here and every data buffer
is ours (handed to libiscsi as an iovec), so no libiscsi struct layout is relied on except the
first fields of struct scsi_sense.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import struct
from types import TracebackType
from typing import Any

SCSI_STATUS_GOOD = 0x00
SCSI_STATUS_CHECK_CONDITION = 0x02
SENSE_KEY_UNIT_ATTENTION = 0x06

XFER_NONE, XFER_READ, XFER_WRITE = 0, 1, 2

# enum iscsi_header_digest
HEADER_DIGESTS = {"none": 0, "none-crc32c": 1, "crc32c-none": 2, "crc32c": 3}

ISCSI_SESSION_NORMAL = 2

_LOG_FN = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p)


class IscsiError(RuntimeError):
    pass


class ScsiCheckCondition(IscsiError):
    def __init__(self, what: str, sense_key: int, ascq: int) -> None:
        super().__init__(
            f"{what}: CHECK CONDITION, sense key 0x{sense_key:x}, ASC/ASCQ 0x{ascq:04x}"
        )
        self.sense_key = sense_key
        self.ascq = ascq


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_lib: ctypes.CDLL | None = None


def library_name() -> str | None:
    return ctypes.util.find_library("iscsi")


def load() -> ctypes.CDLL:
    """Load libiscsi and declare the prototypes used here (once)."""
    global _lib
    if _lib is not None:
        return _lib
    name = library_name()
    if name is None:
        raise OSError("libiscsi not found (Debian package libiscsi7)")
    lib = ctypes.CDLL(name)
    p, i = ctypes.c_void_p, ctypes.c_int
    signatures: dict[str, tuple[Any, list[Any]]] = {
        "iscsi_create_context": (p, [ctypes.c_char_p]),
        "iscsi_destroy_context": (i, [p]),
        "iscsi_set_targetname": (i, [p, ctypes.c_char_p]),
        "iscsi_set_session_type": (i, [p, i]),
        "iscsi_set_header_digest": (i, [p, i]),
        "iscsi_set_log_level": (None, [p, i]),
        "iscsi_set_log_fn": (None, [p, _LOG_FN]),
        "iscsi_full_connect_sync": (i, [p, ctypes.c_char_p, i]),
        "iscsi_set_noautoreconnect": (None, [p, i]),
        "iscsi_logout_sync": (i, [p]),
        "iscsi_get_error": (ctypes.c_char_p, [p]),
        "iscsi_scsi_command_sync": (p, [p, i, p, p]),
        "scsi_create_task": (p, [i, ctypes.c_char_p, i, i]),
        "scsi_task_set_iov_in": (None, [p, ctypes.POINTER(_IoVec), i]),
        "scsi_task_set_iov_out": (None, [p, ctypes.POINTER(_IoVec), i]),
        "scsi_task_get_status": (i, [p, p]),
        "scsi_free_scsi_task": (None, [p]),
    }
    for fname, (restype, argtypes) in signatures.items():
        fn = getattr(lib, fname)
        fn.restype = restype
        fn.argtypes = argtypes
    _lib = lib
    return lib


def available() -> bool:
    try:
        load()
    except OSError:
        return False
    return True


class Session:
    """One logged-in iSCSI session to `iqn` at `portal` ("host:port").

    `header_digest` is what the initiator offers ("none", "crc32c", ...); the login reply
    lines libiscsi logs are kept in `login_log`, so a test can see what the target chose.
    """

    def __init__(
        self,
        portal: str,
        iqn: str,
        lun: int = 0,
        initiator: str = "iqn.2026-11.io.emuhba:pytest",
        header_digest: str = "none-crc32c",
        reconnect: bool = True,
    ) -> None:
        self._lib = load()
        self.login_log: list[str] = []
        self._ctx: int | None = self._lib.iscsi_create_context(initiator.encode())
        if not self._ctx:
            raise IscsiError("iscsi_create_context failed")
        # Keep the callback object alive as long as the context can call it.
        self._log_cb: Any = _LOG_FN(self._on_log)
        self._lib.iscsi_set_log_fn(self._ctx, self._log_cb)
        self._lib.iscsi_set_log_level(self._ctx, 6)  # 6: login key/value replies
        self._check(self._lib.iscsi_set_targetname(self._ctx, iqn.encode()), "set target name")
        self._check(
            self._lib.iscsi_set_session_type(self._ctx, ISCSI_SESSION_NORMAL), "session type"
        )
        self._check(
            self._lib.iscsi_set_header_digest(self._ctx, HEADER_DIGESTS[header_digest]), "digest"
        )
        if not reconnect:
            # A lost connection fails the command in progress at once instead of libiscsi
            # logging in again behind the caller's back (crash tests want to see the loss).
            self._lib.iscsi_set_noautoreconnect(self._ctx, 1)
        if self._lib.iscsi_full_connect_sync(self._ctx, portal.encode(), lun) != 0:
            error = self.error()
            self._lib.iscsi_destroy_context(self._ctx)
            self._ctx = None
            raise IscsiError(f"login to {iqn} at {portal} failed: {error}")

    def _on_log(self, level: int, message: bytes) -> None:
        if b"TargetLoginReply" in message:
            self.login_log.append(message.decode(errors="replace"))

    def negotiated(self, key: str) -> str | None:
        """The value the target answered for `key` at login (last answer wins)."""
        value = None
        for line in self.login_log:
            _, _, rest = line.partition("TargetLoginReply: ")
            name, _, answer = rest.partition("=")
            if name == key:
                value = answer.split(" [", 1)[0].strip()
        return value

    def error(self) -> str:
        if not self._ctx:
            return "no context"
        text = self._lib.iscsi_get_error(self._ctx)
        return text.decode(errors="replace") if text else ""

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise IscsiError(f"{what} failed: {self.error()}")

    def close(self) -> None:
        if self._ctx:
            self._lib.iscsi_logout_sync(self._ctx)
            self._lib.iscsi_destroy_context(self._ctx)
            self._ctx = None

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def command(
        self, lun: int, cdb: bytes, *, data_in: int = 0, data_out: bytes | None = None
    ) -> bytes:
        """Run one CDB; returns the Data-In bytes actually transferred (up to `data_in`).

        A first UNIT ATTENTION (a new I_T nexus after a reset, say) is retried once, like the
        libiscsi tools do.
        """
        for attempt in range(2):
            try:
                return self._command_once(lun, cdb, data_in, data_out)
            except ScsiCheckCondition as cc:
                if cc.sense_key != SENSE_KEY_UNIT_ATTENTION or attempt:
                    raise
        raise AssertionError("unreachable")

    def _command_once(self, lun: int, cdb: bytes, data_in: int, data_out: bytes | None) -> bytes:
        if not self._ctx:
            raise IscsiError("session is closed")
        if data_out is not None:
            direction, length = XFER_WRITE, len(data_out)
            buf = ctypes.create_string_buffer(data_out, length)
        elif data_in:
            direction, length = XFER_READ, data_in
            buf = ctypes.create_string_buffer(length)
        else:
            direction, length = XFER_NONE, 0
            buf = None
        task = self._lib.scsi_create_task(len(cdb), cdb, direction, length)
        if not task:
            raise IscsiError("scsi_create_task failed")
        try:
            if buf is not None:
                iov = _IoVec(ctypes.cast(buf, ctypes.c_void_p), length)
                setter = (
                    self._lib.scsi_task_set_iov_out
                    if direction == XFER_WRITE
                    else self._lib.scsi_task_set_iov_in
                )
                setter(task, ctypes.byref(iov), 1)
            if not self._lib.iscsi_scsi_command_sync(self._ctx, lun, task, None):
                raise IscsiError(f"CDB {cdb[:1].hex()} on LUN {lun} failed: {self.error()}")
            sense = ctypes.create_string_buffer(64)
            status = self._lib.scsi_task_get_status(task, sense)
            if status == SCSI_STATUS_CHECK_CONDITION:
                # struct scsi_sense: unsigned char error_type; int key; int ascq; ...
                _, key, ascq = struct.unpack_from("=B3xii", sense.raw)
                raise ScsiCheckCondition(f"CDB {cdb[:1].hex()} on LUN {lun}", key, ascq)
            if status != SCSI_STATUS_GOOD:
                raise IscsiError(
                    f"CDB {cdb[:1].hex()} on LUN {lun}: status 0x{status:x} {self.error()}"
                )
            if direction == XFER_READ and buf is not None:
                return buf.raw
            return b""
        finally:
            self._lib.scsi_free_scsi_task(task)

    # A few commands, spelled out from SBC-3/SPC-4 so the CDBs are ours, not libiscsi's.

    def read_capacity16(self, lun: int) -> tuple[int, int]:
        """(block length, number of blocks)."""
        cdb = struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0)
        data = self.command(lun, cdb, data_in=32)
        last_lba, block_length = struct.unpack_from(">QI", data)
        return block_length, last_lba + 1

    def report_luns(self) -> list[int]:
        alloc = 4096
        cdb = struct.pack(">BBB3xIBB", 0xA0, 0, 0, alloc, 0, 0)
        data = self.command(0, cdb, data_in=alloc)
        (list_length,) = struct.unpack_from(">I", data)
        luns = []
        for offset in range(8, 8 + min(list_length, alloc - 8), 8):
            first, second = data[offset], data[offset + 1]
            method = first >> 6
            if method == 0:  # peripheral device addressing
                luns.append(second)
            elif method == 1:  # flat space addressing
                luns.append(((first & 0x3F) << 8) | second)
            else:
                raise IscsiError(f"unexpected LUN format {data[offset : offset + 8].hex()}")
        return luns

    def write16(self, lun: int, lba: int, data: bytes, block_length: int) -> None:
        if len(data) % block_length:
            raise ValueError("write16 needs whole blocks")
        cdb = struct.pack(">BBQIBB", 0x8A, 0, lba, len(data) // block_length, 0, 0)
        self.command(lun, cdb, data_out=data)

    def read16(self, lun: int, lba: int, blocks: int, block_length: int) -> bytes:
        cdb = struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0)
        return self.command(lun, cdb, data_in=blocks * block_length)

    def synchronize_cache16(self, lun: int) -> None:
        self.command(lun, struct.pack(">BBQIBB", 0x91, 0, 0, 0, 0, 0))
