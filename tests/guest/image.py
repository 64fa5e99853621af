"""The guest image: a Debian kernel and a whole minimal Debian userland packed as an initramfs.

The test machine's kernel has no SCSI support, so the Linux initiator (open-iscsi) and fio run in
a QEMU guest. The guest is built with debootstrap, pruned, and packed whole (uncompressed cpio)
as the initramfs, with a small shell script as /init: no systemd and no udev, so it is up in a
few seconds even under TCG. The kernel is booted as the ELF vmlinux taken out of Debian's
bzImage when QEMU can boot that (PVH entry point), which skips the XZ decompression that costs
seconds under TCG; otherwise as the bzImage.

The result is cached under ~/.cache/emuhba/guest-<GUEST_VERSION>/ (or $EMUHBA_GUEST_CACHE) and
rebuilt only when GUEST_VERSION changes: bump it whenever the recipe below changes. Building
needs root (debootstrap) and network access to a Debian mirror ($EMUHBA_GUEST_MIRROR).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import lzma
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

# Bump on any change to the recipe (packages, pruning, modules, /init): the cache is keyed by it.
GUEST_VERSION = "2"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
GUEST_PACKAGES = (
    "linux-image-amd64",
    "open-iscsi",
    "fio",
    "iproute2",
    "kmod",
    "procps",
    "e2fsprogs",
)
# Loaded by /init; modules.dep pulls in their dependencies (libiscsi, scsi_mod, jbd2, ...).
GUEST_MODULES = (
    "virtio_pci",
    "virtio_net",
    "9pnet_virtio",
    "9p",
    "iscsi_tcp",
    "sd_mod",
    "sg",
    "ext4",
    "crc32c_generic",
    "crc32c_intel",
)
# Guest programs the tests use (the build checks their libraries survived the pruning).
GUEST_TOOLS = (
    "fio", "iscsiadm", "iscsid", "mkfs.ext4", "e2fsck", "ip", "modprobe", "mount", "sha256sum",
    "dd", "sh", "dmesg",
)
# What the host needs to build and boot the guest (Debian package names).
HOST_PACKAGES = ("qemu-system-x86", "debootstrap", "debian-archive-keyring")
BUILD_TIMEOUT_S = 1200.0
LOCK_TIMEOUT_S = 1800.0

# Everything the tests never touch (globs): the whole tree is unpacked into guest RAM at every
# boot, at about 25 ms per MiB under TCG. fio links librbd, glusterfs and ICU, so those stay;
# Python and Perl are only there for scripts the tests do not run.
PRUNE = (
    "boot",
    "usr/lib/python3*",
    "usr/bin/python3*",
    "usr/share/python3",
    "usr/lib/x86_64-linux-gnu/perl-base",
    "usr/bin/perl*",
    "usr/share/perl5",
    "usr/lib/x86_64-linux-gnu/gconv",
    "usr/share/zoneinfo",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/i18n",
    "usr/share/lintian",
    "usr/share/bash-completion",
    "usr/lib/udev/hwdb.d",
    "usr/lib/udev/hwdb.bin",
    "etc/udev/hwdb.bin",
    "var/cache/apt",
    "var/cache/debconf",
    "var/lib/apt/lists",
    "var/log",
)

INIT_SCRIPT = r"""#!/bin/sh
# PID 1 of the test guest. No systemd, no udev: devtmpfs names the disks. The host hands a job
# over 9p (mount tag "job"): /job/run.sh runs with its output in /job/out, and its exit status
# leaves through QEMU's isa-debug-exit port, so the host sees it as QEMU's exit code.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /run /run/lock /tmp /job
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/lock
hostname emuhba-guest

report() {
    # isa-debug-exit: QEMU exits with (value << 1) | 1. If the port write fails, power off
    # (QEMU exits 0, which the host reads as "no status").
    code=$1
    [ "$code" -gt 127 ] && code=127
    printf "\\$(printf %03o "$code")" | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
    echo o > /proc/sysrq-trigger
    sleep 10
}

