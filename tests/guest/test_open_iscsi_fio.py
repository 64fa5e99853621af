"""The Linux kernel initiator (open-iscsi) and fio, in a QEMU guest, against a real emuhba serve.

Each test boots the guest once with a job script (see vm.py for the plumbing): the guest logs in
to emuhba on the host through QEMU's user networking, runs its steps, and the test checks fio's
JSON, the guest's records and, where the host acts mid-run (pause, kill), the timing that proves
the host's action landed while the I/O was running.

Under TCG the guest CPU is the bottleneck (a few thousand IOPS), so the fio jobs are bounded by
size and small: these are functional tests, not benchmarks.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.guest.harness import GuestHarness, GuestTarget
from tests.guest.vm import GuestVM

pytestmark = pytest.mark.guest

VM_TIMEOUT_S = 300.0
MIB = 1 << 20
# libaio with O_DIRECT: the page cache in the guest would otherwise answer the verify reads.
FIO_COMMON = "--ioengine=libaio --direct=1 --iodepth=16 --verify_fatal=1"
PAUSE_SECONDS = 10
REPLACEMENT_TIMEOUT_S = 30
KILLED_FOR_S = 3.0
# The pause and kill tests pace fio's writes so its run is long enough (about 5 s of writes, then
# the verify) for the host's action to land inside it on a fast machine too, yet short.
RATE_IOPS = 200


def fio_job(vm: GuestVM, name: str) -> dict[str, Any]:
    data = vm.fio(name)
    jobs = data["jobs"]
    assert len(jobs) == 1, f"{name}: {len(jobs)} jobs"
    job: dict[str, Any] = jobs[0]
    assert job["error"] == 0, f"{name}: fio error {job['error']}"
    return job


def check_write_verify(vm: GuestVM, name: str, size: int) -> dict[str, Any]:
    """A write job with --do_verify=1: all of it written, then all of it read back and checked."""
    job = fio_job(vm, name)
    assert job["write"]["io_bytes"] == size, f"{name}: wrote {job['write']['io_bytes']} B"
    # fio counts its verify reads as reads: a write job that read nothing verified nothing.
    assert job["read"]["io_bytes"] == size, f"{name}: verified {job['read']['io_bytes']} B"
    return job


def check_read_verify(vm: GuestVM, name: str, size: int) -> dict[str, Any]:
    job = fio_job(vm, name)
    assert job["read"]["io_bytes"] == size, f"{name}: read {job['read']['io_bytes']} B"
    assert job["write"]["io_bytes"] == 0
    return job


def check_luns(vm: GuestVM, target: GuestTarget) -> None:
    """The guest found each LUN under its number, with the size the target serves."""
    seen = {}
    for line in vm.text("luns.txt").splitlines():
        lun, dev, size = line.split()
        seen[int(lun)] = (dev, int(size))
    for disk in target.disks:
        assert disk.lun in seen, f"the guest never found LUN {disk.lun}: {seen}"
        assert seen[disk.lun][1] == disk.size, f"LUN {disk.lun}: {seen[disk.lun]}"


def check_discovery(vm: GuestVM, target: GuestTarget) -> None:
    # SendTargets must hand out the advertised address: the guest cannot reach 127.0.0.1.
    assert f"{target.guest_portal},1 {target.iqn}" in vm.text("discovery.txt").splitlines()


def run(guest: GuestHarness, target: GuestTarget, job: str, **env: Any) -> None:
    result = guest.vm.run(job, guest.env(target, **env), timeout=VM_TIMEOUT_S)
    assert result.status == 0, result.describe()


def test_discovery_login_fio_verify(guest: GuestHarness) -> None:
    """Discovery, login, random writes then random reads with CRC32C verify on the RAM and the
    file LUN, large sequential writes (R2T, several Data-Out PDUs per command), logout."""
    target = guest.target()
    size = 4 * MIB
    run(guest, target, f"""
iscsi_start
discover
login
ram=$(lun_dev 0)
file=$(lun_dev 1)
for spec in "ram $ram" "file $file"; do
    set -- $spec
    fio_run "$1-randwrite" --filename="$2" --rw=randwrite --bs=4k --size={size} {FIO_COMMON} \
        --verify=crc32c --do_verify=1
    fio_run "$1-randread" --filename="$2" --rw=randread --bs=4k --size={size} {FIO_COMMON} \
        --verify=crc32c
done
fio_run file-seqwrite --filename="$file" --rw=write --bs=1M --size={2 * size} {FIO_COMMON} \
    --verify=crc32c --do_verify=1
