"""The shared pool against the real MariaDB and a real sqlite file."""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import MYSQL_DB, MYSQL_HOST, MYSQL_PORT, free_port, root_connection
from netutil import TcpProxy

from edm.config import DatabaseConfig
from edm.db import Database, parse_url
from edm.errors import DatabaseError, DatabaseUnavailable


def test_url_user_and_password_are_percent_decoded() -> None:
    url = parse_url("mysql://us%40er:p%40ss%3Aw%2Fd@db.example:3307/fees")
    assert (url.dialect, url.user, url.password, url.host, url.port, url.database) == (
        "mysql",
        "us@er",
        "p@ss:w/d",
        "db.example",
        3307,
        "fees",
    )
    assert "p@ss" not in repr(url)
    assert parse_url("mysql://u@h/d").port == 3306
    assert parse_url("sqlite:///var/lib/edm/fee.db").path == Path("/var/lib/edm/fee.db")


@pytest.mark.parametrize(
    "url", ["postgres://u:secretpw@h/d", "mysql://u:secretpw@/d", "sqlite://", "mysql://u:secretpw@h"]
)
def test_bad_urls_are_rejected_without_the_password(url: str) -> None:
    with pytest.raises(DatabaseError) as info:
        Database.open(DatabaseConfig(url=url))
    assert "secretpw" not in str(info.value)


def test_wrong_password_is_reported_masked() -> None:
    db = Database.open(DatabaseConfig(url=f"mysql://root:s3cretpw@{MYSQL_HOST}:{MYSQL_PORT}/{MYSQL_DB}"))
    try:
        with pytest.raises(DatabaseError) as info, db.connection():
            pass
        assert "s3cretpw" not in str(info.value)
        assert "root:***@" in str(info.value)
    finally:
        db.close()


def test_unreachable_server_is_database_unavailable_quickly() -> None:
    db = Database.open(DatabaseConfig(url=f"mysql://root:pw@127.0.0.1:{free_port()}/test"))
    try:
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable), db.connection():
            pass
        assert time.monotonic() - started < 6
    finally:
        db.close()


@pytest.fixture
def db() -> Iterator[Database]:
    """The test database as root, closed after the test."""
    db = Database.open(DatabaseConfig(url=f"mysql://root@{MYSQL_HOST}:{MYSQL_PORT}/{MYSQL_DB}"))
    yield db
    db.close()


def test_transaction_commits_or_rolls_back(db: Database, table: str) -> None:
    with db.transaction() as cur:
        cur.execute(f"CREATE TABLE `{table}` (id INT PRIMARY KEY)")
    with db.transaction() as cur:
        cur.execute(f"INSERT INTO `{table}` VALUES (1)")
    with pytest.raises(RuntimeError), db.transaction() as cur:
        cur.execute(f"INSERT INTO `{table}` VALUES (2)")
        raise RuntimeError("abort")
    with pytest.raises(DatabaseError), db.transaction() as cur:
        cur.execute(f"INSERT INTO `{table}` VALUES (1)")  # duplicate key
    with db.connection() as con, con.cursor() as cur:
        cur.execute(f"SELECT id FROM `{table}`")
        assert cur.fetchall() == ((1,),)


@pytest.mark.parametrize("compound", [True, False], ids=["compound statement", "plain packet"])
def test_atomic_commits_all_or_nothing_in_one_packet(db: Database, table: str, compound: bool) -> None:
    """Given a statement that fails in the middle of an atomic() packet, nothing before it
    stays and nothing after it (the COMMIT included) runs: as MariaDB's one compound
    statement, and as the plain multi-statement packet MySQL gets."""
    backend: Any = db._backend
    backend._compound = compound  # what the server's VERSION() would decide
    with db.transaction() as cur:
        cur.execute(f"CREATE TABLE `{table}` (id INT PRIMARY KEY, note VARCHAR(20))")
    db.atomic([(f"INSERT INTO `{table}` VALUES (%s, %s)", [1, "a; b"]), (f"UPDATE `{table}` SET id = 2", [])])
    with pytest.raises(DatabaseError):
        db.atomic(
            [
                (f"INSERT INTO `{table}` VALUES (%s, %s)", [3, "c"]),
                (f"INSERT INTO `{table}` VALUES (%s, %s)", [2, "duplicate"]),
                (f"INSERT INTO `{table}` VALUES (%s, %s)", [4, "d"]),
            ]
        )
    with db.connection() as con, con.cursor() as cur:
        cur.execute(f"SELECT id, note FROM `{table}`")
        assert cur.fetchall() == ((2, "a; b"),)


def test_atomic_learns_from_the_server_whether_it_takes_a_compound_statement(
    db: Database, table: str
) -> None:
    backend: Any = db._backend
    assert backend._compound is None  # nothing asked before the first atomic()
    db.atomic(
        [(f"CREATE TABLE `{table}` (id INT PRIMARY KEY)", []), (f"INSERT INTO `{table}` VALUES (1)", [])]
    )
    with db.connection() as con, con.cursor() as cur:
        cur.execute("SELECT VERSION()")
        (version,) = cur.fetchone()
        cur.execute(f"SELECT id FROM `{table}`")
        assert cur.fetchall() == ((1,),)
    assert backend._compound == ("mariadb" in version.lower())


