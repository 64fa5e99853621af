"""`emuhba serve --config`: parsing, validation with file/line/key, and the shipped examples."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from emuhba.cli import build_parser, config_from_args
from emuhba.config import ConfigError, key_lines, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.toml"))

GOOD = """\
[[stores]]
name = "r0"
kind = "ram"
size = "8M"

[[stores]]
name = "f0"
kind = "file"
path = "f0.img"
size = 4194304

[[controllers]]
name = "c0"
kind = "disk"
latency = { fixed_ms = 1.5, per_kib_us = 2 }
faults = [
  { kind = "busy", unit = "0:0:0", count = 3 },
  { kind = "medium-error", unit = "all", lba = "10-20", writes = true },
]

[[adapters]]
name = "hba0"
controller = "c0"
queue_depth = 32

[[targets]]
name = "iqn.2026-11.io.emuhba:t0"
adapter = "hba0"
luns = ["r0", { lun = 3, store = "f0", read_only = true }]
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "x.toml", base=Path("/base"))
    return [str(p) for p in info.value.problems]


def test_a_good_config_parses_to_settings() -> None:
    config = parse_config(GOOD, "x.toml", base=Path("/base"))
    assert [s.name for s in config.stores] == ["r0", "f0"]
    assert config.stores[0].size == 8 << 20
    assert config.stores[1].path == "/base/f0.img"  # relative to the config file
    controller = config.controllers[0]
    assert controller.latency.fixed_s == pytest.approx(0.0015)
    assert controller.latency.per_kib_s == pytest.approx(2e-6)
    assert [f.kind for f in controller.faults] == ["busy", "medium-error"]
    assert controller.faults[1].unit is None
    assert (controller.faults[1].first_lba, controller.faults[1].last_lba) == (10, 20)
    assert config.adapters[0].queue_depth == 32
    luns = config.targets[0].luns
    assert [(e.lun, e.source, e.read_only) for e in luns] == [(0, "r0", False), (3, "f0", True)]
    assert config.portals == (("0.0.0.0", 3260),)
    assert config.stores[0].physical_block_size is None


def test_physical_block_size_reaches_the_store(tmp_path: Path) -> None:
    from emuhba.installation import open_store

    text = GOOD.replace('size = "8M"', 'size = "8M"\nphysical_block_size = 512')
    store_config = parse_config(text, "x.toml", base=tmp_path).stores[0]
    assert store_config.physical_block_size == 512
    store = open_store(store_config)
    try:
        assert store.physical_block_size == 512
    finally:
        store.close()


def test_key_lines_follow_arrays_of_tables_and_inline_items() -> None:
    lines = key_lines(GOOD)
    assert lines[("stores", 1, "path")] == 9
    assert lines[("controllers", 0, "faults", 1)] == 18
    assert lines[("adapters", 0, "queue_depth")] == 24
    nested = key_lines('[[a]]\nx = 1\n[[a.b]]\ny = 2\n[[a]]\n[[a.b]]\ny = 3 # c = 4\n')
    assert nested[("a", 0, "b", 0, "y")] == 4
    assert nested[("a", 1, "b", 0, "y")] == 7


