"""Scheduling settings are one type (agent/settings.py), made from hosts.yaml by the client,
stored with each job, and each job is placed by its own; a home of the first agents (settings in
config.json, jobs with `env` and `pgid` columns) is migrated in place."""
import json
import os
import sqlite3
import time

import pytest

from launcher import config
from launcher.agent import daemon, db, leases, paths, scheduler
from launcher.agent.settings import DEFAULTS, Settings, SettingsError
from launcher.agentclient import AgentClient


def test_defaults_are_written_once_and_round_trip():
    s = Settings()
    assert s.to_dict() == dict(DEFAULTS)
    assert Settings.from_dict(None) == s and Settings.from_dict({}) == s
    t = Settings.from_dict({"mem_busy_mib": 10, "visible": ["0", "GPU-x"], "lock_dir": "/l",
                            "nvidia_smi": "/opt/nv/nvidia-smi"})
    assert t.visible == ("0", "GPU-x") and Settings.from_dict(t.to_dict()) == t
    assert hash(t) == hash(Settings.from_dict(json.loads(json.dumps(t.to_dict()))))
    for bad in ({"mem_busy_mib": "x"}, {"mem_busy_mib": True}, {"visible": "0"}, {"lock_dir": ""}, []):
        with pytest.raises(SettingsError):
            Settings.from_dict(bad)


def test_the_client_makes_them_from_hosts_yaml(tmp_path):
    p = tmp_path / "hosts.yaml"
    p.write_text("hosts:\n  t:\n    ssh: u@h\n    gpus: [1, GPU-b]\n    mem_busy_mib: 7\n"
                 "    lock_dir: /x\n    nvidia_smi: /opt/smi\n  u:\n    ssh: u@h\n")
    cfg = config.parse(str(p))
    t = AgentClient(cfg.hosts["t"], transport=None).settings()
    assert t == {"mem_busy_mib": 7, "visible": ["1", "GPU-b"], "lock_dir": "/x", "nvidia_smi": "/opt/smi"}
    assert AgentClient(cfg.hosts["u"], transport=None).settings() == dict(DEFAULTS)


def _queued(con, home, settings, gpus=1):
    job_id = db.insert_job(con, {"name": "t", "command": "true", "gpus": gpus, "priority": 0,
                                 "retries": 0, "settings": settings.to_dict()})
    os.makedirs(home.job(job_id).work)
    return job_id


def test_each_job_is_placed_by_its_own_settings(tmp_path, monkeypatch):
    """Two jobs submitted with different `gpus:` (hosts.yaml edited between the submits): each
    gets a GPU its own settings allow, whatever the other's say."""
    home = paths.Home(str(tmp_path / "home")).ensure()
    con = home.open_db()
    lock_dir = str(tmp_path / "locks")
    units = [{"uuid": "GPU-0", "index": "0", "state": "free"}, {"uuid": "GPU-1", "index": "1", "state": "free"}]

    def read(settings, is_own=None):
        vis = settings.visible
        return [dict(u) for u in units if vis is None or u["index"] in vis or u["uuid"] in vis]

    d = daemon.Daemon(home, ["agent"])
    monkeypatch.setattr(scheduler.gpus, "read", read)
    started = {}

    def start(row, uuids, fds, lock_dir=None):
        started[row["id"]] = uuids
        for fd in fds:
            os.close(fd)
        con.execute("UPDATE jobs SET state='running' WHERE id=?", (row["id"],))

    d.start = start
    second_only = _queued(con, home, Settings(visible=("1",), lock_dir=lock_dir))
    anything = _queued(con, home, Settings(lock_dir=lock_dir))
    d.schedule()
    assert started == {second_only: ["GPU-1"], anything: ["GPU-0"]}
    row = db.get(con, second_only)
    assert Settings.from_dict(json.loads(row["settings"])).visible == ("1",)


