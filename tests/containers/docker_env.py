"""Docker for the container tests: find the client and compose, start a daemon, pick a base image.

Nothing here is specific to one test; conftest.py turns these into session fixtures. Functions
that find something missing call `missing_requirement` (skip outside CI, fail with CI=true).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import missing_requirement

DOCKER_PACKAGES = ("docker.io", "docker-compose")
BASE_REPOSITORY = "emuhba-base"
# What the offline base image holds. Its tag is a hash of this recipe, so changing the recipe
# builds a new base instead of silently reusing an old one.
BASE_SUITE = "bookworm"
BASE_VARIANT = "minbase"
BASE_PACKAGES = ("python3", "python3-pip", "python3-venv", "ca-certificates")
BASE_RECIPE_VERSION = 1
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DAEMON_START_TIMEOUT = 30.0
# Proxy settings the builds need if the host needs them. Docker treats these build args as
# predefined: no ARG line, and they do not invalidate cached layers.
PROXY_VARIABLES = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")


def is_root() -> bool:
    return os.geteuid() == 0


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    path = Path(base) / "emuhba"
    path.mkdir(parents=True, exist_ok=True)
    return path


def run(
    args: Sequence[str],
    *,
    timeout: float,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a command, output captured as text; with `check` a non-zero exit raises."""
    done = subprocess.run(
        list(args),
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        env=env,
        check=False,
    )
    if check and done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} exited {done.returncode}\n"
            f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
        )
    return done