@pytest.mark.parametrize(("change", "expected"), [
    (("queue_depth = 32", "quue_depth = 32"),
     "x.toml:24: adapters[0].quue_depth: unknown key; known keys here: controller, name, "
     "port_model, queue_depth"),
    (("queue_depth = 32", "queue_depth = 0"),
     "x.toml:24: adapters[0].queue_depth: must be between 1 and 65535, not 0"),
    (("queue_depth = 32", 'queue_depth = "32"'),
     "x.toml:24: adapters[0].queue_depth: must be an integer, not a string ('32')"),
    (('size = "8M"', 'size = "8 parsecs"'),
     "x.toml:4: stores[0].size: not a size: '8 parsecs' (examples: 4096, 64M, 1G)"),
    (('kind = "disk"', 'kind = "tape"'),
     "x.toml:14: controllers[0].kind: must be one of 'disk', 'raid', 'fc', not 'tape'"),
    (('controller = "c0"', 'controller = "c9"'),
     "x.toml:23: adapters[0].controller: no controller named 'c9' (controllers: c0)"),
    (('luns = ["r0"', 'luns = ["r9"'),
     "x.toml:29: targets[0].luns[0]: no store named 'r9' (stores: f0, r0)"),
    (('lba = "10-20"', 'lba = "20-10"'),
     "x.toml:18: controllers[0].faults[1].lba: bad LBA range '20-10'"),
    (('unit = "0:0:0"', 'unit = "zero"'),
     "x.toml:17: controllers[0].faults[0].unit: a unit is 'all' or PATH:TARGET:LUN (e.g. "
     "0:0:1), not 'zero'"),
    (('name = "iqn.2026-11.io.emuhba:t0"', 'name = "my target"'),
     "x.toml:27: targets[0].name: an iSCSI name is iqn.YYYY-MM.reversed.domain[:suffix], eui. "
     "or naa."),
    (('size = 4194304', 'size = 4194305'),
     "x.toml:10: stores[1].size: 4194305 bytes is not a whole number of 512-byte blocks"),
    (('size = 4194304', 'size = 4194304\nphysical_block_size = 1536'),
     "x.toml:11: stores[1].physical_block_size: must be the block size (512) times a power "
     "of two, not 1536"),
])
def test_each_problem_names_file_line_and_key(change: tuple[str, str], expected: str) -> None:
    assert GOOD.count(change[0]) == 1
    assert problems(GOOD.replace(change[0], change[1])) == [expected]


def test_every_problem_is_reported_at_once() -> None:
    text = GOOD.replace("queue_depth = 32", "queue_depth = -1").replace(
        'size = "8M"', 'size = -5')
    found = problems(text)
    assert len(found) == 2, found
    assert found[0].startswith("x.toml:4: stores[0].size: must be positive")
    assert found[1].startswith("x.toml:24: adapters[0].queue_depth")
    found = problems(GOOD.replace('luns = ["r0"', 'luns = ["r0", "r0"').replace(
        'name = "hba0"', 'name = "hba0"\nport_model = "scsiport"'))
    assert found == ["x.toml:30: targets[0].luns[1]: store 'r0' is already used by target "
                     "iqn.2026-11.io.emuhba:t0 LUN 0"]


def test_cross_references() -> None:
    text = GOOD + '\n[[adapters]]\nname = "hba1"\ncontroller = "c0"\n'
    assert problems(text) == ["x.toml:33: adapters[1].controller: controller 'c0' is already "
                              "driven by adapter 'hba0'"]
    text = GOOD + '\n[[stores]]\nname = "r0"\nkind = "ram"\nsize = "1M"\n'
    assert problems(text) == ["x.toml:32: stores[2].name: store 'r0' is already defined "
                              "(stores[0])"]
    no_targets = GOOD[:GOOD.index("[[targets]]")]
    assert problems(no_targets) == ["x.toml: no [[targets]]: nothing would be exported"]


def test_raid_and_fc_sections_are_checked() -> None:
    raid = GOOD.replace('kind = "disk"', 'kind = "raid"')
    assert "a RAID controller needs at least one [[controllers.arrays]]" in problems(raid)[0]
    raid = raid.replace('latency =', 'arrays = [{ name = "a0", level = 5, members = ["r0", "f0"] '
                                     '}]\nlatency =')
    found = problems(raid)
    assert "controllers[0].arrays[0].members: RAID 5 needs at least 3 members, not 2" in found[0]
    fc = GOOD.replace('kind = "disk"', 'kind = "fc"\nwwpn = "20:00:00:25:b5:00:00:0g"')
    found = problems(fc)
    assert "controllers[0].wwpn: a WWN is 16 hex digits" in found[0]


def test_invalid_toml_reports_its_line() -> None:
    found = problems('[[stores]]\nname = "a"\nkind = ram\n')
    assert len(found) == 1 and found[0].startswith("x.toml:3: not valid TOML")


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_shipped_examples_are_valid(path: Path) -> None:
    config = load_config(path)
    assert config.targets and config.adapters and config.controllers