logout
""")
    check_discovery(guest.vm, target)
    check_luns(guest.vm, target)
    for kind in ("ram", "file"):
        check_write_verify(guest.vm, f"{kind}-randwrite", size)
        check_read_verify(guest.vm, f"{kind}-randread", size)
    check_write_verify(guest.vm, "file-seqwrite", 2 * size)


def test_ext4_filesystem(guest: GuestHarness) -> None:
    """mkfs.ext4, files written and checksummed, a clean fsck, and after logging out and in
    again (the disk and every cache of it gone) the same checksums."""
    target = guest.target()
    run(guest, target, """
iscsi_start
discover
login
dev=$(lun_dev 1)
mkfs.ext4 -q -F "$dev"
mkdir -p /mnt/lun
mount "$dev" /mnt/lun
mkdir /mnt/lun/dir
for i in 1 2 3 4 5 6 7 8; do
    dd if=/dev/urandom of="/mnt/lun/file$i" bs=64k count=$((i * 8)) status=none
done
dd if=/dev/urandom of=/mnt/lun/dir/big bs=1M count=8 status=none
cd /mnt/lun
find . -type f ! -path './lost+found/*' | sort | xargs sha256sum >"$OUT/sums-before.txt"
cd /
umount /mnt/lun
e2fsck -fn "$dev" >"$OUT/fsck.txt" 2>&1
logout
login
dev=$(lun_dev 1)
mount "$dev" /mnt/lun
cd /mnt/lun
find . -type f ! -path './lost+found/*' | sort | xargs sha256sum >"$OUT/sums-after.txt"
cd /
umount /mnt/lun
logout
""")
    before = guest.vm.text("sums-before.txt").splitlines()
    after = guest.vm.text("sums-after.txt").splitlines()
    assert len(before) == 9, before
    assert after == before
    fsck = guest.vm.text("fsck.txt")
    assert "Pass 5" in fsck, fsck  # e2fsck -n exits non-zero on any problem; the job has set -e
    file_lun = target.disk("file").path
    assert file_lun is not None
    with file_lun.open("rb") as f:
        f.seek(1024 + 0x38)  # the ext4 superblock's magic, in the file behind the LUN
        assert f.read(2) == b"\x53\xef"


def test_crc32c_digests(guest: GuestHarness) -> None:
    """open-iscsi configured for CRC32C header and data digests negotiates both, and fio's
    verify passes over them with no digest error on either side."""
    target = guest.target(control=True)
    size = 8 * MIB
    vm = guest.vm
    vm.start(f"""
iscsi_start
discover
node_set 'node.conn[0].iscsi.HeaderDigest' CRC32C
node_set 'node.conn[0].iscsi.DataDigest' CRC32C
login
iscsiadm -m session -P 2 >"$OUT/session.txt"
mark logged-in
wait_host checked-login
ram=$(lun_dev 0)
file=$(lun_dev 1)
fio_run ram-randwrite --filename="$ram" --rw=randwrite --bsrange=4k-64k --size={size} \
    {FIO_COMMON} --verify=crc32c --do_verify=1
fio_run file-randwrite --filename="$file" --rw=randwrite --bsrange=4k-64k --size={size} \
    {FIO_COMMON} --verify=crc32c --do_verify=1
mark fio-done
wait_host checked-io
logout
""", guest.env(target))
    vm.wait_for_mark("logged-in", VM_TIMEOUT_S)
    at_login = guest_session(target, guest.env(target)["INITIATOR"])
    vm.answer("checked-login")
    vm.wait_for_mark("fio-done", VM_TIMEOUT_S)
    after_io = guest_session(target, guest.env(target)["INITIATOR"])
    vm.answer("checked-io")
    result = vm.wait(VM_TIMEOUT_S)
    assert result.status == 0, result.describe()

    session_text = vm.text("session.txt")
    assert "HeaderDigest: CRC32C" in session_text, session_text
    assert "DataDigest: CRC32C" in session_text, session_text
    for snapshot in (at_login, after_io):
        (conn,) = snapshot["connections"]
        assert conn["header_digest"] is True and conn["data_digest"] is True, conn
    assert after_io["digest_errors"] == 0, after_io
    assert after_io["pdus_in"] > at_login["pdus_in"], (at_login, after_io)
    check_write_verify(vm, "ram-randwrite", size)
    check_write_verify(vm, "file-randwrite", size)


def guest_session(target: GuestTarget, initiator: str) -> dict[str, Any]:
    sessions = [s for s in target.ctl_json("sessions")
                if s["initiator"] == initiator and not s["discovery"]]
    assert len(sessions) == 1, sessions
    session: dict[str, Any] = sessions[0]
    return session


def test_lun_paused_during_fio(guest: GuestHarness) -> None:
    """`emuhba ctl pause lun 0 --seconds 10` while fio writes and verifies: the guest's requests
    wait instead of failing, fio ends with zero errors, and its run spans the pause."""
    target = guest.target(control=True)
    size = 4 * MIB
    vm = guest.vm
    vm.start(f"""
