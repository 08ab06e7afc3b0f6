"""The service files: the systemd unit and the LSB init script.

These checks need ``systemd-analyze`` and ``shellcheck``. A missing tool fails the run
with a message instead of skipping, so CI cannot pass without them: the project's CI
setup must install them (Debian/Ubuntu: ``apt-get install -y systemd shellcheck``).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "edm.service"
INIT = ROOT / "init.d" / "edm"


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is required for this test; install it (the CI setup script must)")
    return path


def unit_keys(text: str) -> dict[str, dict[str, list[str]]]:
    """``{section: {key: [values...]}}``; systemd keys may repeat, so values are lists."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"key outside a section: {line!r}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


# -- systemd -------------------------------------------------------------------------------
def test_unit_runs_edm_in_the_foreground_with_restart_and_reload():
    keys = unit_keys(UNIT.read_text())
    service = keys["Service"]
    assert service["Type"] == ["simple"]
    assert service["ExecStart"] == ["/usr/local/bin/edm --config /etc/edm/mq.yaml run"]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["Restart"] == ["on-failure"]
    assert service["KillSignal"] == ["SIGTERM"]
    # Longer than daemon.stop_timeout (30 s by default): edm's own stop finishes first.
    assert int(service["TimeoutStopSec"][0]) > 30


def test_unit_is_hardened_but_can_write_its_directories():
    service = unit_keys(UNIT.read_text())["Service"]
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
    }.items():
        assert service[key] == [value], key
    writable = " ".join(service["ReadWritePaths"]).split()
    assert {"/var/log/edm", "/run/edm", "/var/lib/edm"} <= set(writable)
    assert service["LogsDirectory"] == ["edm"]
    assert service["RuntimeDirectory"] == ["edm"]
    assert service["StateDirectory"] == ["edm"]


def test_unit_ordering_and_install():
    keys = unit_keys(UNIT.read_text())
    assert set(keys["Unit"]["After"][0].split()) == {"network-online.target", "rabbitmq-server.service"}
    assert keys["Unit"]["Wants"] == ["network-online.target"]
    assert keys["Install"]["WantedBy"] == ["multi-user.target"]


def test_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = require("systemd-analyze")
    # verify insists that ExecStart's program exists; point it at one that does.
    text = UNIT.read_text().replace("ExecStart=/usr/local/bin/edm ", "ExecStart=/bin/true ")
    assert "ExecStart=/bin/true " in text
    copy = tmp_path / "edm.service"
    copy.write_text(text)

    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, check=False)

    # Unknown keys and bad values are only warnings (exit 0): any output is a failure.
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


