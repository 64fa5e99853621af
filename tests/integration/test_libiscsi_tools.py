"""The libiscsi command-line tools against a running target: discovery, INQUIRY, capacity, load."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.conftest import INITIATOR, RunningTarget, load_bench, record_summary

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("libiscsi_tools")]


def run_tool(*args: str, timeout: float = 60) -> str:
    """Run a libiscsi tool; it must exit 0 and say nothing on stderr."""
    # Binary designators (VPD 0x83) are printed raw, so the output is not always UTF-8.
    done = subprocess.run(
        args,
        capture_output=True,
        encoding="utf-8",
        errors="backslashreplace",
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, (
        f"{' '.join(args)} exited {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    )
    assert not done.stderr.strip(), f"{' '.join(args)} wrote to stderr:\n{done.stderr}"
    return done.stdout


def iscsi_ls_size(size: int, block_length: int) -> str:
    """The size iscsi-ls prints: it multiplies READ CAPACITY(10)'s *last* LBA by the block length
    (one block short of the capacity), then divides by 1024 while the value exceeds 1024, at
    most four times, truncating each time."""
    value = size - block_length
    units = " kMGT"
    steps = 0
    while steps < 4 and value > 1024:
        value //= 1024
        steps += 1
    return f"{value}{units[steps]}".strip()


def test_iscsi_ls_size_rule() -> None:
    assert iscsi_ls_size(64 << 20, 512) == "63M"
    assert iscsi_ls_size(1 << 30, 512) == "1023M"
    assert iscsi_ls_size(16 << 20, 4096) == "15M"
    assert iscsi_ls_size(2048, 512) == "1k"
    assert iscsi_ls_size(1536, 512) == "1024"


_LS_TARGET = re.compile(r"^Target:(\S+) Portal:(\S+)$", re.MULTILINE)
_LS_LUN = re.compile(r"^Lun:(\d+)\s+Type:(\S+)(?: \(Size:(\S+)\))?", re.MULTILINE)


def test_iscsi_ls_lists_target_and_lun_sizes(iscsi_target: RunningTarget) -> None:
    target = iscsi_target
    out = run_tool("iscsi-ls", "-i", INITIATOR, "-s", target.portal_url)
    targets = _LS_TARGET.findall(out)
    assert len(targets) == 1, out
    name, portal = targets[0]
    assert name == target.iqn
    # SendTargets gives "address:port,tpgt"; we connected to the loopback portal directly.
    assert portal.rsplit(",", 1)[0] == target.portal, out

    listed = {int(lun): (kind, size) for lun, kind, size in _LS_LUN.findall(out)}
    expected = {
        d.lun: ("DIRECT_ACCESS", iscsi_ls_size(d.size, target.block_length)) for d in target.disks
    }
    expected |= {lun: (kind, "") for lun, kind in target.other_luns.items()}
    assert listed == expected, out


def test_discovery_without_digest_refused_by_digest_only_target(
    digest_target: RunningTarget,
) -> None:
    # iscsi-ls logs in for discovery offering HeaderDigest=None only.
    if digest_target.flavour != "emuhba":
        pytest.skip("emuhba's --header-digest required policy")
    done = subprocess.run(
        ["iscsi-ls", "-i", INITIATOR, digest_target.portal_url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0 and "Login failed" in done.stderr, done


def test_iscsi_ls_url_mode(iscsi_target: RunningTarget) -> None:
    out = run_tool("iscsi-ls", "-i", INITIATOR, "--url", iscsi_target.portal_url)
    assert out.split() == [iscsi_target.url(0)], out


def test_readcapacity16_reports_configured_size(any_target: RunningTarget) -> None:
    bench = load_bench()
    for disk in any_target.disks:
        out = run_tool("iscsi-readcapacity16", "-i", INITIATOR, any_target.url(disk.lun))
        capacity = bench.parse_readcapacity16(out)
        assert (capacity.block_length, capacity.size) == (any_target.block_length, disk.size), out
        brief = run_tool("iscsi-readcapacity16", "-i", INITIATOR, "-s", any_target.url(disk.lun))
        assert brief.strip() == str(disk.size)


def parse_fields(out: str) -> dict[str, list[str]]:
    fields: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), []).append(value.strip())
    return fields


def inquiry(target: RunningTarget, lun: int, page: int | None = None) -> str:
    args = ["iscsi-inq", "-i", INITIATOR]
    if page is not None:
        # iscsi-inq reads the page code with atoi: "0x80" would silently mean page 0.
        args += ["-e", "1", "-c", str(page)]
    return run_tool(*args, target.url(lun))


def test_standard_inquiry(iscsi_target: RunningTarget) -> None:
    for disk in iscsi_target.disks:
        fields = parse_fields(inquiry(iscsi_target, disk.lun))
        assert fields["Peripheral Qualifier"] == ["CONNECTED"]
        assert fields["Peripheral Device Type"] == ["DIRECT_ACCESS"]
        assert fields["Removable"] == ["0"]
        assert fields["ReponseDataFormat"] == ["2"]  # sic, libiscsi's spelling
        assert int(fields["Version"][0].split()[0]) >= 5  # SPC-3 or later
        assert fields["CmdQue"] == ["1"], "without CmdQue initiators queue one command per LUN"
        assert fields["Vendor"][0] and fields["Product"][0]
        assert any("SBC" in d for d in fields.get("Version Descriptor", [])), fields


REQUIRED_VPD_PAGES = {0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2}


def test_vpd_supported_pages(iscsi_target: RunningTarget) -> None:
    out = inquiry(iscsi_target, iscsi_target.disks[0].lun, 0x00)
    pages = {int(code, 16) for code in re.findall(r"^Page:(0x[0-9a-fA-F]{2})", out, re.MULTILINE)}
    assert pages >= REQUIRED_VPD_PAGES, out


def test_vpd_unit_serial_number_is_per_lun(iscsi_target: RunningTarget) -> None:
    serials = []
    for disk in iscsi_target.disks:
        out = inquiry(iscsi_target, disk.lun, 0x80)
        match = re.search(r"^Unit Serial Number:\[(.*)\]$", out, re.MULTILINE)
        assert match and match.group(1).strip(), out
        serials.append(match.group(1).strip())
    assert len(set(serials)) == len(serials), serials


def _lu_designators(out: str) -> list[tuple[str, str]]:
    """(designator type, designator text) of each LOGICAL_UNIT designator in a 0x83 page."""
    result = []
    for block in out.split("DEVICE DESIGNATOR #")[1:]:
        fields = parse_fields(block)
        if fields.get("Association", [""])[0].endswith("LOGICAL_UNIT"):
            result.append((fields["Designator Type"][0], fields.get("Designator", [""])[0]))
    return result


def test_vpd_device_identification(iscsi_target: RunningTarget) -> None:
    seen = []
    for disk in iscsi_target.disks:
        out = inquiry(iscsi_target, disk.lun, 0x83)
        assert "Page Code:(0x83) DEVICE_IDENTIFICATION" in out, out
        designators = _lu_designators(out)
        kinds = {kind.split()[-1] for kind, _ in designators}
        # A designator an OS can name the disk by (/dev/disk/by-id): NAA, EUI-64 or SCSI name.
        assert kinds & {"NAA", "EUI_64", "SCSI_NAME_STRING"}, out
        seen.append(tuple(designators))
    assert len(set(seen)) == len(seen), "two LUNs share their identifiers"


def _int_fields(out: str) -> dict[str, int]:
    return {key: int(values[0]) for key, values in parse_fields(out).items() if values[0].isdigit()}


def test_vpd_block_limits(iscsi_target: RunningTarget) -> None:
    fields = _int_fields(inquiry(iscsi_target, iscsi_target.disks[0].lun, 0xB0))
    maximum = fields["maximum transfer length"]
    optimal = fields["optimal transfer length"]
    granularity = fields["optimal transfer length granularity"]
    if maximum and optimal:
        assert optimal <= maximum, fields
    if granularity and optimal:
        assert optimal % granularity == 0, fields


def test_vpd_block_device_characteristics(iscsi_target: RunningTarget) -> None:
    out = inquiry(iscsi_target, iscsi_target.disks[0].lun, 0xB1)
    match = re.search(r"^Medium Rotation Rate:(\d+)", out, re.MULTILINE)
    assert match, out


def test_vpd_logical_block_provisioning_agrees_with_capacity(iscsi_target: RunningTarget) -> None:
    disk = iscsi_target.disks[0]
    fields = _int_fields(inquiry(iscsi_target, disk.lun, 0xB2))
    assert "provisioning type" in fields, fields
    rc16 = run_tool("iscsi-readcapacity16", "-i", INITIATOR, iscsi_target.url(disk.lun))
    lbpme = re.search(r"LBPME:(\d)", rc16)
    assert lbpme, rc16
    if lbpme.group(1) == "0":
        # Without LBPME the unit is fully provisioned: it must not advertise UNMAP/WRITE SAME.
        assert fields["lbpu"] == fields["lbpws"] == fields["lbpws10"] == 0, fields


@pytest.mark.parametrize(
    ("kind", "seconds", "transfer", "depth", "random"),
    [("ram", 10, 4096, 32, True), ("file", 5, 64 * 1024, 8, False)],
    ids=["ram-4k-randread-qd32", "file-64k-seqread-qd8"],
)
def test_iscsi_perf_runs_clean(
    iscsi_target: RunningTarget,
    request: pytest.FixtureRequest,
    kind: str,
    seconds: int,
    transfer: int,
    depth: int,
    random: bool,
) -> None:
    bench = load_bench()
    disk = iscsi_target.disk(kind)
    workload = bench.Workload(request.node.callspec.id, transfer, depth, random)
    # run_iscsi_perf fails on a non-zero exit, any "failed" line or a run that never finished.
    result = bench.run_iscsi_perf(
        iscsi_target.url(disk.lun), workload, seconds, iscsi_target.block_length, INITIATOR
    )
    assert result.iops > 0
    record_summary(
        request.config,
        f"iscsi-perf {workload.name}",
        f"{result.iops} IOPS, {result.mib_per_s:.1f} MiB/s over {seconds} s ({iscsi_target.flavour})",
    )