echo "guest: up after $(cut -d' ' -f1 /proc/uptime) s"
modprobe -a virtio_pci virtio_net 9pnet_virtio 9p || { echo "guest: modprobe failed"; report 120; }
if ! mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=none job /job; then
    echo "guest: cannot mount the job share"
    report 121
fi
mkdir -p /job/out
modprobe -a iscsi_tcp sd_mod sg ext4 crc32c_generic
modprobe crc32c_intel 2>/dev/null

ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2

echo "guest: running /job/run.sh at $(cut -d' ' -f1 /proc/uptime) s"
sh /job/run.sh >/job/out/run.log 2>&1 </dev/null
status=$?
echo "guest: /job/run.sh exited $status at $(cut -d' ' -f1 /proc/uptime) s"
echo "$status" >/job/out/status
dmesg >/job/out/dmesg.txt 2>&1
# Whatever the job left running (iscsid) holds files under /job open.
kill -KILL -1 2>/dev/null
sleep 0.2
sync
umount /job
report "$status"
"""


@dataclass(frozen=True)
class GuestImage:
    """A built guest: the kernel to boot, its initramfs, and how the kernel is booted."""

    directory: Path
    kernel_release: str
    vmlinux: Path  # uncompressed ELF, booted through its PVH entry point
    bzimage: Path
    initrd: Path
    boot_kernel: Path  # whichever of the two the build's boot check chose

    @property
    def version(self) -> str:
        return GUEST_VERSION


class BuildError(RuntimeError):
    pass


def cache_root() -> Path:
    override = os.environ.get("EMUHBA_GUEST_CACHE")
    if override:
        return Path(override)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "emuhba"


def image_dir() -> Path:
    return cache_root() / f"guest-{GUEST_VERSION}"


def load_image(directory: Path | None = None) -> GuestImage | None:
    """The cached image, if a complete build of this GUEST_VERSION is there."""
    directory = directory or image_dir()
    manifest = directory / "manifest.json"
    try:
        data = json.loads(manifest.read_text())
    except (FileNotFoundError, ValueError):
        return None
    if data.get("version") != GUEST_VERSION:
        return None
    image = GuestImage(
        directory=directory,
        kernel_release=str(data["kernel_release"]),
        vmlinux=directory / "vmlinux",
        bzimage=directory / "bzImage",
        initrd=directory / "initrd.cpio",
        boot_kernel=directory / str(data["boot_kernel"]),
    )
    if not all(p.is_file() for p in (image.boot_kernel, image.initrd)):
        return None
    return image


def build_blockers() -> list[str]:
    """Why this machine cannot build the image (empty when it can)."""
    blockers = []
    if os.geteuid() != 0:
        blockers.append("building the guest image needs root (debootstrap)")
    if shutil.which("debootstrap") is None:
        blockers.append("debootstrap is not installed")
    return blockers


def ensure_image(
    boot_check: Callable[[GuestImage], str | None], log: Callable[[str], None] = print
) -> GuestImage:
    """The cached image, building it first if needed; concurrent callers wait for one build.

    `boot_check` boots a candidate image and returns None when it works, else the reason; the
    build tries the ELF vmlinux first, then the bzImage.
    """
    image = load_image()
    if image is not None:
        return image
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f"guest-{GUEST_VERSION}.lock"):
        # Another process may have finished the build while we waited for the lock.
        image = load_image()
        if image is not None:
            return image
        blockers = build_blockers()
        if blockers:
            raise BuildError("; ".join(blockers))
        # Left by a build that was killed: whoever builds holds the lock, so none is live.
        for stale in root.glob(f".guest-{GUEST_VERSION}.tmp-*"):
            _remove_tree(stale)
        tmp = root / f".guest-{GUEST_VERSION}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            candidate = _build(tmp, root, log)
            reasons = []
            chosen = None
            for kernel in (candidate.vmlinux, candidate.bzimage):
                trial = GuestImage(
                    tmp, candidate.kernel_release, candidate.vmlinux, candidate.bzimage,
                    candidate.initrd, kernel,
                )
                reason = boot_check(trial)
                if reason is None:
                    chosen = kernel
                    break
                reasons.append(f"{kernel.name}: {reason}")
                log(f"guest image: {kernel.name} did not boot: {reason}")
            if chosen is None:
                raise BuildError("the built guest does not boot:\n" + "\n".join(reasons))
            manifest = {
                "version": GUEST_VERSION,
                "kernel_release": candidate.kernel_release,
                "boot_kernel": chosen.name,
                "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            final = image_dir()
            _remove_tree(final)  # a partial leftover without a valid manifest
            tmp.rename(final)  # atomic: readers see no image or a whole one
        except BaseException:
            _remove_tree(tmp)
            raise
    image = load_image()
    assert image is not None, image_dir()
    return image


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise BuildError(f"timed out waiting for {path}") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _run(cmd: list[str], logfile: Path, env: dict[str, str] | None = None) -> None:
    with logfile.open("ab") as out:
        out.write(("\n$ " + " ".join(cmd) + "\n").encode())
        out.flush()
        done = subprocess.run(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            timeout=BUILD_TIMEOUT_S, check=False,
        )
    if done.returncode != 0:
        tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-40:])
        raise BuildError(f"{cmd[0]} exited {done.returncode}; last lines of {logfile}:\n{tail}")


def _build(out: Path, cache: Path, log: Callable[[str], None]) -> GuestImage:
    started = time.monotonic()
    rootfs = out / "rootfs"
    build_log = out / "build.log"
    mirror = os.environ.get("EMUHBA_GUEST_MIRROR", DEFAULT_MIRROR)
    debs = cache / "guest-debs"  # downloaded packages survive a GUEST_VERSION bump
    debs.mkdir(exist_ok=True)
    cmd = [
        "debootstrap", "--variant=minbase", f"--include={','.join(GUEST_PACKAGES)}",
        f"--cache-dir={debs}",
    ]
    keyring = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
    if keyring.is_file():  # Ubuntu's debootstrap does not default to Debian's keyring
        cmd.append(f"--keyring={keyring}")
    cmd += [SUITE, str(rootfs), mirror]
    # INITRD=No: the kernel package's hook would otherwise spend a minute on an initrd we drop.
    env = dict(os.environ, INITRD="No", DEBIAN_FRONTEND="noninteractive")
    log(f"guest image: debootstrap {SUITE} into {rootfs} (log: {build_log})")
    _run(cmd, build_log, env)

    releases = sorted(p.name for p in (rootfs / "usr/lib/modules").iterdir())
    if len(releases) != 1:
        raise BuildError(f"expected one kernel in the guest, found {releases}")
    release = releases[0]
    bzimage = out / "bzImage"
    shutil.copyfile(rootfs / "boot" / f"vmlinuz-{release}", bzimage)
    vmlinux = out / "vmlinux"
    vmlinux.write_bytes(extract_vmlinux(bzimage.read_bytes()))

    _prune_modules(rootfs, release, build_log)
    for pattern in PRUNE:
        for path in rootfs.glob(pattern):
            _remove_tree(path)
    _check_libraries(rootfs, build_log)
    (rootfs / "var/log").mkdir()
    init = rootfs / "init"
    init.write_text(INIT_SCRIPT)
    init.chmod(0o755)
    initrd = out / "initrd.cpio"
    with initrd.open("wb") as f:
        write_cpio(rootfs, f.write)
    _remove_tree(rootfs)
    log(
        f"guest image: built {release} in {time.monotonic() - started:.0f} s, "
        f"initramfs {initrd.stat().st_size >> 20} MiB"
    )
    return GuestImage(out, release, vmlinux, bzimage, initrd, vmlinux)


def _check_libraries(rootfs: Path, build_log: Path) -> None:
    """Fail the build, not a test, when pruning took a library a guest tool links."""
    for tool in GUEST_TOOLS:
        done = subprocess.run(
            ["chroot", str(rootfs), "sh", "-c", f'ldd "$(command -v {tool})"'],
            capture_output=True, text=True, timeout=60, check=False,
        )
        if done.returncode != 0 or "not found" in done.stdout:
            raise BuildError(f"{tool} in the pruned guest: {done.stdout}{done.stderr}")


def _prune_modules(rootfs: Path, release: str, build_log: Path) -> None:
    """Keep GUEST_MODULES and their dependencies only, and index them with depmod."""
    moddir = rootfs / "usr/lib/modules" / release
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[_module_name(path)] = path
    wanted: set[str] = set()
    pending = []
    for name in GUEST_MODULES:
        if name not in by_name:
            raise BuildError(f"module {name} is not in {release}'s modules.dep")
        pending.append(by_name[name])
    while pending:
        path = pending.pop()
        if path not in wanted:
            wanted.add(path)
            pending.extend(deps[path])
    kernel = moddir / "kernel"
    keep = moddir / "kernel.keep"
    for path in wanted:
        source = moddir / path
        target = keep / Path(path).relative_to("kernel")
        target.parent.mkdir(parents=True, exist_ok=True)
        source.rename(target)
    shutil.rmtree(kernel)
    keep.rename(kernel)
    for index in moddir.glob("modules.*"):
        if index.name not in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
            index.unlink()
    _run(["chroot", str(rootfs), "depmod", release], build_log)


def _module_name(path: str) -> str:
    name = Path(path).name
    for suffix in (".xz", ".zst", ".gz"):
        name = name.removesuffix(suffix)
    return name.removesuffix(".ko").replace("-", "_")


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside a bzImage (the kernel's scripts/extract-vmlinux, XZ only).

    Debian compresses its x86 kernels with XZ; the stream's magic may also occur by chance
    earlier in the setup code, so each occurrence is tried until one decompresses to an ELF.
    """
    magic = b"\xfd7zXZ\x00"
    start = bzimage.find(magic)
    while start >= 0:
        decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        try:
            data = decompressor.decompress(bzimage[start:])
        except lzma.LZMAError:
            data = b""
        if data.startswith(b"\x7fELF"):
            return data
        start = bzimage.find(magic, start + 1)
    raise BuildError("no XZ-compressed ELF kernel found in the bzImage")