# -- init.d --------------------------------------------------------------------------------
def test_init_script_passes_shellcheck():
    shellcheck = require("shellcheck")
    result = subprocess.run(
        [shellcheck, "--shell=sh", "--severity=style", str(INIT)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_init_script_is_posix_sh_with_an_lsb_header():
    text = INIT.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert INIT.stat().st_mode & stat.S_IXUSR
    header = text[text.index("### BEGIN INIT INFO") : text.index("### END INIT INFO")]
    fields = {}
    for line in header.splitlines()[1:]:
        name, _, value = line.lstrip("# ").partition(":")
        if value:
            fields[name] = value.split()
    assert fields["Provides"] == ["edm"]
    assert fields["Required-Start"] == ["$network", "$remote_fs"]
    assert fields["Required-Stop"] == ["$network", "$remote_fs"]
    assert fields["Should-Start"] == ["rabbitmq-server"]
    assert fields["Should-Stop"] == ["rabbitmq-server"]
    assert fields["Default-Start"] == ["2", "3", "4", "5"]
    assert fields["Default-Stop"] == ["0", "1", "6"]
    assert fields["Short-Description"] and fields["Description"]


def fake_edm(directory: Path, name: str = "edm") -> Path:
    """An edm stand-in: prints who it is and its arguments, exits with $FAKE_EXIT."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text('#!/bin/sh\necho "$0 $*"\nexit "${FAKE_EXIT:-0}"\n')
    path.chmod(0o755)
    return path


def run_init(*args: str, env: dict[str, str], defaults: Path) -> subprocess.CompletedProcess[str]:
    environ = {"PATH": os.environ["PATH"], "EDM_DEFAULTS": str(defaults), **env}
    return subprocess.run(
        ["/bin/sh", str(INIT), *args], capture_output=True, text=True, env=environ, check=False
    )


@pytest.mark.parametrize("args", [(), ("bogus",), ("start", "extra"), ("",)])
def test_unknown_action_prints_usage_and_exits_2(tmp_path, args):
    result = run_init(*args, env={}, defaults=tmp_path / "none")
    assert result.returncode == 2
    assert "Usage:" in result.stderr
    assert "start|stop|restart|force-reload|reload|status" in result.stderr
    assert result.stdout == ""


def test_defaults_file_wins_over_the_environment(tmp_path):
    from_file = fake_edm(tmp_path / "file-bin")
    from_env = fake_edm(tmp_path / "env-bin")
    defaults = tmp_path / "default-edm"
    defaults.write_text(f"EDM_BIN={from_file}\nEDM_CONFIG=/from/file/mq.yaml\n")

    result = run_init(
        "status", env={"EDM_BIN": str(from_env), "EDM_CONFIG": "/from/env.yaml"}, defaults=defaults
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{from_file} --config /from/file/mq.yaml status\n"


def test_the_environment_is_used_without_a_defaults_file(tmp_path):
    from_env = fake_edm(tmp_path / "env-bin")

    result = run_init(
        "start", env={"EDM_BIN": str(from_env), "EDM_CONFIG": "/from/env.yaml"}, defaults=tmp_path / "missing"
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{from_env} --config /from/env.yaml start\n"


def test_a_defaults_file_setting_one_value_keeps_the_others_from_the_environment(tmp_path):
    from_env = fake_edm(tmp_path / "env-bin")
    defaults = tmp_path / "default-edm"
    defaults.write_text("EDM_CONFIG=/from/file/mq.yaml\n")

    result = run_init("stop", env={"EDM_BIN": str(from_env)}, defaults=defaults)

    assert result.stdout == f"{from_env} --config /from/file/mq.yaml stop\n"


def test_builtin_defaults_are_etc_edm_and_edm_on_the_path(tmp_path):
    bindir = tmp_path / "bin"
    fake_edm(bindir)
    environ = {"PATH": f"{bindir}:{os.environ['PATH']}", "EDM_DEFAULTS": str(tmp_path / "missing")}

    result = subprocess.run(
        ["/bin/sh", str(INIT), "status"], capture_output=True, text=True, env=environ, check=False
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{bindir / 'edm'} --config /etc/edm/mq.yaml status\n"


@pytest.mark.parametrize(
    ("action", "passed", "code"),
    [
        ("start", "start", 0),
        ("start", "start", 1),
        ("stop", "stop", 1),
        ("restart", "restart", 0),
        ("status", "status", 3),
        ("status", "status", 4),
        ("status", "status", 1),
        ("reload", "reload", 7),
        ("force-reload", "reload", 0),
        ("force-reload", "reload", 7),
    ],
)
def test_edm_exit_codes_pass_through(tmp_path, action, passed, code):
    edm = fake_edm(tmp_path / "bin")
    defaults = tmp_path / "default-edm"
    defaults.write_text(f"EDM_BIN='{edm}'\nEDM_CONFIG='{tmp_path}/mq.yaml'\n")

    result = run_init(action, env={"FAKE_EXIT": str(code)}, defaults=defaults)

    assert result.returncode == code
    assert result.stdout == f"{edm} --config {tmp_path}/mq.yaml {passed}\n"


@pytest.mark.parametrize(("action", "code"), [("start", 5), ("status", 4)])
def test_a_missing_edm_program_is_reported(tmp_path, action, code):
    defaults = tmp_path / "default-edm"
    defaults.write_text(f"EDM_BIN={tmp_path}/no-such-edm\n")

    result = run_init(action, env={}, defaults=defaults)

    assert result.returncode == code
    assert "no-such-edm: not found" in result.stderr


def test_a_non_executable_edm_program_is_reported(tmp_path):
    plain = tmp_path / "edm"
    plain.write_text("#!/bin/sh\n")
    defaults = tmp_path / "default-edm"
    defaults.write_text(f"EDM_BIN={plain}\n")

    result = run_init("start", env={}, defaults=defaults)

    assert result.returncode == 5
    assert "not found or not executable" in result.stderr


def test_a_config_path_with_spaces_stays_one_argument(tmp_path):
    edm = tmp_path / "bin" / "edm"
    edm.parent.mkdir()
    edm.write_text('#!/bin/sh\nfor a in "$@"; do echo "[$a]"; done\n')
    edm.chmod(0o755)
    defaults = tmp_path / "default-edm"
    defaults.write_text(f"EDM_BIN={edm}\nEDM_CONFIG='/etc/my edm/mq.yaml'\n")

    result = run_init("status", env={}, defaults=defaults)

    assert result.stdout == "[--config]\n[/etc/my edm/mq.yaml]\n[status]\n"


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users can read (pytest's own tmp dirs are private to us)."""
    path = Path(tempfile.mkdtemp(prefix="edm-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.mark.parametrize("hide_runuser", [False, True])
def test_edm_user_runs_edm_as_that_user_when_root(shared_dir, hide_runuser):
    if os.geteuid() != 0:
        pytest.fail("switching users needs root: run the suite as root (CI does)")
    edm = shared_dir / "edm"
    edm.write_text('#!/bin/sh\necho "$(id -un) $*"\n')
    edm.chmod(0o755)
    defaults = shared_dir / "default-edm"
    defaults.write_text(f"EDM_BIN={edm}\nEDM_USER=nobody\nEDM_CONFIG=/x.yaml\n")
    script = INIT
    if hide_runuser:  # the su fallback, as on systems without runuser
        script = shared_dir / "edm-init"
        script.write_text(INIT.read_text().replace("command -v runuser", "command -v no-runuser-here"))

    result = subprocess.run(
        ["/bin/sh", str(script), "status"],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], "EDM_DEFAULTS": str(defaults)},
        check=False,
    )

    assert result.stdout == "nobody --config /x.yaml status\n", result.stderr