def apt_install(packages: Sequence[str]) -> None:
    """apt-get install as root; refreshes the package lists only when the first try misses."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Another apt run (dev.sh, a parallel job) may hold the lock: wait for it rather than fail.
    install = ["apt-get", "install", "-y", "-qq", "-o", "DPkg::Lock::Timeout=600", *packages]
    if run(install, timeout=1200, env=env, check=False).returncode == 0:
        return
    run(["apt-get", "update", "-qq", "-o", "DPkg::Lock::Timeout=600"], timeout=600, env=env)
    run(install, timeout=1200, env=env)


@dataclass(frozen=True)
class Docker:
    """A docker client that reaches a daemon, and the compose command to use with it."""

    cli: str
    compose: tuple[str, ...]

    def __call__(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run([self.cli, *args], timeout=timeout, check=check)

    def image_exists(self, ref: str) -> bool:
        return self("image", "inspect", ref, check=False).returncode == 0


def find_cli() -> str | None:
    # Debian's docker.io client matches its engine; a newer client elsewhere on PATH (say
    # /usr/local/bin/docker) may speak an API version the packaged engine does not.
    if Path("/usr/bin/docker").is_file() and os.access("/usr/bin/docker", os.X_OK):
        return "/usr/bin/docker"
    return shutil.which("docker")


def find_compose(cli: str) -> tuple[str, ...] | None:
    """`docker compose` (v2 plugin) if the client has it, else docker-compose (v1)."""
    if run([cli, "compose", "version"], timeout=30, check=False).returncode == 0:
        return (cli, "compose")
    legacy = shutil.which("docker-compose")
    return (legacy,) if legacy else None


def find_docker() -> tuple[str | None, tuple[str, ...] | None]:
    cli = find_cli()
    return cli, (find_compose(cli) if cli else None)


def require_docker() -> Docker:
    """The docker client and compose, installing them as root when they are missing."""
    cli, compose = find_docker()
    if (cli is None or compose is None) and is_root() and shutil.which("apt-get"):
        apt_install(DOCKER_PACKAGES)
        cli, compose = find_docker()
    if cli is None or compose is None:
        what = "docker" if cli is None else "docker compose / docker-compose"
        missing_requirement(
            f"{what} not found: apt-get install -y {' '.join(DOCKER_PACKAGES)} "
            "(or Docker Engine with its compose plugin)"
        )
        raise AssertionError("unreachable")  # missing_requirement raises; for the type checker
    return Docker(cli, compose)


def daemon_answers(docker: Docker) -> str | None:
    """None when `docker info` works, else why not."""
    try:
        done = docker("info", "--format", "{{.ServerVersion}}", timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return "docker info timed out"
    if done.returncode == 0 and done.stdout.strip():
        return None
    return (done.stderr or done.stdout).strip() or f"docker info exited {done.returncode}"


def ensure_daemon(docker: Docker) -> None:
    """Make sure a daemon answers; as root with dockerd installed, start one if none does.

    A daemon started here is left running, like the system service it stands in for: the next
    run finds it and its image cache at once.
    """
    problem = daemon_answers(docker)
    if problem is None:
        return
    dockerd = shutil.which("dockerd") or ("/usr/sbin/dockerd" if is_root() else None)
    if not is_root() or dockerd is None or not Path(dockerd).exists():
        missing_requirement(
            f"no Docker daemon answers ({problem}): start it (systemctl start docker) "
            "or add this user to the docker group"
        )
        return
    log_path = cache_dir() / "dockerd.log"
    with log_path.open("ab") as log:
        # setsid: the daemon outlives this pytest run and does not get its terminal's signals.
        subprocess.Popen(
            ["setsid", dockerd],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + DAEMON_START_TIMEOUT
    while time.monotonic() < deadline:
        problem = daemon_answers(docker)
        if problem is None:
            return
        time.sleep(0.25)
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
    missing_requirement(
        f"started {dockerd} but no daemon answered within {DAEMON_START_TIMEOUT:.0f} s "
        f"({problem}); log {log_path}:\n{tail}"
    )


def base_tag(mirror: str) -> str:
    recipe = repr((BASE_RECIPE_VERSION, BASE_SUITE, BASE_VARIANT, BASE_PACKAGES, mirror))
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    return f"{BASE_REPOSITORY}:{BASE_SUITE}-{digest}"


def build_base_image(docker: Docker, tag: str, mirror: str) -> None:
    """debootstrap a minimal Debian with Python and import it into docker as `tag`."""
    if shutil.which("debootstrap") is None:
        apt_install(("debootstrap",))
    cache = cache_dir()
    debs = cache / "debootstrap-debs"  # kept: a rebuild need not download the packages again
    debs.mkdir(exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="base-", dir=cache))
    rootfs = workdir / "rootfs"
    try:
        run(
            [
                "debootstrap",
                f"--variant={BASE_VARIANT}",
                f"--include={','.join(BASE_PACKAGES)}",
                f"--cache-dir={debs}",
                BASE_SUITE,
                str(rootfs),
                mirror,
            ],
            timeout=1800,
        )
        # Updates and security fixes, as Debian's own images have; the lists are fetched by
        # the Dockerfiles' apt-get update, so none are shipped.
        security = mirror.rstrip("/").removesuffix("/debian") + "/debian-security"
        (rootfs / "etc/apt/sources.list").write_text(
            f"deb {mirror} {BASE_SUITE} main\n"
            f"deb {mirror} {BASE_SUITE}-updates main\n"
            f"deb {security} {BASE_SUITE}-security main\n"
        )
        for leftover in (rootfs / "var/cache/apt/archives").glob("*.deb"):
            leftover.unlink()
        shutil.rmtree(rootfs / "var/lib/apt/lists", ignore_errors=True)
        (rootfs / "var/lib/apt/lists/partial").mkdir(parents=True)
        # Docker bind-mounts its own resolv.conf; the build host's must not leak into the image.
        (rootfs / "etc/resolv.conf").write_text("")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        try:
            done = subprocess.run(
                [
                    docker.cli,
                    "import",
                    "--change",
                    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "--change",
                    "ENV LANG=C.UTF-8",
                    "--change",
                    'CMD ["bash"]',
                    "-",
                    tag,
                ],
                stdin=tar.stdout,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            tar_code = tar.wait()
        if done.returncode != 0 or tar_code != 0:
            raise RuntimeError(f"docker import of {rootfs} failed (tar {tar_code}):\n{done.stderr}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def choose_base_image(docker: Docker) -> tuple[str, str]:
    """The image both Dockerfiles build FROM, and where it came from.

    EMUHBA_BASE if set; else the locally built Debian base, built now as root if absent (it
    needs no image registry); else python:3.12-slim, which docker pulls.
    """
    chosen = os.environ.get("EMUHBA_BASE")
    if chosen:
        return chosen, "from EMUHBA_BASE"
    mirror = os.environ.get("EMUHBA_DEBIAN_MIRROR", DEFAULT_MIRROR)
    tag = base_tag(mirror)
    if docker.image_exists(tag):
        return tag, "cached"
    if is_root():
        build_base_image(docker, tag, mirror)
        return tag, "built with debootstrap"
    return "python:3.12-slim", "default (not root: no debootstrap)"


def extra_ca_certs() -> str:
    """PEM text of the CA certificates this host adds to the system's, for pip in the build.

    Behind a TLS-intercepting proxy pip in the image fails without them. They travel as a build
    argument, so nothing is copied into the repository, and the Dockerfile keeps them out of the
    image. EMUHBA_EXTRA_CA_CERTS (PEM text) takes precedence.
    """
    given = os.environ.get("EMUHBA_EXTRA_CA_CERTS")
    if given is not None:
        return given
    local = Path("/usr/local/share/ca-certificates")
    if not local.is_dir():
        return ""
    pems = []
    for path in sorted(local.rglob("*.crt")):
        text = path.read_text(errors="replace")
        if "-----BEGIN CERTIFICATE-----" in text:
            pems.append(text.strip())
    return "\n".join(pems)


def proxy_build_args() -> list[str]:
    args: list[str] = []
    for name in PROXY_VARIABLES:
        value = os.environ.get(name)
        if value:
            args += ["--build-arg", f"{name}={value}"]
    return args
