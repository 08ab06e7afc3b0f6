"""The LSB init script itself, run with sh from the checkout against a real daemon."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, EdmEnv, alive, wait_for

INIT = ROOT / "init.d" / "edm"


def edm_wrapper(directory: Path) -> Path:
    """An `edm` program that runs this checkout's package with this interpreter."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "edm"
    path.write_text(f'#!/bin/sh\nPYTHONPATH="{ROOT}" exec "{sys.executable}" -m edm "$@"\n')
    path.chmod(0o755)
    return path


@pytest.fixture
def init(edm_env: EdmEnv, tmp_path: Path):
    edm = edm_wrapper(tmp_path / "bin")
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith("EDM_")},
        "EDM_BIN": str(edm),
        "EDM_CONFIG": str(edm_env.config_path),
        "EDM_DEFAULTS": str(tmp_path / "no-such-defaults"),
    }

    def run(action: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["sh", str(INIT), action], capture_output=True, text=True, env=environ, timeout=90, check=False
        )
        edm_env.all_pids()  # remembered for teardown, which stops them by PID
        return result

    return run


def test_the_init_script_drives_a_real_daemon(edm_env: EdmEnv, init) -> None:
    started = init("start")
    assert started.returncode == 0, started.stderr
    pid = edm_env.main_pid()
    assert pid is not None and alive(pid)
    edm_env.wait_consuming()

    status = init("status")
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[0] == f"edm is running (pid {pid})"

    for action in ("reload", "force-reload"):
        result = init(action)
        assert result.returncode == 0, result.stderr
    wait_for(lambda: edm_env.log_text().count("Reloaded the config") == 2, timeout=5)
    assert edm_env.main_pid() == pid

    restarted = init("restart")
    assert restarted.returncode == 0, restarted.stderr
    new_pid = edm_env.main_pid()
    assert new_pid is not None and new_pid != pid
    assert not alive(pid)
    edm_env.wait_consuming()
    edm_env.publish([b"through the init script"])
    wait_for(lambda: "through the init script" in edm_env.bodies_logged())

    stopped = init("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not alive(new_pid)

    after = init("status")
    assert after.returncode == 3
    assert after.stdout.splitlines()[0] == "edm is not running"
    assert init("reload").returncode == 7
    assert init("stop").returncode == 0  # stopping a stopped daemon is fine


def test_an_unknown_action_exits_2(init) -> None:
    result = init("bounce")
    assert result.returncode == 2
    assert "Usage:" in result.stderr