def test_a_job_waits_under_its_own_lease_dir_problem(tmp_path):
    """An unsafe lease dir in a job's settings keeps that job waiting, saying why (CPU jobs run)."""
    home = paths.Home(str(tmp_path / "home")).ensure()
    con = home.open_db()
    bad = tmp_path / "bad"
    bad.mkdir()
    os.chmod(str(bad), 0o777)  # world-writable, not sticky: refused
    d = daemon.Daemon(home, ["agent"])
    d.start = lambda *a, **k: None
    job = _queued(con, home, Settings(lock_dir=str(bad)))
    d.schedule()
    msg = db.get(con, job)["message"]
    assert "not sticky" in msg and str(bad) in msg
    with pytest.raises(leases.LockDirError):
        leases.ensure_dir(str(bad))


def test_a_home_of_the_first_agents_is_migrated_in_place(tmp_path):
    home = paths.Home(str(tmp_path / "home")).ensure()
    old = sqlite3.connect(home.db)
    old.executescript("""
        CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, command TEXT NOT NULL,
            gpus_requested INTEGER NOT NULL DEFAULT 0, priority INTEGER NOT NULL DEFAULT 0,
            retries INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL,
            gpus TEXT NOT NULL DEFAULT '[]', exit_code INTEGER, signal TEXT, message TEXT NOT NULL DEFAULT '',
            submitted_at REAL NOT NULL, started_at REAL, ended_at REAL, wrapper_pid INTEGER,
            wrapper_start TEXT, pgid INTEGER, boot_id TEXT, git_commit TEXT, git_dirty INTEGER,
            env TEXT NOT NULL DEFAULT '{}', grace REAL NOT NULL DEFAULT 10,
            files INTEGER NOT NULL DEFAULT 0, bytes INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE tokens (token TEXT PRIMARY KEY, id INTEGER NOT NULL);
    """)
    old.execute("INSERT INTO jobs (name, command, state, submitted_at, pgid, env, exit_code) "
                "VALUES ('a', 'true', 'succeeded', ?, 5, '{}', 0)", (time.time(),))
    old.execute("INSERT INTO jobs (name, command, state, submitted_at, gpus_requested) "
                "VALUES ('b', 'sleep 1', 'queued', ?, 2)", (time.time(),))
    old.execute("INSERT INTO tokens VALUES ('tok', 2)")
    old.commit()
    old.close()
    with open(home.config, "w") as f:
        json.dump({"mem_busy_mib": 99, "visible": ["3"], "lock_dir": None, "nvidia_smi": "nvidia-smi"}, f)
    con = home.open_db()
    assert con.execute("PRAGMA user_version").fetchone()[0] == db.SCHEMA_VERSION
    cols = [r[1] for r in con.execute("PRAGMA table_info(jobs)")]
    assert "settings" in cols and "env" not in cols and "pgid" not in cols
    rows = con.execute("SELECT * FROM jobs ORDER BY id").fetchall()
    assert [(r["name"], r["state"], r["exit_code"]) for r in rows] == [("a", "succeeded", 0), ("b", "queued", None)]
    assert Settings.from_dict(json.loads(rows[1]["settings"])) == Settings(mem_busy_mib=99, visible=("3",))
    assert con.execute("SELECT id FROM tokens WHERE token='tok'").fetchone()[0] == 2
    # a new job after the migration gets the next id, and opening again changes nothing
    new = db.insert_job(con, {"name": "c", "command": "true", "gpus": 0, "priority": 0, "retries": 0})
    assert new == 3
    con.close()
    assert len(home.open_db().execute("SELECT * FROM jobs").fetchall()) == 3


def test_a_database_of_a_newer_agent_is_refused(tmp_path):
    home = paths.Home(str(tmp_path / "home")).ensure()
    con = sqlite3.connect(home.db)
    con.execute("PRAGMA user_version=%d" % (db.SCHEMA_VERSION + 1))
    con.close()
    with pytest.raises(db.SchemaError, match="newer rtrain agent"):
        home.open_db()