def test_examples_cover_every_controller_kind() -> None:
    kinds = {c.kind for path in EXAMPLES for c in load_config(path).controllers}
    assert kinds == {"disk", "raid", "fc"}


def test_command_line_is_the_same_model() -> None:
    args = build_parser().parse_args([
        "serve", "--ram-lun", "8M", "--file-lun", "/tmp/x.img,4M", "--iqn",
        "iqn.2026-11.io.emuhba:cli", "--queue-depth", "16", "--block-size", "4096"])
    config = config_from_args(args)
    assert [(s.kind, s.size, s.block_size) for s in config.stores] == [
        ("ram", 8 << 20, 4096), ("file", 4 << 20, 4096)]
    assert config.adapters[0].queue_depth == 16
    assert config.targets[0].name == "iqn.2026-11.io.emuhba:cli"
    assert [e.source for e in config.targets[0].luns] == ["lun0", "lun1"]


def test_serve_refuses_config_with_lun_flags_and_reports_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace("queue_depth = 32", "queue_depth = 0"))
    run = [sys.executable, "-m", "emuhba", "serve", "--config", str(bad)]
    done = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"{bad}:24: adapters[0].queue_depth: must be between 1 and 65535" in done.stderr
    done = subprocess.run([*run, "--ram-lun", "1M"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--ram-lun/--file-lun: not with --config" in done.stderr
    done = subprocess.run([*run[:-1], str(tmp_path / "missing.toml")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "cannot read" in done.stderr


def test_iscsi_limits() -> None:
    config = parse_config(GOOD, "x.toml", base=Path("/base"))
    assert (config.session_buffer_mib, config.max_sessions_per_target) == (64, 256)
    config = parse_config(GOOD + "[iscsi]\nsession_buffer_mib = 16\nmax_sessions_per_target = 4\n",
                          "x.toml", base=Path("/base"))
    assert (config.session_buffer_mib, config.max_sessions_per_target) == (16, 4)
    assert problems(GOOD + "[iscsi]\nsession_buffer_mib = 0\n") == [
        "x.toml:31: iscsi.session_buffer_mib: must be 1 to 65536, not 0"]


def test_fail_member_faults_name_a_real_array_and_slot() -> None:
    raid = GOOD.replace('kind = "disk"', 'kind = "raid"\narrays = [{ name = "a0", level = 1, '
                        'members = ["r0", "f0"] }]').replace(
        '{ kind = "busy", unit = "0:0:0", count = 3 },',
        '{ kind = "fail-member", array = "a0", member = 2 },').replace(
        'luns = ["r0", { lun = 3, store = "f0", read_only = true }]',
        'luns = [{ lun = 0, array = "a0" }]')
    found = problems(raid)
    assert found == ["x.toml:18: controllers[0].faults[0].member: array 'a0' has members 0..1"]
    config = parse_config(raid.replace("member = 2", "member = 1"), "x.toml", base=Path("/b"))
    (fault,) = [f for f in config.controllers[0].faults if f.kind == "fail-member"]
    assert (fault.array, fault.member) == ("a0", 1)


def test_chap_and_acl_settings(tmp_path: Path) -> None:
    secret = tmp_path / "t0.secret"
    secret.write_text("file-secret-0001\n")
    secret.chmod(0o600)
    text = GOOD.replace(
        'luns = ["r0", { lun = 3, store = "f0", read_only = true }]',
        'luns = ["r0"]\n'
        'auth = { user = "u", secret_file = "t0.secret", mutual_user = "t",'
        ' mutual_secret = "target-secret-01", algorithms = ["SHA-256", "MD5"] }\n'
        'acl = ["iqn.2026-11.io.x:a", { initiator = "iqn.2026-11.io.x:b",'
        ' auth = { user = "b", secret = "b-secret-000001" } }]\n'
        '[iscsi]\ndiscovery_auth = { user = "d", secret = "disco-secret-01" }')
    config = parse_config(text, "x.toml", base=tmp_path)
    target = config.targets[0]
    assert target.chap is not None and target.chap.initiator.secret == b"file-secret-0001"
    assert target.chap.target is not None and target.chap.algorithms == (7, 5)
    assert target.acl is not None and [e.initiator for e in target.acl] == [
        "iqn.2026-11.io.x:a", "iqn.2026-11.io.x:b"]
    assert target.acl[1].chap is not None and target.acl[0].chap is None
    assert config.discovery_chap is not None and config.discovery_chap.initiator.user == "d"
    assert "file-secret" not in repr(config)


@pytest.mark.parametrize(("auth", "expected"), [
    ('{ user = "u", secret = "short" }', "12 to 255 bytes"),
    ('{ user = "u" }', "give exactly one of 'secret' and 'secret_file'"),
    ('{ secret = "a-secret-000001" }', "missing: a secret needs its user"),
    ('{ user = "u", secret = "same-secret-0001", mutual_user = "t", '
     'mutual_secret = "same-secret-0001" }', "differs from the initiator secret"),
    ('{ user = "u", secret = "a-secret-000001", algorithms = ["SHA-512"] }',
     "unknown CHAP algorithm"),
    ('{ user = "u", secret_file = "open.secret" }', "readable by others: chmod 600"),
    ('{ user = "u", secret = "a-secret-000001", secret_file = "x" }', "exactly one of"),
])
def test_chap_problems_are_reported_without_the_secret(tmp_path: Path, auth: str,
                                                       expected: str) -> None:
    (tmp_path / "open.secret").write_text("world-readable-secret")
    (tmp_path / "open.secret").chmod(0o644)
    text = GOOD.replace('luns = ["r0", { lun = 3, store = "f0", read_only = true }]',
                        f'luns = ["r0"]\nauth = {auth}')
    with pytest.raises(ConfigError) as info:
        parse_config(text, "x.toml", base=tmp_path)
    found = [str(p) for p in info.value.problems]
    assert any(expected in p for p in found), found
    assert not any("same-secret" in p or "world-readable" in p for p in found)


def test_chap_on_the_command_line_reads_owner_only_secret_files(tmp_path: Path) -> None:
    mine, theirs, open_file = (tmp_path / n for n in ("mine", "theirs", "open"))
    for path, text in ((mine, "initiator-secret-01"), (theirs, "target-secret-0001"),
                       (open_file, "readable-by-all-01")):
        path.write_text(text + "\n")
        path.chmod(0o600)
    open_file.chmod(0o644)
    args = build_parser().parse_args(["serve", "--chap", f"alice:{mine}",
                                      "--chap-mutual", f"array:{theirs}"])
    chap = config_from_args(args).targets[0].chap
    assert chap is not None and chap.initiator.user == "alice"
    assert chap.initiator.secret == b"initiator-secret-01"
    assert chap.target is not None and chap.target.secret == b"target-secret-0001"
    plain = config_from_args(build_parser().parse_args(["serve"]))
    assert plain.targets[0].chap is None and plain.discovery_chap is None
    args = build_parser().parse_args(["serve", "--discovery-chap", f"disco:{mine}",
                                      "--discovery-chap-mutual", f"array:{theirs}"])
    config = config_from_args(args)
    assert config.targets[0].chap is None and config.discovery_chap is not None
    assert config.discovery_chap.initiator.user == "disco"
    assert config.discovery_chap.target is not None
    for argv, expected in (
        (["--chap", f"alice:{open_file}"], "readable by others"),
        (["--chap", "alice"], "give USER:SECRET_FILE"),
        (["--chap-mutual", f"array:{theirs}"], "needs --chap too"),
        (["--discovery-chap", f"d:{open_file}"], "--discovery-chap.secret_file: "),
        (["--discovery-chap-mutual", f"array:{theirs}"], "needs --discovery-chap too"),
    ):
        with pytest.raises(ConfigError) as info:
            config_from_args(build_parser().parse_args(["serve", *argv]))
        assert expected in str(info.value)
        assert "readable-by-all" not in str(info.value)
