"""Why the per-I/O path unpacks headers with struct and not construct: measure both.

    python bench/bench_pdu.py

Parses a SCSI Command BHS and builds a Data-In BHS with (a) construct's interpreted parser,
(b) construct's compiled parser, (c) the single struct grid target/pdu.py uses.
"""

from __future__ import annotations

import timeit

from target import pdu as P


def main() -> None:
    header = P.build_bhs(P.Opcode.SCSI_COMMAND | 0x40, 0xC1, 0, 0, 0, 0, 0x1234, 4096, 7, 3)
    header[32:42] = bytes([0x28, 0, 0, 0, 0, 8, 0, 0, 8, 0])
    raw = bytes(header)
    compiled = P.SCSI_COMMAND_BHS.compile()
    n = 20000
    rows = [
        ("construct parse", timeit.timeit(lambda: P.SCSI_COMMAND_BHS.parse(raw), number=n)),
        ("construct compiled parse", timeit.timeit(lambda: compiled.parse(raw), number=n)),
        ("struct grid unpack", timeit.timeit(lambda: P.BHS_GRID.unpack_from(raw, 0), number=n)),
        (
            "struct grid pack (Data-In)",
            timeit.timeit(
                lambda: P.build_bhs(
                    P.Opcode.DATA_IN, 0x81, 0, 0, 4096, 0, 1, 0xFFFFFFFF, 5, 6, 7, 0, 0, 0
                ),
                number=n,
            ),
        ),
    ]
    base = rows[2][1]
    print(f"{'operation':30} {'us/op':>8} {'vs struct':>10}")
    for name, seconds in rows:
        print(f"{name:30} {seconds / n * 1e6:8.2f} {seconds / base:9.1f}x")


if __name__ == "__main__":
    main()
