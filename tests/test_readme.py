"""The README's commands, extracted and run; its configuration reference, checked against the code.

The rule for README code blocks (a block without a language tag fails the test):

* ```sh       commands this test runs, each one, in a sandbox: a fresh EdmEnv (its own config,
              queue, log dir and pidfile) as the working directory, `edm` on the PATH running
              this checkout, and the service paths below mapped into the sandbox. A command
              passes when its exit code is the one its trailing comment names (`# exit 3`),
              else 0; a command whose comment says `until Ctrl-C` must still run after a
              while, then exit 0 on SIGINT.
              Before each block the sandbox daemon is running, unless an HTML comment right
              above the block says `<!-- readme-test: STATE -->` with STATE one of
              `stopped`, `stale` (started, then every process killed -9), `broker-down`
              (started against a port where no broker listens) or `checkout` (no sandbox: the
              commands run at the repository root, for the development tools).
* ```console  commands that need a real host: root, a package install, systemd, /etc, or the
              whole quick-start setup (`.ci/run` runs the test command verbatim; a test below
              checks it is the README's). Shown, never run here.
* ```text, ```yaml  output, sample log lines, diagrams, config fragments (yaml blocks must
              parse as an edm config).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, EdmEnv, alive, wait_for

from edm.config import AmqpConfig, DaemonConfig, DatabaseConfig, LogConfig, MetricsConfig, SmtpConfig, parse
from edm.plugins.fee.config import FeeConfig

README = ROOT / "README.md"
FENCE = re.compile(r"^(?P<indent>[ ]*)```(?P<lang>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ ]*$", re.M | re.S)
MARKER = re.compile(r"<!--\s*readme-test:\s*(?P<state>[\w-]+)\s*-->\s*$")
STATES = {"running", "stopped", "stale", "broker-down", "checkout"}
KNOWN_LANGS = {"sh", "console", "text", "yaml", "python"}
EXIT = re.compile(r"#\s*exit (\d+)\b")
UNTIL_INTERRUPTED = "until Ctrl-C"
SECTIONS = {
    "amqp": AmqpConfig,
    "log": LogConfig,
    "daemon": DaemonConfig,
    "database": DatabaseConfig,
    "plugins.fee": FeeConfig,
    "metrics": MetricsConfig,
    "smtp": SmtpConfig,
}
# A field whose YAML key differs (``from`` is a Python keyword), and fields that are no keys.
YAML_KEYS = {"smtp.sender": "smtp.from"}
NOT_KEYS = {"smtp.templates_seen"}


@dataclass(frozen=True)
class Block:
    lang: str
    line: int
    body: str
    state: str


def blocks(text: str) -> list[Block]:
    found = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.search(before)
        body = "\n".join(row[len(m["indent"]) :] for row in m["body"].splitlines())
        found.append(Block(m["lang"].strip(), line, body, marker["state"] if marker else "running"))
    return found


def commands(body: str) -> list[str]:
    """One entry per command line; a trailing backslash continues a command."""
    result: list[str] = []
    pending = ""
    for raw in body.splitlines():
        line = raw.rstrip()
        if pending:
            line = pending + " " + line.lstrip()
            pending = ""
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        if line.strip() and not line.lstrip().startswith("#"):
            result.append(line.strip())
    assert not pending, f"a command ends in a backslash: {pending!r}"
    return result


SH_BLOCKS = [b for b in blocks(README.read_text(encoding="utf-8")) if b.lang == "sh"]


# -- the rule itself -----------------------------------------------------------------------


def test_every_block_is_tagged_and_every_sh_block_is_collected() -> None:
    text = README.read_text(encoding="utf-8")
    found = blocks(text)
    assert len(found) * 2 == len(re.findall(r"^[ ]*```", text, re.M)), "an unbalanced code fence"
    assert all(b.lang in KNOWN_LANGS for b in found), [(b.line, b.lang) for b in found]
    assert len(SH_BLOCKS) == len(re.findall(r"^[ ]*```sh[ ]*$", text, re.M))
    assert all(b.state in STATES for b in found), [(b.line, b.state) for b in found]
    assert sum(len(commands(b.body)) for b in SH_BLOCKS) >= 25


def test_python_blocks_compile() -> None:
    python = [b for b in blocks(README.read_text(encoding="utf-8")) if b.lang == "python"]
    assert python, "the Handlers section shows a handler class"
    for block in python:
        compile(block.body, f"README.md:{block.line}", "exec")


def test_the_quick_start_test_command_is_what_ci_runs() -> None:
    text = README.read_text(encoding="utf-8")
    assert text.index("## Quick start") < text.index("\n## ", text.index("## Quick start") + 1)
    quick = text[text.index("## Quick start") : text.index("\n## ", text.index("## Quick start") + 1)]
    setup = [b for b in blocks(quick) if b.lang == "console"]
    assert [commands(b.body) for b in setup] == [
        ["./scripts/setup && .venv/bin/edm start"],
        ["./scripts/setup && .venv/bin/python -m pytest -q"],
    ]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-1] == "./scripts/setup && .venv/bin/python -m pytest -q"


def _leaves(doc: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    found: list[tuple[tuple[str, ...], Any]] = []
    for key, value in doc.items():
        if isinstance(value, dict) and value:
            found += _leaves(value, (*prefix, key))
        else:
            found.append(((*prefix, key), value))
    return found


def test_yaml_blocks_are_valid_config_fragments(tmp_path: Path) -> None:
    """Every yaml block of the README is a valid fragment, and the config it gives holds each
    value the block sets (a path as the absolute path it names)."""
    yaml_blocks = [b for b in blocks(README.read_text(encoding="utf-8")) if b.lang == "yaml"]
    assert yaml_blocks
    for block in yaml_blocks:
        doc = yaml.safe_load(block.body)
        config = parse(doc, tmp_path / "mq.yaml", environ={})
        leaves = _leaves(doc)
        assert leaves, block.body
        for keys, value in leaves:
            got: Any = config
            for key in keys:
                got = got[key] if isinstance(got, Mapping) else getattr(got, key)
            if isinstance(got, Path):
                assert got == (tmp_path / value).resolve(), (keys, got, value)
            elif isinstance(got, tuple) and isinstance(value, str):
                assert value in got, (keys, got, value)
            elif isinstance(got, tuple) and isinstance(value, list):
                assert list(got) == value, (keys, got, value)
            else:
                assert got == value, (keys, got, value)


# -- running the sh blocks -----------------------------------------------------------------


class Sandbox:
    def __init__(self, env: EdmEnv, bindir: Path) -> None:
        self.env = env
        bindir.mkdir(parents=True, exist_ok=True)
        wrapper = bindir / "edm"
        # --config first: the daemon's command line then names this sandbox's config, which is
        # how teardown recognises its processes. EDM_CONFIG points there too, so it changes nothing.
        wrapper.write_text(
            f'#!/bin/sh\nPYTHONPATH="{ROOT}" exec "{sys.executable}" -m edm --config "$EDM_CONFIG" "$@"\n'
        )
        wrapper.chmod(0o755)
        self.environ = {
            **{k: v for k, v in os.environ.items() if not k.startswith("EDM_")},
            "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
            "EDM_CONFIG": str(env.config_path),
            "EDM_BIN": str(wrapper),
            "EDM_DEFAULTS": str(bindir / "no-such-defaults"),
        }

    def substitute(self, command: str) -> str:
        for service_path, here in (
            (".venv/bin/edm", "edm"),
            ("/etc/init.d/edm", f"sh {ROOT}/init.d/edm"),
            ("/etc/edm/mq.yaml", str(self.env.config_path)),
            ("/run/edm/edm.pid", str(self.env.pidfile)),
        ):
            command = command.replace(service_path, here)
        unmapped = re.findall(r"(?<![\w.])/(?:etc|run|var|opt|usr)/\S*", command)
        assert not unmapped, f"no sandbox mapping for {unmapped} in {command!r}"
        return command


def prepare(env: EdmEnv, state: str) -> None:
    if state == "running":
        env.start()
    elif state == "stale":
        env.start()
        pids = env.all_pids()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not any(alive(p) for p in pids))
    elif state == "broker-down":
        env.doc["amqp"]["url"] = "amqp://guest:guest@127.0.0.1:1/%2F"
        env.write_config()
        assert env.cli("start").returncode == 0
        wait_for(lambda: "Cannot connect" in env.log_text())
    else:
        assert state == "stopped", state


def run_command(command: str, cwd: Path, environ: dict[str, str]) -> None:
    expected = int(m[1]) if (m := EXIT.search(command)) else 0
    if UNTIL_INTERRUPTED in command:
        process = subprocess.Popen(
            ["sh", "-c", "exec " + command],
            cwd=cwd,
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            time.sleep(2)
            assert process.poll() is None, f"{command!r} ended early: {process.communicate()}"
            process.send_signal(signal.SIGINT)
            out, err = process.communicate(timeout=10)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert process.returncode == expected, (command, out, err)
        return
    result = subprocess.run(
        ["sh", "-c", command], cwd=cwd, env=environ, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == expected, (
        f"{command!r} exited {result.returncode}:\n{result.stdout}{result.stderr}"
    )


@pytest.mark.parametrize("block", SH_BLOCKS, ids=[f"line{b.line}" for b in SH_BLOCKS])
def test_sh_block(block: Block, make_env: Any, tmp_path: Path) -> None:
    todo = commands(block.body)
    assert todo, f"an empty sh block at line {block.line}"
    ran = []
    if block.state == "checkout":
        environ = {k: v for k, v in os.environ.items() if not k.startswith("EDM_")}
        for command in todo:
            local = command.replace(".venv/bin/python", sys.executable)
            local = re.sub(r"\.venv/bin/(\w+)", rf"{sys.executable} -m \1", local)
            run_command(local, ROOT, environ)
            ran.append(command)
        assert ran == todo
        return
    env: EdmEnv = make_env()
    sandbox = Sandbox(env, tmp_path / "bin")
    prepare(env, block.state)
    try:
        for command in todo:
            run_command(sandbox.substitute(command), env.base, sandbox.environ)
            ran.append(command)
            env.all_pids()  # remembered for teardown
    finally:
        env.cli("stop")
    assert ran == todo


# -- the configuration reference -----------------------------------------------------------


def reference_rows() -> dict[str, str]:
    """``{section.key: default}`` from the README's configuration reference table."""
    text = README.read_text(encoding="utf-8")
    start = text.index("## Configuration reference")
    section = text[start : text.index("\n## ", start + 1)]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"^\| `([\w.]+)` \|[^|]*\| `([^`]*)` \|[^|]+\|$", line)
        if m:
            assert m[1] not in rows, f"{m[1]} is documented twice"
            rows[m[1]] = m[2]
        else:
            assert not line.startswith("| `"), f"a reference row that does not parse: {line!r}"
    return rows


def code_keys() -> set[str]:
    named = {f"{prefix}.{f.name}" for prefix, cls in SECTIONS.items() for f in fields(cls)}
    return {YAML_KEYS.get(key, key) for key in named - NOT_KEYS}


def flatten(doc: dict[str, Any]) -> dict[str, Any]:
    """``{section.key: value}`` of a config document, for the sections the reference covers."""
    flat: dict[str, Any] = {}
    for section in SECTIONS:
        node = doc
        for part in section.split("."):
            node = node[part]
        flat.update({f"{section}.{key}": value for key, value in node.items()})
    return flat


def test_the_reference_documents_exactly_the_codes_keys() -> None:
    documented = set(reference_rows())
    assert code_keys() - documented == set(), "keys missing from the README's configuration reference"
    assert documented - code_keys() == set(), "the README documents keys the code does not have"


def test_the_reference_defaults_are_the_shipped_config() -> None:
    shipped = flatten(yaml.safe_load((ROOT / "config" / "mq.yaml").read_text()))
    assert set(shipped) == code_keys(), "config/mq.yaml must hold every key"
    for key, default in reference_rows().items():
        assert yaml.safe_load(default) == shipped[key], key
