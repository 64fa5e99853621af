"""Fixtures for the container tests: a Docker daemon, and the two images built by compose.

Builds use the layer cache, so only the first run (or a change to what a layer copies) pays for
apt and pip. As root a missing docker.io, docker-compose or debootstrap is installed and a
missing daemon started; otherwise the tests skip saying what is missing (CI=true: fail).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import pytest

from tests.conftest import REPO, record_summary
from tests.containers.docker_env import (
    Docker,
    choose_base_image,
    ensure_daemon,
    extra_ca_certs,
    proxy_build_args,
    require_docker,
    run,
)

COMPOSE_FILE = REPO / "docker" / "compose.yaml"
# Test tags, not :latest, so that a test run never replaces images a user built for real use.
TARGET_IMAGE = "emuhba:test"
INITIATOR_IMAGE = "emuhba-initiator:test"
BUILD_TIMEOUT = 1800.0


@dataclass(frozen=True)
class Images:
    base: str
    target: str
    initiator: str
    env: dict[str, str]  # what compose needs to find (or rebuild) these images
    build_seconds: float


def compose_command(docker: Docker, project: str, *args: str) -> list[str]:
    return [
        *docker.compose,
        "--ansi",
        "never",
        "-p",
        project,
        "-f",
        str(COMPOSE_FILE),
        "--profile",
        "test",
        *args,
    ]


@pytest.fixture(scope="session")
def docker() -> Docker:
    client = require_docker()
    ensure_daemon(client)
    return client


@pytest.fixture(scope="session")
def images(
    docker: Docker, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Images:
    started = time.monotonic()
    base, origin = choose_base_image(docker)
    base_seconds = time.monotonic() - started
    record_summary(request.config, "base image", f"{base}: {origin} ({base_seconds:.1f} s)")
    started = time.monotonic()
    env = dict(
        os.environ,
        EMUHBA_BASE=base,
        EMUHBA_EXTRA_CA_CERTS=extra_ca_certs(),
        EMUHBA_IMAGE=TARGET_IMAGE,
        EMUHBA_INITIATOR_IMAGE=INITIATOR_IMAGE,
    )
    log_path = tmp_path_factory.mktemp("build") / "compose-build.log"
    # The project name does not matter for a build: images are named by the tags above.
    # --force-rm: the classic builder otherwise leaves a failed step's container behind.
    command = compose_command(docker, "emuhba-build", "build", "--force-rm", *proxy_build_args())
    done = run(command, timeout=BUILD_TIMEOUT, env=env, check=False)
    log_path.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        hint = ""
        if origin.startswith("default"):
            hint = (
                "\n(no image registry? build a local base as root, or point EMUHBA_BASE at one: "
                "see docker/README.md)"
            )
        pytest.fail(
            f"compose build (base {base}) exited {done.returncode}; log {log_path}:\n"
            f"{(done.stdout + done.stderr)[-6000:]}{hint}",
            pytrace=False,
        )
    for tag in (TARGET_IMAGE, INITIATOR_IMAGE):
        assert docker.image_exists(tag), f"compose build left no {tag}\n{done.stdout[-3000:]}"
    seconds = time.monotonic() - started
    record_summary(request.config, "docker images", f"compose build in {seconds:.1f} s")
    return Images(base, TARGET_IMAGE, INITIATOR_IMAGE, env, seconds)
