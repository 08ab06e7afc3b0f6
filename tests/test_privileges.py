"""Privilege drop: started as root with daemon.user, every edm process runs as that user."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import EdmEnv, wait_for


def _ids(pid: int) -> dict[str, list[int]]:
    fields: dict[str, list[int]] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            fields[key] = [int(v) for v in value.split()]
        elif key in ("CapEff", "CapPrm"):
            fields[key] = [int(value.strip(), 16)]
    return fields


@pytest.fixture
def open_base() -> Iterator[Path]:
    """A directory the target user can traverse (pytest's tmp dirs are root-only)."""
    base = Path(tempfile.mkdtemp(prefix="edm-priv-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def test_root_drops_to_nobody(open_base: Path, make_env) -> None:
    if os.geteuid() != 0:
        pytest.fail("this test must run as root (CI and the dev machines do)")
    nobody = pwd.getpwnam("nobody")
    env: EdmEnv = make_env({"daemon": {"user": "nobody"}}, base=open_base)
    env.config_path.parent.chmod(0o755)
    env.config_path.chmod(0o644)  # the daemon rereads it as nobody on reload
    env.start()
    wait_for(lambda: env.worker_pid() is not None)
    pids = env.all_pids()
    assert len(pids) >= 2
    for pid in pids:
        ids = _ids(pid)
        assert set(ids["Uid"]) == {nobody.pw_uid}, (pid, ids)
        assert set(ids["Gid"]) == {nobody.pw_gid}, (pid, ids)
        assert set(ids["Groups"]) <= set(os.getgrouplist("nobody", nobody.pw_gid)), (pid, ids)
        # no capability left: setuid(0) cannot succeed in any edm process
        assert ids["CapEff"] == [0] and ids["CapPrm"] == [0], (pid, ids)

    env.publish([b"as nobody"])
    wait_for(lambda: "as nobody" in env.bodies_logged())
    for path in [env.pidfile, *env.log_files()]:
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid), path
    for log_file in env.log_files():
        assert log_file.stat().st_mode & 0o777 == 0o600
    assert env.pidfile.stat().st_mode & 0o777 == 0o644
    for directory in (env.pidfile.parent, env.log_dir):
        st = directory.stat()
        assert st.st_uid == nobody.pw_uid and not st.st_mode & 0o027, directory

    # reload works as nobody, and stop removes the pidfile from the nobody-owned run dir
    env.doc["log"]["name"] = "after-reload"
    env.write_config()
    env.config_path.chmod(0o644)
    assert env.cli("reload").returncode == 0
    wait_for(lambda: "Reloaded the config" in env.log_text("after-reload"))
    assert env.cli("stop").returncode == 0
    assert not env.pidfile.exists()


def test_naming_a_user_without_root_fails(make_env) -> None:
    """The real CLI, run by an unprivileged user, refuses a config that names another user."""
    import subprocess
    import sys

    from conftest import ROOT

    env: EdmEnv = make_env({"daemon": {"user": "root"}})
    base = Path(tempfile.mkdtemp(prefix="edm-nonroot-"))
    try:
        base.chmod(0o755)
        config = base / "mq.yaml"
        config.write_text(env.config_path.read_text())
        config.chmod(0o644)
        nobody = pwd.getpwnam("nobody")
        # Import as root (the interpreter's packages may sit in root's home), then become
        # nobody before the CLI runs.
        script = (
            "import os, sys; sys.path.insert(0, sys.argv[1]);"
            "import edm.cli.main, edm.daemon.process, edm.daemon.serve;"
            f"os.setgroups([]); os.setgid({nobody.pw_gid}); os.setuid({nobody.pw_uid});"
            "sys.exit(edm.cli.main.main(['--config', sys.argv[2], 'start']))"
        )
        result = subprocess.run(
            [sys.executable, "-c", script, str(ROOT), str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=str(base),
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "daemon.user" in result.stderr and "'root'" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_drop_privileges_proves_root_is_gone() -> None:
    """In a forked child: after the drop, setuid(0) fails and every id is the target's."""
    from edm.daemon.process import drop_privileges, resolve_identity

    identity = resolve_identity("nobody", None)
    assert identity is not None
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(read_fd)
        try:
            drop_privileges(identity)
            try:
                os.setuid(0)
                verdict = b"setuid(0) succeeded"
            except PermissionError:
                ids = (os.getuid(), os.geteuid(), os.getgid(), os.getegid(), tuple(os.getgroups()))
                verdict = repr(ids).encode()
        except BaseException as exc:
            verdict = f"error {exc}".encode()
        os.write(write_fd, verdict)
        os._exit(0)
    os.close(write_fd)
    os.waitpid(pid, 0)
    verdict = os.read(read_fd, 1000).decode()
    os.close(read_fd)
    uid, gid = identity.uid, identity.gid
    assert verdict == repr((uid, uid, gid, gid, identity.groups)), verdict
