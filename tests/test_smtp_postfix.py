"""A real MTA: 100 jobs through the daemon to a private Postfix instance (installed by
``scripts/setup``, on a loopback port of its own), read back from the Maildir it delivers to."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from email import message_from_bytes, policy
from pathlib import Path

import pytest
from conftest import EdmEnv, alive, free_port, wait_for

POSTFIX = Path("/usr/sbin/postfix")
MASTER_CF = Path("/usr/share/postfix/master.cf.dist")

pytestmark = pytest.mark.slow


class Postfix:
    """``postfix start-fg`` with a config directory of its own: every address at example.net
    goes to one Maildir, ``mail``."""

    def __init__(self) -> None:
        if not POSTFIX.exists() or os.geteuid() != 0:
            pytest.fail("these tests need root and Postfix (./scripts/setup installs it)")
        owner = pwd.getpwnam("postfix")
        # Not under pytest's 0700 temp dir: Postfix's own user delivers into it.
        self.base = Path(tempfile.mkdtemp(prefix="edm-postfix-"))
        self.base.chmod(0o755)
        self.conf, self.mail = self.base / "conf", self.base / "mail"
        for directory in (self.conf, self.base / "queue", self.base / "data", self.mail):
            directory.mkdir()
        for directory in (self.base / "data", self.mail):
            os.chown(directory, owner.pw_uid, owner.pw_gid)
        self.port = free_port()
        (self.conf / "main.cf").write_text(
            f"""compatibility_level = 3.6
queue_directory = {self.base}/queue
data_directory = {self.base}/data
maillog_file = /dev/stdout
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = mx.edm.test
mydestination =
mynetworks = 127.0.0.0/8
relayhost =
smtpd_relay_restrictions = permit_mynetworks, reject
virtual_mailbox_domains = example.net
virtual_mailbox_base = {self.mail}
virtual_mailbox_maps = static:maildir/
virtual_uid_maps = static:{owner.pw_uid}
virtual_gid_maps = static:{owner.pw_gid}
virtual_minimum_uid = 1
"""
        )
        smtpd = "smtp      inet  n       -       y       -       -       smtpd"
        master = MASTER_CF.read_text()
        assert smtpd in master, f"{MASTER_CF} has no smtpd line to move to a port of ours"
        (self.conf / "master.cf").write_text(
            master.replace(smtpd, f"127.0.0.1:{self.port} inet n - n - - smtpd")
        )
        self.log = (self.base / "postfix.log").open("wb")
        self.process = subprocess.Popen(
            [str(POSTFIX), "-c", str(self.conf), "start-fg"], stdout=self.log, stderr=subprocess.STDOUT
        )
        wait_for(self._listening, timeout=30)

    def _listening(self) -> bool:
        assert self.process.poll() is None, (self.base / "postfix.log").read_text()
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def delivered(self) -> list[Path]:
        new = self.mail / "maildir" / "new"
        return sorted(new.iterdir()) if new.exists() else []

    def stop(self) -> None:
        subprocess.run([str(POSTFIX), "-c", str(self.conf), "stop"], capture_output=True, timeout=30)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        pidfile = self.base / "queue" / "pid" / "master.pid"
        if pidfile.exists():
            pid = int(pidfile.read_text().split()[0])
            if alive(pid) and f"{self.conf}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        self.log.close()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def postfix() -> Iterator[Postfix]:
    server = Postfix()
    yield server
    server.stop()


def test_100_jobs_are_delivered_by_postfix_to_a_maildir(
    make_env: Callable[..., EdmEnv], postfix: Postfix
) -> None:
    env = make_env(
        {
            "amqp": {"handler": "smtp"},
            "smtp": {"url": f"smtp://127.0.0.1:{postfix.port}", "helo": "edm.test", "journal": "../run/j"},
        }
    )
    jobs = [
        {
            "to": f"Reader {n} <reader{n}@example.net>",
            "from": "News <news@example.org>",
            "subject": f"Issue {n} — Grüße",
            "text": f"Hello reader {n}",
            "html": f"<p>Hello reader {n}</p>",
            "unsubscribe": f"https://example.org/unsubscribe?n={n}",
            "id": f"postfix-{n}",
        }
        for n in range(100)
    ]
    env.start()
    env.publish([json.dumps(job).encode() for job in jobs])
    wait_for(lambda: len(postfix.delivered()) >= 100, timeout=120)
    wait_for(lambda: env.queue_depth() == 0)
    mails = [message_from_bytes(p.read_bytes(), policy=policy.default) for p in postfix.delivered()]
    assert len(mails) == 100
    assert len({str(m["Message-ID"]) for m in mails}) == 100
    by_subject = {str(m["Subject"]): m for m in mails}
    assert set(by_subject) == {job["subject"] for job in jobs}
    mail = by_subject["Issue 7 — Grüße"]
    assert mail["To"].addresses[0].addr_spec == "reader7@example.net"
    assert str(mail["List-Unsubscribe"]) == "<https://example.org/unsubscribe?n=7>"
    text, html = mail.iter_parts()
    assert (
        text.get_content().strip() == "Hello reader 7"
        and html.get_content().strip() == "<p>Hello reader 7</p>"
    )
    assert env.log_text().count(" INFO Sent <") == 100
