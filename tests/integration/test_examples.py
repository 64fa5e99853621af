"""Every config in examples/ serves as shipped: each is copied to a scratch directory (its
relative store paths land there), its portals moved to a free loopback port and its control
socket to the scratch directory, then started; iscsi-ls must list exactly the targets the file
describes, each with its LUNs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from emuhba.config import load_config
from emuhba.installation import fc_base_iqn
from tests.conftest import INITIATOR, REPO, load_bench

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("libiscsi_tools")]

EXAMPLES = sorted((REPO / "examples").glob("*.toml"))


def expected_targets(path: Path) -> dict[str, int]:
    """Target name -> number of LUNs, from the config itself."""
    config = load_config(path)
    out: dict[str, int] = {}
    for target in config.targets:
        if target.remote_port is None:
            out[target.name] = len(target.luns)
    for controller in config.controllers:
        for port in controller.remote_ports:
            named = next((t.name for t in config.targets if t.remote_port is not None
                          and t.remote_port.replace(":", "").lower()
                          == port.wwpn.replace(":", "").lower()), None)
            name = named or f"{fc_base_iqn(controller.name)}:fc.{port.wwpn.replace(':', '')}"
            out[name.lower()] = len(port.luns) + (port.ram_luns.count if port.ram_luns else 0)
    return out


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_serves_what_it_describes(example: Path, tmp_path: Path,
                                          free_tcp_port: int) -> None:
    text = example.read_text()
    text = re.sub(r'listen = "[^"]*"', f'listen = "127.0.0.1:{free_tcp_port}"', text)
    control = tmp_path / "control"
    control.mkdir(mode=0o700)
    text = text.replace("[server]", f'[server]\ncontrol_socket = "{control}/emuhba.sock"', 1) \
        if "[server]" in text else f'[server]\ncontrol_socket = "{control}/emuhba.sock"\n' + text
    config = tmp_path / example.name
    config.write_text(text)
    wanted = {name.lower(): luns for name, luns in expected_targets(config).items()}
    log = tmp_path / "emuhba.log"
    command = [sys.executable, "-m", "emuhba", "serve", "--config", str(config)]
    server = load_bench().EmuhbaServer(command, "127.0.0.1", free_tcp_port, log,
                                       ready_timeout=60.0)
    server.start()
    try:
        listing = subprocess.run(["iscsi-ls", "-s", "-i", INITIATOR,
                                  f"iscsi://127.0.0.1:{free_tcp_port}"], capture_output=True,
                                 text=True, timeout=120, check=True).stdout
    finally:
        code = server.stop(timeout=30.0)
    assert code == 0, log.read_text()[-3000:]
    found: dict[str, int] = {}
    current = None
    for line in listing.splitlines():
        match = re.match(r"Target:(\S+)", line)
        if match:
            current = match.group(1).lower()
            found[current] = 0
        elif line.startswith("Lun:") and current is not None:
            found[current] += 1
    assert found == wanted, listing