def test_a_session_keeps_one_connection_and_replaces_a_lost_one(db: Database, table: str) -> None:
    with db.transaction() as cur:
        cur.execute(f"CREATE TABLE `{table}` (id INT PRIMARY KEY)")
    with db.session() as session:
        ids = set()
        for n in range(3):
            with session.transaction() as cur:
                cur.execute("SELECT CONNECTION_ID()")
                ids.add(cur.fetchone()[0])
                cur.execute(f"INSERT INTO `{table}` VALUES ({n})")
        assert len(ids) == 1
        root = root_connection()
        with root.cursor() as cur:
            cur.execute(f"KILL {ids.pop()}")
        root.close()
        with pytest.raises(DatabaseUnavailable), session.transaction() as cur:
            cur.execute("SELECT 1")
        session.atomic([(f"INSERT INTO `{table}` VALUES (%s)", [10])])  # a fresh connection
        with session.transaction() as cur:
            cur.execute(f"SELECT COUNT(*) FROM `{table}`")
            assert cur.fetchone()[0] == 4


def _rows(db: Database, table: str) -> list[int]:
    with db.connection() as con, con.cursor() as cur:
        cur.execute(f"SELECT id FROM `{table}` ORDER BY id")
        return [row[0] for row in cur.fetchall()]


def _readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def test_send_atomic_leaves_transactions_in_flight_on_two_sessions_at_once(db: Database, table: str) -> None:
    """Given a transaction sent on one session that waits for a lock the test holds, a second
    session sends its own without waiting, its outcome arrives while the first still waits,
    and both commit once finished."""
    with db.transaction() as cur:
        cur.execute(f"CREATE TABLE `{table}` (id INT PRIMARY KEY)")
    gate = root_connection()
    try:
        with gate.cursor() as cur:
            cur.execute("SELECT GET_LOCK(%s, 0)", (table,))
        with db.session() as slow_session, db.session() as quick_session:
            slow = slow_session.send_atomic(
                [
                    ("DO GET_LOCK(%s, 60) + RELEASE_LOCK(%s)", [table, table]),
                    (f"INSERT INTO `{table}` VALUES (1)", []),
                ]
            )
            quick = quick_session.send_atomic([(f"INSERT INTO `{table}` VALUES (%s)", [2])])
            assert slow.fileno() >= 0 and quick.fileno() >= 0
            assert _readable(quick.fileno(), 30)
            assert not _readable(slow.fileno(), 0)  # still waiting for the lock
            quick.finish()
            assert _rows(db, table) == [2]
            gate.close()  # releases the lock
            slow.finish()
            assert _rows(db, table) == [1, 2]
    finally:
        if gate.open:
            gate.close()


def test_send_atomic_that_fails_commits_nothing_and_the_session_goes_on(db: Database, table: str) -> None:
    with db.transaction() as cur:
        cur.execute(f"CREATE TABLE `{table}` (id INT PRIMARY KEY)")
    with db.session() as session:
        session.send_atomic([(f"INSERT INTO `{table}` VALUES (1)", [])]).finish()
        failing = session.send_atomic(
            [(f"INSERT INTO `{table}` VALUES (2)", []), (f"INSERT INTO `{table}` VALUES (1)", [])]
        )
        with pytest.raises(DatabaseError) as info:
            failing.finish()
        assert not isinstance(info.value, DatabaseUnavailable)
        with pytest.raises(DatabaseError):
            failing.finish()  # the outcome stays what it was
        session.send_atomic([(f"INSERT INTO `{table}` VALUES (3)", [])]).finish()
    assert _rows(db, table) == [1, 3]


def test_a_connection_lost_in_flight_is_unavailable_and_replaced(db: Database, table: str) -> None:
    with db.transaction() as cur:
        cur.execute(f"CREATE TABLE `{table}` (id INT PRIMARY KEY)")
    with db.session() as session:
        with session.transaction() as cur:
            cur.execute("SELECT CONNECTION_ID()")
            (first,) = cur.fetchone()
        pending = session.send_atomic([("DO SLEEP(%s)", [5]), (f"INSERT INTO `{table}` VALUES (1)", [])])
        with pytest.raises(RuntimeError):
            session.send_atomic([(f"INSERT INTO `{table}` VALUES (2)", [])])  # busy until finished
        root = root_connection()
        with root.cursor() as cur:
            cur.execute(f"KILL {first}")
        root.close()
        with pytest.raises(DatabaseUnavailable):
            pending.finish()
        session.send_atomic([(f"INSERT INTO `{table}` VALUES (3)", [])]).finish()
        with session.transaction() as cur:
            cur.execute("SELECT CONNECTION_ID()")
            assert cur.fetchone()[0] != first
    assert _rows(db, table) == [3]


