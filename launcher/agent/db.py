"""The job table: SQLite in WAL mode under RTRAIN_HOME.

The schema has a version (PRAGMA user_version). A home made by an older agent is migrated in
place, in one transaction, the first time a newer agent opens it (migrate()); a version newer
than this agent knows is refused rather than misread. Version 2 added groups (sweeps, arrays),
dependencies, GPU shares and the project per job (V2, docs/design.md "Many runs").
"""
import json
import sqlite3
import time

SCHEMA_VERSION = 2

COLUMNS = """
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
    boot_id TEXT,
    git_commit TEXT,
    git_dirty INTEGER,
    grace REAL NOT NULL DEFAULT 10,
    files INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    settings TEXT NOT NULL DEFAULT '{}'
"""

INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_submitted ON jobs(submitted_at);
CREATE TABLE IF NOT EXISTS tokens (token TEXT PRIMARY KEY, id INTEGER NOT NULL);
"""

# Version 2: jobs of a group (grp), how many jobs share each of its GPUs (share: 2 for --gpus 0.5),
# the project it belongs to (usage), the job its message names (cause: "dependency {cause}
# failed"), a point's own variables (vars: RTRAIN_SWEEP_*, RTRAIN_ARRAY_INDEX, JSON; never
# --env's, which stay in env.json); the groups, and the dependencies between jobs.
V2_COLUMNS = (("grp", "INTEGER"), ("share", "INTEGER NOT NULL DEFAULT 1"), ("project", "TEXT"),
              ("cause", "INTEGER"), ("vars", "TEXT"))
V2 = """
CREATE TABLE IF NOT EXISTS job_groups (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL,
    kind TEXT NOT NULL, label TEXT NOT NULL DEFAULT '', size INTEGER NOT NULL,
    max_running INTEGER, submitted_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS deps (job INTEGER NOT NULL, dep INTEGER NOT NULL, kind TEXT NOT NULL,
    PRIMARY KEY (job, dep));
CREATE INDEX IF NOT EXISTS deps_dep ON deps(dep);
CREATE INDEX IF NOT EXISTS jobs_grp ON jobs(grp);
"""

PUBLIC = ("id", "name", "command", "gpus_requested", "priority", "retries", "attempts", "state",
          "exit_code", "signal", "message", "submitted_at", "started_at", "ended_at",
          "git_commit", "files", "bytes", "share", "project", "cause")


class SchemaError(Exception):
    pass


def connect(path, legacy_settings=None):
    """Open (creating or migrating) the job database. legacy_settings() -> the Settings dict to
    give jobs of a home from before settings were stored per job."""
    con = sqlite3.connect(path, timeout=60, isolation_level=None)
    con.row_factory = sqlite3.Row
    con.execute("PRAGMA busy_timeout=60000")
    wal_mode(con)
    con.execute("PRAGMA synchronous=NORMAL")
    if con.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
        migrate(con, legacy_settings)
    return con


def wal_mode(con, wait_s=30.0):
    """WAL mode, once per database file. Switching to it takes an exclusive lock that SQLite
    does not wait for (its busy handler is not called there): agents opening a new home at the
    same moment would get "database is locked". Ask first; switch, and on that error try again."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if con.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                con.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def migrate(con, legacy_settings=None):
    """Bring the database to SCHEMA_VERSION. Version 0 is either a new file or a home of the
    first agents (jobs with `env` and `pgid` columns, settings in config.json)."""
    with Tx(con):
        version = con.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise SchemaError("the job database was written by a newer rtrain agent (schema %d, "
                              "this agent knows %d)" % (version, SCHEMA_VERSION))
        old = [r[1] for r in con.execute("PRAGMA table_info(jobs)")]
        if not old:
            con.execute("CREATE TABLE jobs (%s)" % COLUMNS)
        elif version >= 1:
            pass  # version 1's table is kept: version 2 only adds (below)
        else:
            con.execute("CREATE TABLE jobs_new (%s)" % COLUMNS)
            new = [r[1] for r in con.execute("PRAGMA table_info(jobs_new)")]
            keep = [c for c in new if c in old and c != "settings"]
            con.execute("INSERT INTO jobs_new (%s, settings) SELECT %s, ? FROM jobs" % (
                ",".join(keep), ",".join(keep)),
                (json.dumps(legacy_settings() if legacy_settings else {}),))
            con.execute("DROP TABLE jobs")
            con.execute("ALTER TABLE jobs_new RENAME TO jobs")
        have = {r[1] for r in con.execute("PRAGMA table_info(jobs)")}
        for name, decl in V2_COLUMNS:
            if name not in have:
                con.execute("ALTER TABLE jobs ADD COLUMN %s %s" % (name, decl))
        for stmt in (INDEXES + V2).strip().split(";"):
            if stmt.strip():
                con.execute(stmt)
        con.execute("PRAGMA user_version=%d" % SCHEMA_VERSION)


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
    d["group"] = row["grp"]
    return d


def insert_job(con, spec):
    cur = con.execute(
        "INSERT INTO jobs (name, command, gpus_requested, priority, retries, state, submitted_at,"
        " git_commit, git_dirty, grace, files, bytes, settings, grp, share, project, vars)"
        " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (spec["name"], spec["command"], spec["gpus"], spec["priority"], spec["retries"], "queued",
         spec.get("submitted_at") or time.time(), spec.get("git_commit"),
         None if spec.get("git_dirty") is None else int(bool(spec["git_dirty"])),
         spec.get("grace", 10.0), spec.get("files", 0), spec.get("bytes", 0),
         json.dumps(spec.get("settings") or {}), spec.get("group"), spec.get("share", 1),
         spec.get("project"), json.dumps(spec["vars"]) if spec.get("vars") else None))
    return cur.lastrowid


def get(con, job_id):
    return con.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()


def active(con):
    return con.execute(
        "SELECT * FROM jobs WHERE state IN ('queued','running') ORDER BY priority DESC, id").fetchall()