iscsi_start
discover
login
ram=$(lun_dev 0)
fio_run paused --filename="$ram" --rw=randwrite --bs=4k --size={size} {FIO_COMMON} \
    --rate_iops={RATE_IOPS} --verify=crc32c --do_verify=1 &
fio=$!
sleep 1
mark fio-running
wait $fio
logout
""", guest.env(target))
    vm.wait_for_mark("fio-running", VM_TIMEOUT_S)
    done = target.ctl("pause", "lun", "0", "--seconds", str(PAUSE_SECONDS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert lun_zero(target)["paused"], "LUN 0 is not paused right after `ctl pause`"
    result = vm.wait(VM_TIMEOUT_S)
    assert result.status == 0, result.describe()
    job = check_write_verify(vm, "paused", size)
    # Requests that reached the LUN just after the pause began waited for all of it; had the
    # pause missed the run, nothing would have waited nearly as long.
    slowest = max(job["write"]["clat_ns"]["max"], job["read"]["clat_ns"]["max"]) / 1e9
    assert slowest >= PAUSE_SECONDS - 1.5, f"slowest completion {slowest:.1f} s"
    assert job["job_runtime"] >= PAUSE_SECONDS * 1000, job["job_runtime"]
    # The pause ended by itself, and held requests were sent on, not aborted or timed out.
    lun0 = lun_zero(target)
    assert lun0["state"] == "ready" and lun0["pauses"] == 1, lun0
    assert lun0["aborted"] == 0 and lun0["timeouts"] == 0, lun0


def lun_zero(target: GuestTarget) -> dict[str, Any]:
    (lun,) = [u for u in target.ctl_json("luns") if u["lun"] == 0]
    snapshot: dict[str, Any] = lun
    return snapshot


def test_target_killed_and_restarted(guest: GuestHarness) -> None:
    """emuhba is SIGKILLed while fio writes to the file LUN and restarted (same port, file and
    IQN) 3 s later, inside open-iscsi's replacement timeout: the session recovers, the commands
    caught by the kill are retried, and fio's verify of everything written passes."""
    target = guest.target(ram_size=None)
    size = 4 * MIB
    vm = guest.vm
    vm.start(f"""
iscsi_start
discover
login
file=$(lun_dev 0)
fio_run restart-write --filename="$file" --rw=randwrite --bs=4k --size={size} {FIO_COMMON} \
    --rate_iops={RATE_IOPS} --verify=crc32c --do_verify=1 &
fio=$!
sleep 1
mark fio-running
wait $fio
fio_run restart-reread --filename="$file" --rw=randread --bs=4k --size={size} {FIO_COMMON} \
    --verify=crc32c
logout
""", guest.env(target, replacement_timeout=REPLACEMENT_TIMEOUT_S))
    vm.wait_for_mark("fio-running", VM_TIMEOUT_S)
    target.kill()
    time.sleep(KILLED_FOR_S)
    target.start()
    result = vm.wait(VM_TIMEOUT_S)
    assert result.status == 0, result.describe()
    job = check_write_verify(vm, "restart-write", size)
    # Writes caught by the kill waited for the restart: proof the outage fell inside the run.
    slowest = job["write"]["clat_ns"]["max"] / 1e9
    assert slowest >= KILLED_FOR_S, f"slowest write {slowest:.1f} s"
    check_read_verify(vm, "restart-reread", size)
    dmesg = vm.text("dmesg.txt")
    assert "detected conn error" in dmesg, "the guest never saw the connection drop"
    # One login before the kill and one to the restarted server (both log to the same file).
    initiator = f"initiator={guest.env(target)['INITIATOR']} "
    logins = [line for line in target.log_path.read_text().splitlines()
              if "login complete" in line and initiator in line and f"target={target.iqn}" in line]
    assert len(logins) == 2, "\n".join(logins)


