"""A bystander for robustness tests: one libiscsi session writing random blocks and reading
them back, in a thread, until stopped; what went wrong is kept for the test to assert on."""

from __future__ import annotations

import os
import threading

from tests.integration import libiscsi_client


class DataVerifier:
    """Writes ``blocks`` random blocks at a time from ``first_lba`` on (wrapping after
    ``span`` blocks) and checks each read back."""

    def __init__(self, portal: str, iqn: str, lun: int, *, initiator: str,
                 block_length: int = 512, first_lba: int = 0, blocks: int = 4,
                 span: int = 4096) -> None:
        self.portal, self.iqn, self.lun = portal, iqn, lun
        self.initiator = initiator
        self.block_length = block_length
        self.first_lba, self.blocks, self.span = first_lba, blocks, span
        self.ops = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            session = libiscsi_client.Session(self.portal, self.iqn, self.lun,
                                              initiator=self.initiator)
        except Exception as exc:
            self.errors.append(f"login: {exc}")
            return
        bs, lun = self.block_length, self.lun
        try:
            offset = 0
            while not self._stop.is_set():
                lba = self.first_lba + offset
                data = os.urandom(self.blocks * bs)
                session.write16(lun, lba, data, bs)
                if session.read16(lun, lba, self.blocks, bs) != data:
                    self.errors.append(f"{self.iqn} LUN {lun} read back differs at {lba}")
                self.ops += 1
                offset = (offset + self.blocks) % self.span
        except Exception as exc:
            self.errors.append(repr(exc))
        finally:
            session.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
