"""The check of PyMySQL's and DBUtils' internals, and duplicate keys told from other refusals.

A library changed the way a release could (an attribute renamed throughout its class) in a
fresh interpreter before edm is imported: edm says so once and takes the plain path, which
still stores. A duplicate ticket is recognised by its error (MySQL 1062, sqlite's UNIQUE
constraint) on the real MariaDB and a real sqlite file; any other refusal is not one.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from conftest import MYSQL_DB, MYSQL_HOST, MYSQL_PORT

from edm.config import DatabaseConfig
from edm.db import Database, _pymysql_private
from edm.errors import DatabaseError, DuplicateKey
from edm.plugins.fee import store as fee_store
from edm.plugins.fee.parse import Fee

ROOT = Path(__file__).resolve().parent.parent
URL = f"mysql://root@{MYSQL_HOST}:{MYSQL_PORT}/{MYSQL_DB}"


def rename_in_class(module: str, cls: str, old: str, new: str) -> str:
    """Code that renames the attribute ``old`` to ``new`` in every function of a class."""
    return f"""
        import inspect, re, textwrap, {module} as m
        klass = m.{cls}
        for name, value in list(vars(klass).items()):
            if inspect.isfunction(value) and {old!r} in value.__code__.co_names:
                source = textwrap.dedent(inspect.getsource(value))
                namespace = dict(vars(m))
                exec(re.sub(r"\\b{old}\\b", {new!r}, source), namespace)
                setattr(klass, name, namespace[name])
        """


LOGGING = """
import logging, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(levelname)s %(name)s %(message)s")
"""


def run(*parts: str) -> subprocess.CompletedProcess[str]:
    script = "\n".join(textwrap.dedent(part) for part in parts)
    env = {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)


def test_this_pymysql_and_dbutils_have_every_internal_edm_uses() -> None:
    assert _pymysql_private.MISSING == ()
    assert _pymysql_private.fast_path()


@pytest.mark.parametrize(
    ("patch", "named"),
    [
        pytest.param(
            rename_in_class("dbutils.steady_db", "SteadyDBConnection", "_con", "_dbapi_con"),
            "dbutils.steady_db.SteadyDBConnection._con (gone)",
            id="DBUtils' wrapped connection",
        ),
        pytest.param(
            rename_in_class("pymysql.connections", "Connection", "_read_timeout", "_read_wait"),
            "pymysql.connections.Connection._read_timeout (gone)",
            id="a timeout edm replaces",
        ),
    ],
)
def test_a_missing_internal_takes_the_plain_path_loudly_and_still_stores(
    patch: str, named: str, table: str
) -> None:
    # Given a library that renamed an internal edm relies on
    # When edm sends a transaction on a session of the real MariaDB, twice
    result = run(
        patch,
        LOGGING,
        f"""
        from edm.config import DatabaseConfig
        from edm.db import Database
        db = Database.open(DatabaseConfig(url={URL!r}))
        db.atomic([("CREATE TABLE `{table}` (id INT PRIMARY KEY)", [])])
        with db.session() as session:
            for i in (1, 2):
                pending = session.send_atomic([("INSERT INTO `{table}` VALUES (%s)", [i])])
                print("FILENO", pending.fileno())
                pending.finish()
        with db.connection() as con, con.cursor() as cur:
            cur.execute("SELECT id FROM `{table}` ORDER BY id")
            print("ROWS", [row[0] for row in cur.fetchall()])
        db.close()
        """,
    )

    # Then both are stored, sent and awaited in one call each, after one WARNING naming it
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ROWS [1, 2]" in result.stdout
    assert result.stdout.count("FILENO -1") == 2
    warnings = [line for line in result.stdout.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, result.stdout
    assert "edm.db._pymysql_private" in warnings[0] and named in warnings[0]


# -- a duplicate key, and nothing else -----------------------------------------------------------


@pytest.fixture
def mysql() -> Iterator[Database]:
    db = Database.open(DatabaseConfig(url=URL))
    yield db
    db.close()


@pytest.fixture
def sqlite(tmp_path: Path) -> Iterator[Database]:
    db = Database.open(DatabaseConfig(url=f"sqlite:///{tmp_path}/edm.db"))
    yield db
    db.close()


def constrained_fee_table(db: Database, table: str) -> None:
    """The fee table, plus a constraint of the site's own: no volume of 1000 or more."""
    fee_store.create_table(db, table)
    if db.dialect == "mysql":
        alter = f"ALTER TABLE `{table}` ADD CONSTRAINT small CHECK (volume < 1000)"
        with db.transaction() as cur:
            cur.execute(alter)
    else:  # sqlite cannot add a constraint to a table: make it with one
        with db.transaction() as cur:
            cur.execute(f'DROP TABLE "{table}"')
            cur.execute(
                f'CREATE TABLE "{table}" (ticket BIGINT NOT NULL PRIMARY KEY, login BIGINT NOT NULL,'
                " volume TEXT NOT NULL CHECK (CAST(volume AS REAL) < 1000), status CHAR(1) NOT NULL"
                " DEFAULT 'N', created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"
            )


