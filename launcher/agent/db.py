"""The job table: SQLite in WAL mode under RTRAIN_HOME."""
import json
import sqlite3
import time

STATES = ("queued", "running", "succeeded", "failed", "cancelled", "lost")
ACTIVE = ("queued", "running")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    command TEXT NOT NULL,
    gpus_requested INTEGER NOT NULL DEFAULT 0,
    priority INTEGER NOT NULL DEFAULT 0,
    retries INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    gpus TEXT NOT NULL DEFAULT '[]',
    exit_code INTEGER,
    signal TEXT,
    message TEXT NOT NULL DEFAULT '',
    submitted_at REAL NOT NULL,
    started_at REAL,
    ended_at REAL,
    wrapper_pid INTEGER,
    wrapper_start TEXT,
    pgid INTEGER,
    boot_id TEXT,
    git_commit TEXT,
    git_dirty INTEGER,
    env TEXT NOT NULL DEFAULT '{}',
    grace REAL NOT NULL DEFAULT 10,
    files INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_submitted ON jobs(submitted_at);
CREATE TABLE IF NOT EXISTS tokens (token TEXT PRIMARY KEY, id INTEGER NOT NULL);
"""

PUBLIC = ("id", "name", "command", "gpus_requested", "priority", "retries", "attempts", "state",
          "exit_code", "signal", "message", "submitted_at", "started_at", "ended_at",
          "git_commit", "files", "bytes")


def connect(path):
    con = sqlite3.connect(path, timeout=60, isolation_level=None)
    con.row_factory = sqlite3.Row
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    con.execute("PRAGMA busy_timeout=60000")
    con.executescript(SCHEMA)
    return con


class Tx:
    """`with Tx(con):` runs the block in one BEGIN IMMEDIATE transaction."""

    def __init__(self, con):
        self.con = con

    def __enter__(self):
        self.con.execute("BEGIN IMMEDIATE")
        return self.con

    def __exit__(self, kind, value, tb):
        self.con.execute("COMMIT" if kind is None else "ROLLBACK")
        return False


def to_public(row):
    d = {k: row[k] for k in PUBLIC}
    d["gpus"] = json.loads(row["gpus"])
    d["git_dirty"] = None if row["git_dirty"] is None else bool(row["git_dirty"])
    return d


def insert_job(con, spec):
    cur = con.execute(
        "INSERT INTO jobs (name, command, gpus_requested, priority, retries, state, submitted_at,"
        " git_commit, git_dirty, env, grace, files, bytes) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (spec["name"], spec["command"], spec["gpus"], spec["priority"], spec["retries"], "queued",
         time.time(), spec.get("git_commit"),
         None if spec.get("git_dirty") is None else int(bool(spec["git_dirty"])),
         json.dumps(spec.get("env") or {}), spec.get("grace", 10.0),
         spec.get("files", 0), spec.get("bytes", 0)))
    return cur.lastrowid


def get(con, job_id):
    return con.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()


def active(con):
    return con.execute(
        "SELECT * FROM jobs WHERE state IN ('queued','running') ORDER BY priority DESC, id").fetchall()
