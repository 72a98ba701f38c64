"""Durable session state in an embedded SQLite database (stdlib ``sqlite3``).

Contract:
* Every write is one transaction, committed with ``synchronous=FULL`` in WAL
  mode before the call returns: once a write returned, a ``kill -9`` (or a
  power cut, as far as the disk honours fsync) cannot lose it, and a write
  interrupted half-way leaves nothing of itself behind.
* Writes are O(change): a turn adds one chunk of token ids and its new
  messages; only fork, import and rewind rewrite a session.
* One process owns a state directory at a time (an exclusive ``flock`` held
  while the store is open); a second server on the same directory is refused.
* All calls run on one worker thread (``run``), in submission order, so the
  event loop never waits on the disk and writes of one session keep the order
  in which they were submitted.

``path=":memory:"`` keeps the database in memory (tests of the code path);
no vLLM import.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import sqlite3
from array import array
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
SCHEMA_VERSION = 1
DB_NAME = "sessions.sqlite3"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    key TEXT PRIMARY KEY, tenant TEXT NOT NULL, id TEXT NOT NULL, ttl_s REAL NOT NULL,
    created_at REAL NOT NULL, last_used_at REAL NOT NULL, version INTEGER NOT NULL,
    committed_version INTEGER NOT NULL, acked_seq INTEGER NOT NULL, ingested_seq INTEGER NOT NULL,
    pending_chat_text TEXT NOT NULL, n_tokens INTEGER NOT NULL, n_messages INTEGER NOT NULL,
    data_parallel_rank INTEGER NOT NULL DEFAULT 0, newest_applied INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS tokens (key TEXT NOT NULL, start INTEGER NOT NULL, ids BLOB NOT NULL,
    PRIMARY KEY (key, start));
CREATE TABLE IF NOT EXISTS messages (key TEXT NOT NULL, idx INTEGER NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (key, idx));
CREATE TABLE IF NOT EXISTS checkpoints (key TEXT NOT NULL, version INTEGER NOT NULL, n_tokens INTEGER NOT NULL,
    n_messages INTEGER NOT NULL, pending_chat_text TEXT NOT NULL, PRIMARY KEY (key, version));
CREATE TABLE IF NOT EXISTS appends (key TEXT NOT NULL, seq INTEGER NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (key, seq));
CREATE TABLE IF NOT EXISTS flash (key TEXT NOT NULL, fid TEXT NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (key, fid));
"""
SCALARS = (
    "tenant", "id", "ttl_s", "created_at", "last_used_at", "version", "committed_version", "acked_seq",
    "ingested_seq", "pending_chat_text", "n_tokens", "n_messages", "data_parallel_rank", "newest_applied",
)  # fmt: skip
# Columns added after a state dir's schema was first written: (name, definition), and their
# values for a row written without them.
ADDED_COLUMNS = (
    ("data_parallel_rank", "INTEGER NOT NULL DEFAULT 0"),
    ("newest_applied", "INTEGER NOT NULL DEFAULT 0"),  # 0: restore falls back to the rewind points
)
ADDED_DEFAULTS = {"data_parallel_rank": 0, "newest_applied": 0}
CHILD_TABLES = ("tokens", "messages", "checkpoints", "appends", "flash")


class StateDirInUse(RuntimeError):
    pass


@dataclass(frozen=True)
class Checkpoint:
    """The session as it was at ``version``: its first ``n_tokens`` tokens and ``n_messages``
    messages, with ``pending_chat_text`` still owed by the template."""

    version: int
    n_tokens: int
    n_messages: int
    pending_chat_text: str = ""


@dataclass
class SessionRecord:
    """One session as stored: ``scalars`` holds the SCALARS columns."""

    key: str
    scalars: dict[str, Any]
    token_ids: list[int] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[Checkpoint] = field(default_factory=list)
    appends: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # (seq, body) not yet ingested
    flash: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (flash query id, registration)


def _blob(ids: Sequence[int]) -> bytes:
    return array("q", ids).tobytes()


def _ids(blob: bytes) -> list[int]:
    out = array("q")
    out.frombytes(blob)
    return out.tolist()