def test_closing_a_session_waits_for_its_transaction_in_flight(db: Database, table: str) -> None:
    with db.transaction() as cur:
        cur.execute(f"CREATE TABLE `{table}` (id INT PRIMARY KEY)")
    session = db.session()
    pending = session.send_atomic([("DO SLEEP(%s)", [0.3]), (f"INSERT INTO `{table}` VALUES (7)", [])])
    session.close()
    assert _rows(db, table) == [7]
    pending.finish()  # committed: no error


def test_send_atomic_on_sqlite_is_done_when_it_returns(tmp_path: Path) -> None:
    db = Database.open(DatabaseConfig(url=f"sqlite:///{tmp_path}/edm.db"))
    try:
        with db.session() as session:
            session.atomic([("CREATE TABLE t (id INTEGER PRIMARY KEY)", [])])
            done = session.send_atomic([("INSERT INTO t VALUES (?)", [1])])
            assert done.fileno() == -1
            failed = session.send_atomic(
                [("INSERT INTO t VALUES (?)", [2]), ("INSERT INTO t VALUES (?)", [1])]
            )
            assert failed.fileno() == -1
            done.finish()
            with pytest.raises(DatabaseError):
                failed.finish()
            with session.transaction() as cur:
                assert cur.execute("SELECT id FROM t").fetchall() == [(1,)]
    finally:
        db.close()


def _count_connections(user: str) -> int:
    con = root_connection()
    try:
        with con.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = %s", (user,))
            (n,) = cur.fetchone()
            return int(n)
    finally:
        con.close()


class ConnectionSampler:
    """Count the user's server connections every few milliseconds; remember the maximum."""

    def __init__(self, user: str) -> None:
        self.user = user
        self.maximum = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ConnectionSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        con = root_connection()
        try:
            with con.cursor() as cur:
                while not self._stop.is_set():
                    cur.execute(
                        "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = %s", (self.user,)
                    )
                    (n,) = cur.fetchone()
                    self.maximum = max(self.maximum, int(n))
                    self.samples += 1
                    time.sleep(0.005)
        finally:
            con.close()


def test_mysql_pool_never_exceeds_its_size(db_user: tuple[str, str]) -> None:
    user, password = db_user
    db = Database.open(
        DatabaseConfig(url=f"mysql://{user}:{password}@{MYSQL_HOST}:{MYSQL_PORT}/{MYSQL_DB}", pool_size=4)
    )
    in_use = peak = 0
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        nonlocal in_use, peak
        try:
            for _ in range(10):
                with db.connection() as con:
                    with lock:
                        in_use += 1
                        peak = max(peak, in_use)
                    with con.cursor() as cur:
                        cur.execute("SELECT SLEEP(0.01)")
                    with lock:
                        in_use -= 1
        except BaseException as exc:
            errors.append(exc)

    try:
        with ConnectionSampler(user) as sampler:
            threads = [threading.Thread(target=work) for _ in range(32)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        assert not errors
        assert peak == 4
        assert 1 <= sampler.maximum <= 4, sampler.maximum
        assert sampler.samples > 10
    finally:
        db.close()
    assert _count_connections(user) == 0


def test_pool_reconnects_after_the_server_comes_back() -> None:
    proxy = TcpProxy((MYSQL_HOST, MYSQL_PORT))
    db = Database.open(DatabaseConfig(url=f"mysql://root@127.0.0.1:{proxy.port}/{MYSQL_DB}", pool_size=2))
    try:

        def select_one() -> Any:
            with db.connection() as con, con.cursor() as cur:
                cur.execute("SELECT 1")
                return cur.fetchone()[0]

        assert select_one() == 1
        proxy.cut()
        with pytest.raises(DatabaseUnavailable):
            select_one()
        proxy.restore()
        assert select_one() == 1
    finally:
        db.close()
        proxy.close()


def test_sqlite_pool_is_bounded_and_in_wal_mode(tmp_path: Path) -> None:
    db = Database.open(DatabaseConfig(url=f"sqlite:///{tmp_path}/sub/edm.db", pool_size=3))
    assert db.dialect == "sqlite"
    in_use = peak = 0
    lock = threading.Lock()

    def work() -> None:
        nonlocal in_use, peak
        for _ in range(5):
            with db.connection() as con:
                with lock:
                    in_use += 1
                    peak = max(peak, in_use)
                time.sleep(0.005)
                assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
                with lock:
                    in_use -= 1

    try:
        with db.transaction() as cur:
            cur.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
        threads = [threading.Thread(target=work) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert peak == 3
        with pytest.raises(DatabaseError), db.transaction() as cur:
            cur.execute("INSERT INTO t VALUES (1)")
            cur.execute("INSERT INTO t VALUES (1)")
        with db.connection() as con:
            assert con.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 0
    finally:
        db.close()