@pytest.mark.parametrize("dialect", ["mysql", "sqlite"])
def test_a_second_row_with_the_same_key_is_a_duplicate_key_and_nothing_else_is(
    dialect: str, table: str, request: pytest.FixtureRequest
) -> None:
    db: Database = request.getfixturevalue(dialect)
    constrained_fee_table(db, table)
    p = db.placeholder
    insert = f"INSERT INTO {fee_store.quote(db, table)} (ticket, login, volume) VALUES ({p}, {p}, {p})"
    db.atomic([(insert, [1, 7, "5"])])

    with pytest.raises(DuplicateKey) as duplicate:
        db.atomic([(insert, [1, 8, "6"])])
    with pytest.raises(DatabaseError) as refused:
        db.atomic([(insert, [2, 7, "5000"])])  # the site's constraint, not a repeat

    assert not isinstance(refused.value, DuplicateKey)
    assert "1062" in str(duplicate.value) if dialect == "mysql" else "UNIQUE" in str(duplicate.value)
    with db.session() as session:  # the same, left in flight (MariaDB's compound statement)
        with pytest.raises(DuplicateKey):
            session.send_atomic([(insert, [1, 9, "7"])]).finish()
        with pytest.raises(DatabaseError) as in_flight:
            session.send_atomic([(insert, [3, 7, "5000"])]).finish()
        assert not isinstance(in_flight.value, DuplicateKey)


@pytest.mark.parametrize("dialect", ["mysql", "sqlite"])
def test_a_batch_the_table_refuses_for_another_reason_is_not_taken_for_a_repeat(
    dialect: str, table: str, request: pytest.FixtureRequest
) -> None:
    # Given the fee table with a constraint of its own, holding ticket 1
    db: Database = request.getfixturevalue(dialect)
    constrained_fee_table(db, table)
    fee_store.store(db, table, [Fee(1, 7, Decimal("5"))], None)

    # When a batch repeats ticket 1, and another breaks the constraint
    repeated = fee_store.store(db, table, [Fee(1, 7, Decimal("5")), Fee(2, 7, Decimal("6"))], None)
    with db.session() as session:
        pending = fee_store.send(session, table, [Fee(3, 7, Decimal("5000"))], None)
        assert pending is not None
        with pytest.raises(DatabaseError) as refused:
            fee_store._finish_at_once(pending)

    # Then the repeat is told apart by its duplicate key, and the refusal is raised as it is
    assert (repeated.inserted, repeated.duplicates) == (1, 1)
    assert not isinstance(refused.value, DuplicateKey)
    with pytest.raises(DatabaseError):
        fee_store.store(db, table, [Fee(4, 7, Decimal("5000"))], None)
    with db.connection() as con:
        cur = con.cursor()
        cur.execute(f"SELECT ticket, status FROM {fee_store.quote(db, table)} ORDER BY ticket")
        assert [tuple(row) for row in cur.fetchall()] == [(1, "Y"), (2, "Y")]