class DurableStore:
    """Session rows keyed by incarnation key; see the module contract."""

    def __init__(self, path: str, identity: dict[str, Any]) -> None:
        """Open (creating) the store at directory ``path`` or ``":memory:"``. ``identity``
        (model, vocabulary) must match what the store was created with: tokens of one model
        are meaningless to another (ValueError)."""
        self.path = path
        self.identity = dict(identity)
        self._lock_file = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="vllm-stateful-durable")
        if path == ":memory:":
            db = ":memory:"
        else:
            Path(path).mkdir(parents=True, exist_ok=True, mode=0o700)
            self._lock_file = open(Path(path) / "lock", "a+")
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lock_file.close()
                raise StateDirInUse(
                    f"state_dir {path} is in use by another vllm-stateful server; give this one its own "
                    "(--state-dir DIR) or stop the other"
                ) from None
            db = str(Path(path) / DB_NAME)
            if not os.path.exists(db):  # every session's tokens and messages: owner only (WAL files follow)
                os.close(os.open(db, os.O_CREAT | os.O_WRONLY, 0o600))
        self._db = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(sessions)").fetchall()}
        for column, definition in ADDED_COLUMNS:
            if column not in have:  # a state dir written before the column existed
                self._db.execute(f"ALTER TABLE sessions ADD COLUMN {column} {definition}")
        self._check_identity(identity)

    def _check_identity(self, identity: dict[str, Any]) -> None:
        rows = dict(self._db.execute("SELECT k, v FROM meta").fetchall())
        want = {"schema": str(SCHEMA_VERSION), **{k: json.dumps(v) for k, v in identity.items()}}
        if not rows:
            with self._tx() as db:
                db.executemany("INSERT INTO meta VALUES (?, ?)", list(want.items()))
            return
        differs = sorted(k for k in want if rows.get(k) != want[k])
        if differs:
            raise ValueError(
                f"state_dir {self.path} holds sessions of another setup (differs in {differs}: stored "
                f"{ {k: rows.get(k) for k in differs} }); give this server its own --state-dir"
            )

    # --- plumbing ------------------------------------------------------------

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the store's thread (in submission order)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _tx(self):
        db = self._db

        class Tx:
            def __enter__(self):
                db.execute("BEGIN IMMEDIATE")
                return db

            def __exit__(self, exc_type, *_):
                db.execute("ROLLBACK" if exc_type else "COMMIT")

        return Tx()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._db.close()
        if self._lock_file is not None:
            self._lock_file.close()

    # --- writes (each one transaction) -------------------------------------------

    def put(self, record: SessionRecord) -> None:
        """Write a whole session (create, fork, import, rewind), replacing what was stored under its key."""
        with self._tx() as db:
            for table in CHILD_TABLES:
                db.execute(f"DELETE FROM {table} WHERE key = ?", (record.key,))
            self._upsert(db, record.key, record.scalars)
            if record.token_ids:
                db.execute("INSERT INTO tokens VALUES (?, 0, ?)", (record.key, _blob(record.token_ids)))
            self._add_messages(db, record.key, 0, record.messages)
            self._add_checkpoints(db, record.key, record.checkpoints)
            db.executemany(
                "INSERT INTO appends VALUES (?, ?, ?)", [(record.key, s, json.dumps(b)) for s, b in record.appends]
            )
            db.executemany(
                "INSERT INTO flash VALUES (?, ?, ?)", [(record.key, f, json.dumps(b)) for f, b in record.flash]
            )

    def commit(
        self,
        key: str,
        scalars: dict[str, Any],
        tokens_from: int,
        new_tokens: Sequence[int],
        messages_from: int,
        new_messages: Sequence[dict[str, Any]],
        checkpoints: Sequence[Checkpoint],
        oldest_version: int,
        ingested_seq: int | None = None,
    ) -> None:
        """A committed change: tokens ``tokens_from..`` and messages ``messages_from..`` added,
        new rewind points, points older than ``oldest_version`` dropped, and (ingestion) the
        appends up to ``ingested_seq`` done."""
        with self._tx() as db:
            self._upsert(db, key, scalars)
            if new_tokens:
                db.execute("INSERT OR REPLACE INTO tokens VALUES (?, ?, ?)", (key, tokens_from, _blob(new_tokens)))
            self._add_messages(db, key, messages_from, new_messages)
            self._add_checkpoints(db, key, checkpoints)
            db.execute("DELETE FROM checkpoints WHERE key = ? AND version < ?", (key, oldest_version))
            if ingested_seq is not None:
                db.execute("DELETE FROM appends WHERE key = ? AND seq <= ?", (key, ingested_seq))

    def add_append(self, key: str, scalars: dict[str, Any], seq: int, body: dict[str, Any]) -> None:
        """An acknowledged append (not yet ingested) and the session's new version. Only the
        version, sequence and use time of a stored session change: a commit saved just before may
        hold newer tokens than ``scalars`` (changes are saved before they are applied)."""
        with self._tx() as db:
            self._upsert(db, key, scalars, only=("version", "acked_seq", "last_used_at"))
            db.execute("INSERT OR REPLACE INTO appends VALUES (?, ?, ?)", (key, seq, json.dumps(body)))

    def put_flash(self, key: str, fid: str, body: dict[str, Any] | None) -> None:
        """Store a flash query's registration (``None``: delete it)."""
        with self._tx() as db:
            if body is None:
                db.execute("DELETE FROM flash WHERE key = ? AND fid = ?", (key, fid))
            else:
                db.execute("INSERT OR REPLACE INTO flash VALUES (?, ?, ?)", (key, fid, json.dumps(body)))

    def delete(self, key: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM sessions WHERE key = ?", (key,))
            for table in CHILD_TABLES:
                db.execute(f"DELETE FROM {table} WHERE key = ?", (key,))

    def delete_all_of(self, tenant: str, session_id: str) -> None:
        """Remove every incarnation stored under ``(tenant, session_id)`` (one transaction)."""
        with self._tx() as db:
            keys = [
                k for (k,) in db.execute("SELECT key FROM sessions WHERE tenant = ? AND id = ?", (tenant, session_id))
            ]
            for key in keys:
                db.execute("DELETE FROM sessions WHERE key = ?", (key,))
                for table in CHILD_TABLES:
                    db.execute(f"DELETE FROM {table} WHERE key = ?", (key,))

    @staticmethod
    def _upsert(db: sqlite3.Connection, key: str, scalars: dict[str, Any], only: Sequence[str] = SCALARS) -> None:
        """Insert the session's row, or update the ``only`` columns of a stored one."""
        cols = ", ".join(SCALARS)
        marks = ", ".join("?" for _ in SCALARS)
        updates = ", ".join(f"{c} = excluded.{c}" for c in only)
        db.execute(
            f"INSERT INTO sessions (key, {cols}) VALUES (?, {marks}) ON CONFLICT(key) DO UPDATE SET {updates}",
            (key, *({**ADDED_DEFAULTS, **scalars}[c] for c in SCALARS)),
        )

    @staticmethod
    def _add_messages(db: sqlite3.Connection, key: str, start: int, messages: Sequence[dict[str, Any]]) -> None:
        db.executemany(
            "INSERT OR REPLACE INTO messages VALUES (?, ?, ?)",
            [(key, start + i, json.dumps(m)) for i, m in enumerate(messages)],
        )

    @staticmethod
    def _add_checkpoints(db: sqlite3.Connection, key: str, points: Sequence[Checkpoint]) -> None:
        db.executemany(
            "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?)",
            [(key, p.version, p.n_tokens, p.n_messages, p.pending_chat_text) for p in points],
        )

    # --- reading ------------------------------------------------------------------

    def load_all(self) -> list[SessionRecord]:
        """Every stored session, whole, oldest first. A session whose token chunks do not add up
        to its ``n_tokens`` (cannot happen with whole transactions) is returned cut to what adds
        up. Of two incarnations under one id (a close whose delete never ran), the newer wins."""
        rows = self._db.execute(f"SELECT key, {', '.join(SCALARS)} FROM sessions ORDER BY created_at").fetchall()
        out: dict[tuple[str, str], SessionRecord] = {}
        for row in rows:
            record = self._record(row[0], dict(zip(SCALARS, row[1:])))
            out[(record.scalars["tenant"], record.scalars["id"])] = record
        return list(out.values())

    def find(self, tenant: str, session_id: str) -> SessionRecord | None:
        """The stored session ``session_id`` of ``tenant`` (its newest incarnation), whole."""
        row = self._db.execute(
            f"SELECT key, {', '.join(SCALARS)} FROM sessions WHERE tenant = ? AND id = ? "
            "ORDER BY created_at DESC LIMIT 1",
            (tenant, session_id),
        ).fetchone()
        return None if row is None else self._record(row[0], dict(zip(SCALARS, row[1:])))

    def _record(self, key: str, scalars: dict[str, Any]) -> SessionRecord:
        db = self._db
        tokens: list[int] = []
        for start, blob in db.execute("SELECT start, ids FROM tokens WHERE key = ? ORDER BY start", (key,)):
            if start != len(tokens) or start >= scalars["n_tokens"]:
                break
            tokens += _ids(blob)
        tokens = tokens[: scalars["n_tokens"]]
        messages = [
            json.loads(b) for (b,) in db.execute("SELECT body FROM messages WHERE key = ? ORDER BY idx", (key,))
        ][: scalars["n_messages"]]
        points = [
            Checkpoint(*r)
            for r in db.execute(
                "SELECT version, n_tokens, n_messages, pending_chat_text FROM checkpoints WHERE key = ? "
                "ORDER BY version",
                (key,),
            )
        ]
        rows = db.execute("SELECT seq, body FROM appends WHERE key = ? ORDER BY seq", (key,))
        appends = [(s, json.loads(b)) for s, b in rows]
        flash = [(f, json.loads(b)) for f, b in db.execute("SELECT fid, body FROM flash WHERE key = ?", (key,))]
        scalars["n_tokens"], scalars["n_messages"] = len(tokens), len(messages)
        return SessionRecord(key, scalars, tokens, messages, points, appends, flash)


def default_state_dir(model_identity: str) -> str:
    """Under the user's cache dir, one directory per served model (``XDG_CACHE_HOME`` honoured)."""
    import hashlib

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    tag = hashlib.sha256(model_identity.encode()).hexdigest()[:12]
    return str(base / "vllm-stateful" / "state" / tag)