def write_cpio(root: Path, write: Callable[[bytes], object]) -> None:
    """Pack `root` as a cpio "newc" archive, the format the kernel unpacks as an initramfs."""
    inode = 1
    for rel, st in _walk(root):
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            data = os.readlink(root / rel).encode()
        elif stat.S_ISREG(mode):
            data = (root / rel).read_bytes()
        elif stat.S_ISDIR(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            data = b""
        else:
            continue  # sockets and FIFOs: nothing in the tree needs them at boot
        rdev = st.st_rdev if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else 0
        _cpio_entry(write, rel, inode, mode, st.st_uid, st.st_gid, int(st.st_mtime), data,
                    os.major(rdev), os.minor(rdev))
        inode += 1
    _cpio_entry(write, "TRAILER!!!", 0, 0, 0, 0, 0, b"", 0, 0)


def _walk(root: Path) -> Iterable[tuple[str, os.stat_result]]:
    # Parents before children, so the kernel creates each directory before its entries.
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted(dirnames) + sorted(filenames):
            path = base / name
            yield str(path.relative_to(root)), path.lstat()


def _cpio_entry(
    write: Callable[[bytes], object], name: str, inode: int, mode: int, uid: int, gid: int,
    mtime: int, data: bytes, rmajor: int, rminor: int,
) -> None:
    encoded = name.encode() + b"\0"
    fields = (inode, mode, uid, gid, 1, mtime, len(data), 0, 0, rmajor, rminor, len(encoded), 0)
    header = b"070701" + b"".join(b"%08X" % value for value in fields)
    write(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))
    write(data + b"\0" * (-len(data) % 4))
