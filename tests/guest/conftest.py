"""Fixtures for the guest tests: the image (built once, cached across runs), the accelerator,
and a per-test harness whose guest console, dmesg, fio output and emuhba log are attached to
the report when the test fails.

Outside CI a missing requirement skips, saying what to install; with CI=true it fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Generator

import pytest

from tests.conftest import missing_requirement
from tests.guest import image as guest_image_mod
from tests.guest.harness import GuestHarness
from tests.guest.image import HOST_PACKAGES, BuildError, GuestImage
from tests.guest.vm import QEMU, boot_check, choose_accel


def _install_host_packages() -> str | None:
    """As root with apt: install what is missing; else None. Returns apt's complaint if any."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return None
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    command = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *HOST_PACKAGES]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900,
                          check=False)
    if done.returncode != 0:
        # Stale or absent package lists are the usual reason; refresh once and retry.
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env, timeout=600,
                       check=False)
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900,
                              check=False)
    return None if done.returncode == 0 else (done.stdout + done.stderr)[-2000:]


def _host_tools_missing(need_build: bool) -> list[str]:
    tools = [QEMU] + (["debootstrap"] if need_build else [])
    return [tool for tool in tools if shutil.which(tool) is None]


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    install_line = f"apt-get install -y {' '.join(HOST_PACKAGES)}"
    cached = guest_image_mod.load_image()
    missing = _host_tools_missing(cached is None)
    if missing:
        complaint = _install_host_packages()
        missing = _host_tools_missing(cached is None)
        if missing:
            extra = f" (apt-get failed: {complaint})" if complaint else ""
            missing_requirement(f"missing {', '.join(missing)}: {install_line}{extra}")
    if cached is not None:
        return cached
    blockers = guest_image_mod.build_blockers()
    if blockers:
        missing_requirement(
            f"no guest image in {guest_image_mod.image_dir()} and {'; '.join(blockers)}: "
            f"run the guest tests once as root (with {install_line})"
        )
    try:
        return guest_image_mod.ensure_image(boot_check)
    except BuildError as exc:
        pytest.fail(f"building the guest image failed: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def guest_accel(guest_image: GuestImage) -> str:
    accel, why = choose_accel(guest_image)
    print(f"\nguest: booting with {accel} ({why})")
    return accel


@pytest.fixture
def guest(
    guest_image: GuestImage, guest_accel: str, tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Generator[GuestHarness, None, None]:
    name = request.node.name.replace("[", "-").replace("]", "").replace("_", "-")
    harness = GuestHarness(guest_image, guest_accel, tmp_path_factory.mktemp("guest"), name)
    try:
        yield harness
    finally:
        problems = harness.close()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        harness = getattr(item, "funcargs", {}).get("guest")
        if isinstance(harness, GuestHarness):
            for title, text in harness.diagnostics():
                report.sections.append((title, text))
    return report