def secret_files(directory: Path, initiator_secret: str, target_secret: str) -> tuple[Path, Path]:
    """The initiator's and the target's CHAP secrets in owner-only files, as serve wants them."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = (directory / "initiator", directory / "target")
    for path, value in zip(paths, (initiator_secret, target_secret), strict=True):
        path.write_text(value + "\n")
        path.chmod(0o600)
    return paths


@pytest.mark.parametrize(("offered", "chosen"), [("SHA256", "SHA-256"), ("SHA3-256", "SHA3-256"),
                                               ("SHA1", "SHA-1")])
def test_mutual_chap(guest: GuestHarness, offered: str, chosen: str) -> None:
    """The Linux initiator logs in to a target that requires CHAP, offering only one
    algorithm and asking the target to authenticate itself too (mutual CHAP), then runs a
    verified fio job. A wrong password is refused first. The target's log names the algorithm
    and shows no secret."""
    initiator_secret, target_secret = "guest-chap-secret-2026", "array-chap-secret-2026"
    files = secret_files(guest.workdir / "secrets", initiator_secret, target_secret)
    target = guest.target(file_size=None, extra_args=[
        "--chap", f"guest-user:{files[0]}", "--chap-mutual", f"array:{files[1]}"])
    size = 8 * MIB
    vm = guest.vm
    env = guest.env(target) | {"CHAP_SECRET": initiator_secret, "CHAP_SECRET_IN": target_secret}
    vm.start(f"""
iscsi_start
discover
node_set node.session.auth.authmethod CHAP
node_set node.session.auth.chap_algs {offered}
node_set node.session.auth.username guest-user
node_set node.session.auth.password wrong-secret-000000
if login; then echo "logged in with a wrong secret" >&2; exit 1; fi
node_set node.session.auth.password "$CHAP_SECRET"
node_set node.session.auth.username_in array
node_set node.session.auth.password_in "$CHAP_SECRET_IN"
login
mark logged-in
ram=$(lun_dev 0)
fio_run ram-randwrite --filename="$ram" --rw=randwrite --bsrange=4k-64k --size={size} \
    {FIO_COMMON} --verify=crc32c --do_verify=1
logout
""", env)
    vm.wait_for_mark("logged-in", VM_TIMEOUT_S)
    result = vm.wait(VM_TIMEOUT_S)
    assert result.status == 0, result.describe()
    check_write_verify(vm, "ram-randwrite", size)
    log = str(target.server.log_text())
    assert f"chap='{chosen} mutual'" in log, log
    assert "CHAP name or response does not match" in log, log
    assert initiator_secret not in log and target_secret not in log


def test_mutual_chap_for_discovery(guest: GuestHarness) -> None:
    """Discovery behind mutual CHAP (emuhba serve --discovery-chap/--discovery-chap-mutual):
    open-iscsi's SendTargets with a wrong password finds nothing, with the right one (and the
    target proving itself) finds the target, whose own sessions need no CHAP; a verified fio
    job runs on the LUN found. The log names the algorithm (MD5: open-iscsi 2.1.8 has no
    chap_algs setting for discovery records) and holds no secret."""
    initiator_secret, target_secret = "guest-disco-secret-26", "array-disco-secret-26"
    files = secret_files(guest.workdir / "disco-secrets", initiator_secret, target_secret)
    target = guest.target(file_size=None, extra_args=[
        "--discovery-chap", f"disco-user:{files[0]}",
        "--discovery-chap-mutual", f"array:{files[1]}"])
    size = 4 * MIB
    vm = guest.vm
    env = guest.env(target) | {"CHAP_SECRET": initiator_secret, "CHAP_SECRET_IN": target_secret}
    vm.start(f"""
iscsi_start
iscsiadm -m discoverydb -t st -p "$PORTAL" -o new
disc_set discovery.sendtargets.auth.authmethod CHAP
disc_set discovery.sendtargets.auth.username disco-user
disc_set discovery.sendtargets.auth.password wrong-secret-000000
if discover_db; then echo "discovered with a wrong secret" >&2; exit 1; fi
disc_set discovery.sendtargets.auth.password "$CHAP_SECRET"
disc_set discovery.sendtargets.auth.username_in array
disc_set discovery.sendtargets.auth.password_in "$CHAP_SECRET_IN"
discover_db
grep -q "$TARGET" "$OUT/discovery.txt"
login
mark logged-in
ram=$(lun_dev 0)
fio_run disco-randwrite --filename="$ram" --rw=randwrite --bs=4k --size={size} \
    {FIO_COMMON} --verify=crc32c --do_verify=1
logout
""", env)
    vm.wait_for_mark("logged-in", VM_TIMEOUT_S)
    result = vm.wait(VM_TIMEOUT_S)
    assert result.status == 0, result.describe()
    check_write_verify(vm, "disco-randwrite", size)
    log = str(target.server.log_text())
    assert any("login complete" in line and "target=(discovery)" in line
               and "chap='MD5 mutual'" in line for line in log.splitlines()), log
    assert "CHAP name or response does not match" in log, log
    assert initiator_secret not in log and target_secret not in log
