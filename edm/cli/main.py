"""The command line: argument parsing, exit codes, dispatch. No daemon logic lives here."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from edm import __version__
from edm.cli import status as status_view
from edm.config import (
    Config,
    Essentials,
    find_config,
    load,
    load_essentials,
    password_warning,
)
from edm.daemon.pidfile import PidState, probe
from edm.daemon.statusfile import read_report, read_stop_record, remove, report_path, stop_record_path
from edm.errors import AlreadyRunning, ConfigError, DaemonError, EdmError, PidfileError
from edm.handlers import loader as handler_loader
from edm.logs import DailyLog
from edm.redact import mask_text

# Exit codes, LSB where the init script passes them through.
OK = 0
FAILURE = 1
USAGE = 2
STATUS_DEAD = 1
STATUS_NOT_RUNNING = 3
STATUS_UNKNOWN = 4
NOT_RUNNING = 7

START_TIMEOUT = 60.0


def _err(message: str) -> None:
    print(f"edm: {mask_text(message)}", file=sys.stderr)


def _load(args: argparse.Namespace) -> Config:
    return load(find_config(args.config))


def _check_startable(config: Config) -> None:
    """What can be found out before forking: a user switch. The handler is loaded by the worker
    alone (never in the main process); a worker that cannot load it fails the start."""
    # Imported here on purpose: the daemon's modules (python-daemon, pika) are for the
    # commands that start it; `edm status`, `stop` and `reload` never load them.
    from edm.daemon.process import resolve_identity

    resolve_identity(config.daemon.user, config.daemon.group)


# -- commands ------------------------------------------------------------------------------------


def cmd_start(args: argparse.Namespace) -> int:
    # Imported here on purpose, like _check_startable: only the commands that start the daemon
    # load it (and pika with it).
    from edm.daemon.process import Outcome, detach
    from edm.daemon.serve import serve

    config = _load(args)
    found = probe(config.daemon.pidfile)
    if found.state is PidState.RUNNING:
        print(AlreadyRunning(found.pid))
        return OK
    _check_startable(config)
    reply = detach(config.daemon.umask, lambda report: serve(config, report), START_TIMEOUT)
    if reply.outcome is Outcome.ALREADY_RUNNING:  # another start won the race for the pidfile
        print(AlreadyRunning(reply.pid))
        return OK
    if reply.outcome is not Outcome.STARTED:
        raise DaemonError(reply.error or "the daemon exited during start (see its log)")
    print(f"edm started (pid {reply.pid})")
    return OK


def cmd_run(args: argparse.Namespace) -> int:
    # Imported here on purpose: see cmd_start.
    from edm.daemon.process import Handshake, Outcome
    from edm.daemon.serve import serve

    config = _load(args)
    _check_startable(config)
    failure: list[str] = []

    def report(handshake: Handshake) -> None:
        if handshake.outcome is not Outcome.STARTED:
            failure.append(handshake.error or handshake.outcome.value)

    code = serve(config, report)
    if failure:
        _err(failure[0])
        return FAILURE
    return code


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie waiting for its reaper counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] not in (b"Z", b"X")


def _essentials(args: argparse.Namespace) -> Essentials:
    found = load_essentials(find_config(args.config))
    if found.problem:
        print(f"edm: warning: {mask_text(found.problem)}", file=sys.stderr)
    return found


def cmd_stop(args: argparse.Namespace) -> int:
    config = _essentials(args)
    pidfile = config.pidfile
    found = probe(pidfile)
    if found.state is PidState.ABSENT:
        print("edm is not running")
        return OK
    if found.state is PidState.STALE:
        _remove_stale(pidfile)
        print(f"edm is not running (removed the stale pidfile of pid {found.pid})")
        return OK
    pid = found.pid
    if pid is None:
        _err(f"{pidfile} is locked but holds no pid; cannot stop")
        return FAILURE
    workers = _worker_pids(pidfile)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    except PermissionError:
        _err(f"not allowed to signal pid {pid} (run as its user or root)")
        return FAILURE
    timeout = config.stop_timeout
    if _wait_stopped(pidfile, pid, timeout + 2):
        # The main process may have had to SIGKILL a worker that ignored the deadline.
        record_path = stop_record_path(pidfile)
        record = read_stop_record(record_path)
        if record is not None and record.pid == pid:
            for killed in record.killed:
                _err(killed.message)
            remove(record_path)
        print("edm stopped")
        return OK
    message = f"edm (pid {pid}) did not stop within {timeout:g} s; sending SIGKILL"
    _err(message)
    _log_line(config, "WARNING", message + ".")
    for victim in [pid, *workers]:
        try:
            os.kill(victim, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if _wait_stopped(pidfile, pid, 5):
        _remove_stale(pidfile)
        print("edm killed")
        return OK
    _err(f"edm (pid {pid}) could not be stopped")
    return FAILURE


def _wait_stopped(pidfile: Path, pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe(pidfile).state is not PidState.RUNNING and not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def _remove_stale(pidfile: Path) -> None:
    if probe(pidfile).state is PidState.STALE:
        try:
            pidfile.unlink()
        except OSError:
            pass


def _worker_pids(pidfile: Path) -> list[int]:
    report = read_report(report_path(pidfile)) or {}
    pids = []
    for worker in (report.get("workers") or {}).values():
        if isinstance(worker, dict) and isinstance(worker.get("pid"), int):
            pids.append(worker["pid"])
    return pids


def _log_line(config: Essentials, level: str, text: str) -> None:
    try:
        DailyLog(config.log_dir, config.log_name).write(level, text)
    except OSError:
        pass


def cmd_restart(args: argparse.Namespace) -> int:
    code = cmd_stop(args)
    if code != OK:
        return code
    return cmd_start(args)


def cmd_status(args: argparse.Namespace) -> int:
    try:
        config = _essentials(args)
        found = probe(config.pidfile)
    except (ConfigError, PidfileError) as exc:
        _err(str(exc))
        if args.json:
            doc = status_view.document("unknown", None, STATUS_UNKNOWN, None)
            print(json.dumps({**doc, "error": mask_text(str(exc))}, sort_keys=True))
        return STATUS_UNKNOWN
    report = read_report(report_path(config.pidfile)) if found.state is PidState.RUNNING else None
    if found.state is PidState.RUNNING:
        code, first = OK, f"edm is running (pid {found.pid})"
    elif found.state is PidState.STALE:
        code, first = STATUS_DEAD, f"edm is dead but pidfile exists (pid {found.pid})"
    else:
        code, first = STATUS_NOT_RUNNING, "edm is not running"
    doc = status_view.document(found.state.value, found.pid, code, report)
    if args.json:
        print(json.dumps(doc, sort_keys=True, default=str))
        return code
    print(first)
    for line in status_view.describe(doc):
        print(line)
    return code


def cmd_reload(args: argparse.Namespace) -> int:
    config = _load(args)
    handler_loader.load(config.amqp.handler, config.amqp.handler_options)  # imported, not built
    found = probe(config.daemon.pidfile)
    if found.state is not PidState.RUNNING or found.pid is None:
        print("edm is not running")
        return NOT_RUNNING
    try:
        os.kill(found.pid, signal.SIGHUP)
    except ProcessLookupError:
        print("edm is not running")
        return NOT_RUNNING
    except PermissionError:
        _err(f"not allowed to signal pid {found.pid}")
        return FAILURE
    print(f"edm reloading (pid {found.pid})")
    return OK


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args)
    handler_loader.load(config.amqp.handler, config.amqp.handler_options)  # imported, not built
    pw = password_warning(config)
    for warning in [pw] if pw else []:
        print(f"warning: {mask_text(warning)}")
    print(f"{config.path}: OK")
    return OK


def cmd_publish(args: argparse.Namespace) -> int:
    # Imported here on purpose: pika is loaded only by the commands that talk to the broker.
    from edm.cli.publish import read_bodies, run_publish

    config = _load(args)
    bodies = read_bodies(args.body, args.file)
    progress = sys.stderr if sys.stderr.isatty() else None
    return run_publish(
        config,
        bodies,
        routing_key=args.routing_key,
        exchange=args.exchange,
        progress=progress,
        blocked_timeout=args.timeout,
    )


def cmd_keys(args: argparse.Namespace) -> int:
    # Imported here on purpose: pyzmq is an optional extra, needed by this command alone.
    from edm.cli.keys import new_pair

    public, secret = new_pair(Path(args.path))
    print(f"wrote {secret} (secret, mode 0600) and {public} (public: hand this one to the other side)")
    return OK


def cmd_tail(args: argparse.Namespace) -> int:
    # Imported here on purpose: each command loads only what it uses (`edm status` stays light).
    from edm.cli.tail import run_tail

    return run_tail(_load(args), args.lines, args.follow)


def cmd_dead(args: argparse.Namespace) -> int:
    # Imported here on purpose: pika is loaded only by the commands that talk to the broker.
    from edm.cli import dead

    if args.action == "purge" and not args.yes:
        print("edm dead: purge deletes every dead letter; add --yes to do it", file=sys.stderr)
        return USAGE
    config = _load(args)
    if args.action == "list":
        return dead.run_list(config, args.count, args.json)
    if args.action == "replay":
        return dead.run_replay(config, None if args.all else args.count)
    return dead.run_purge(config)


# -- parsing -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edm", description="Consume e-mail jobs from RabbitMQ; receive trade fees over ZeroMQ."
    )
    parser.add_argument("--config", metavar="PATH", help="config file (default: $EDM_CONFIG, ...)")
    parser.add_argument("--version", action="version", version=f"edm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("start", help="start the daemon in the background")
    sub.add_parser("stop", help="stop the daemon gracefully (SIGKILL after daemon.stop_timeout)")
    sub.add_parser("restart", help="stop, then start")
    status = sub.add_parser("status", help="report whether edm runs (LSB exit codes)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser("reload", help="validate the config, then SIGHUP the daemon")
    sub.add_parser("run", help="run in the foreground (systemd, containers)")
    sub.add_parser("check-config", help="validate the config and print problems")
    publish = sub.add_parser(
        "publish", help="publish persistent messages with publisher confirms (stdin lines without BODY)"
    )
    publish.add_argument("-k", "--routing-key", help="routing key (default: amqp.routing_key)")
    publish.add_argument("--exchange", help="exchange (default: amqp.exchange)")
    publish.add_argument("--file", metavar="PATH", help="one message per line of PATH ('-' for stdin)")
    publish.add_argument(
        "--timeout",
        type=_seconds,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait while the broker blocks publishing (default 30)",
    )
    publish.add_argument("body", nargs="*", metavar="BODY", help="message bodies")
    tail = sub.add_parser("tail", help="print today's log; -f follows it across midnight")
    tail.add_argument("-n", "--lines", type=_non_negative, default=10, metavar="N")
    tail.add_argument("-f", "--follow", action="store_true")
    keys = sub.add_parser("keys", help="CURVE key pairs for the fee receiver and its clients")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    new = keys_sub.add_parser("new", help="write PATH.key_secret (0600) and PATH.key (public)")
    new.add_argument("path", metavar="PATH")

    dead = sub.add_parser("dead", help="list, replay or purge the dead letters in <amqp.queue>.dead")
    actions = dead.add_subparsers(dest="action", metavar="ACTION", required=True)
    dead_list = actions.add_parser("list", help="show the oldest dead letters without removing them")
    dead_list.add_argument(
        "-n", dest="count", type=_non_negative, default=20, metavar="N", help="at most N (20)"
    )
    dead_list.add_argument("--json", action="store_true", help="one JSON array")
    dead_replay = actions.add_parser("replay", help="move dead letters back to amqp.queue, oldest first")
    # No default: putting messages back into production is said explicitly, every time.
    how_many = dead_replay.add_mutually_exclusive_group(required=True)
    how_many.add_argument("-n", dest="count", type=_non_negative, metavar="N", help="the oldest N")
    how_many.add_argument("--all", action="store_true", help="every dead letter there now")
    dead_purge = actions.add_parser("purge", help="delete every dead letter (needs --yes)")
    dead_purge.add_argument("--yes", action="store_true", help="really delete them")
    return parser


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "start": cmd_start,
    "stop": cmd_stop,
    "restart": cmd_restart,
    "status": cmd_status,
    "reload": cmd_reload,
    "run": cmd_run,
    "check-config": cmd_check_config,
    "publish": cmd_publish,
    "tail": cmd_tail,
    "keys": cmd_keys,
    "dead": cmd_dead,
}


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a number of seconds more than 0")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except EdmError as exc:
        _err(str(exc))
        return FAILURE
    except KeyboardInterrupt:
        return FAILURE
    except Exception as exc:
        if os.environ.get("EDM_DEBUG"):
            raise
        _err(f"unexpected error ({type(exc).__name__}): {exc}")
        return FAILURE
