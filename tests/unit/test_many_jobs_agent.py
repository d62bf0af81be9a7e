"""The agent's side of many runs (docs/design.md "Many runs"): schema 2 and its migration, one
submit that queues a group with one snapshot, dependencies cancelled transitively, a group's
limit on jobs running at once, usage from the job records."""
import hashlib
import io
import json
import os
import sqlite3
import time

import pytest

from launcher.agent import db, deps, gates, paths
from launcher.agent.verbs import submit as submit_verb, usage as usage_verb
from launcher.agent.protocol import AgentError
from launcher.agent.verbs.context import Context

V1_COLUMNS = db.COLUMNS  # version 1's table is the base of version 2 (V2_COLUMNS are added)


def test_a_version_1_home_is_migrated_in_place_and_keeps_its_jobs(tmp_path):
    path = str(tmp_path / "jobs.sqlite")
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("CREATE TABLE jobs (%s)" % V1_COLUMNS)
    con.execute("CREATE TABLE tokens (token TEXT PRIMARY KEY, id INTEGER NOT NULL)")
    con.execute("INSERT INTO jobs (name, command, state, submitted_at, settings, gpus_requested) "
                "VALUES ('t', 'true', 'queued', 1.0, '{\"mem_busy_mib\": 7}', 2)")
    con.execute("PRAGMA user_version=1")
    con.close()
    con = db.connect(path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == db.SCHEMA_VERSION == 2
    row = db.get(con, 1)
    assert json.loads(row["settings"]) == {"mem_busy_mib": 7}  # kept, not the legacy file's
    assert row["share"] == 1 and row["grp"] is None and row["gpus_requested"] == 2
    pub = db.to_public(row)
    assert pub["group"] is None and pub["share"] == 1 and pub["cause"] is None
    for table in ("job_groups", "deps"):
        con.execute("SELECT * FROM %s" % table).fetchall()
    job = db.insert_job(con, {"name": "u", "command": "true", "gpus": 1, "priority": 0, "retries": 0,
                              "share": 2, "project": "p"})
    assert job == 2 and db.get(con, 2)["share"] == 2
    con.close()
    db.connect(path).close()  # opening again changes nothing


# ------------------------------------------------------------------ one submit, many jobs

def _request(home, **extra):
    data = b"print('hi')\n"
    h = hashlib.sha256(data).hexdigest()
    req = {"protocol": 1, "home": home, "command": "python3 t.py --lr {lr}", "upload": True,
           "token": "ab" * 8, "env": {"BASE": "1"},
           "manifest": {"entries": [{"path": "t.py", "type": "file", "hash": h, "size": len(data),
                                     "exec": False}], "git": None}}
    req.update(extra)
    return req, data, h


def _submit(req, blobs=b""):
    r, w = os.pipe()
    os.write(w, blobs)
    ctx = Context(req, os.fdopen(r, "rb"), io.StringIO(), ["agent"])
    ctx.poke = lambda: None
    try:
        return ctx, submit_verb.submit(ctx)
    finally:
        os.close(w)


def test_a_sweep_is_one_submit_one_snapshot_and_one_group(tmp_path):
    home = str(tmp_path / "home")
    points = [{"command": "python3 t.py --lr %s" % v, "env": {"RTRAIN_SWEEP_LR": v}, "suffix": " lr=%s" % v}
              for v in ("1e-3", "3e-4", "1e-4")]
    req, data, h = _request(home, points=points, group={"kind": "sweep", "label": "lr(3)"})
    ctx, res = _submit(req, b"%s %d\n%s" % (h.encode(), len(data), data) + b"END\n")
    assert json.loads(ctx.out.getvalue().splitlines()[0]) == {"missing": [h]}  # asked for once
    hm = paths.Home(home)
    con = db.connect(hm.db)
    rows = con.execute("SELECT * FROM jobs ORDER BY id").fetchall()
    assert [r["name"] for r in rows] == ["t.py lr=1e-3", "t.py lr=3e-4", "t.py lr=1e-4"]
    assert [r["command"] for r in rows] == [p["command"] for p in points]
    assert {r["grp"] for r in rows} == {1} and res["job"]["group"] == 1
    g = con.execute("SELECT * FROM job_groups").fetchone()
    assert (g["size"], g["kind"], g["label"]) == (3, "sweep", "lr(3)")
    inodes = {os.stat(hm.job(r["id"]).manifest).st_ino for r in rows}
    assert len(inodes) == 1  # the snapshot's manifest is written once, linked into each job
    for r, p in zip(rows, points):
        assert json.load(open(hm.job(r["id"]).env)) == {"BASE": "1"}  # --env's: one 0600 file, linked
        assert os.stat(hm.job(r["id"]).env).st_mode & 0o077 == 0
        assert json.loads(r["vars"]) == {"RTRAIN_SWEEP_LR": p["env"]["RTRAIN_SWEEP_LR"]}  # the point's
    assert len({os.stat(hm.job(r["id"]).env).st_ino for r in rows}) == 1
    assert os.listdir(hm.tmp) == []
    # the same token again: the group already queued, nothing more
    _, again = _submit(_request(home, points=points)[0])
    assert again["duplicate"] and con.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 3


@pytest.mark.parametrize("extra, code", [
    ({"after": [42]}, "no_such_job"), ({"after_any": ["g9"]}, "no_such_job"),
    ({"after": ["x"]}, "bad_request"), ({"points": []}, "bad_request"),
    ({"points": [{"command": ""}]}, "bad_request"), ({"gpus": 0.3}, "bad_request"),
    ({"gpus": 1.5}, "bad_request"), ({"points": [{"command": "x"}], "group": {"max_running": 0}}, "bad_request"),
])
def test_what_a_submit_of_many_cannot_ask_is_refused_before_any_blob(tmp_path, extra, code):
    home = str(tmp_path / "home")
    req, _, _ = _request(home, **extra)
    with pytest.raises(AgentError) as e:
        _submit(req)
    assert e.value.code == code
    assert os.listdir(paths.Home(home).jobs) == []


def test_gpu_shares_are_one_over_k():
    from launcher.agent import batch
    assert batch.gpus(2) == (2, 1) and batch.gpus(0) == (0, 1)
    assert batch.gpus(0.5) == (1, 2) and batch.gpus(0.33) == (1, 3) and batch.gpus(0.25) == (1, 4)
    for bad in (0.4, 0.7, -1, "x", True):
        with pytest.raises(AgentError):
            batch.gpus(bad)


# ------------------------------------------------------------------ dependencies, limits

def _home(tmp_path):
    h = paths.Home(str(tmp_path / "home")).ensure()
    return h, db.connect(h.db)


def _job(con, home, state="queued", group=None, **kw):
    job_id = db.insert_job(con, dict({"name": "t", "command": "true", "gpus": 0, "priority": 0,
                                      "retries": 0, "group": group}, **kw))
    os.makedirs(home.job(job_id).dir)
    con.execute("UPDATE jobs SET state=? WHERE id=?", (state, job_id))
    return job_id


def test_a_failed_dependency_cancels_its_dependents_transitively_naming_the_first(tmp_path):
    home, con = _home(tmp_path)
    a = _job(con, home, "succeeded")
    b = _job(con, home, "running")
    c = _job(con, home)
    d = _job(con, home)
    e = _job(con, home)
    deps.link(con, [b], [a], [])
    deps.link(con, [c], [b], [])
    deps.link(con, [d], [], [b])   # after-any: runs whatever b's end
    deps.link(con, [e], [c], [])   # c's dependent: cancelled once c is
    assert deps.verdict(deps.pending(con)[c]) == ("wait", b, "running")
    assert deps.cascade(con, home) == []
    con.execute("UPDATE jobs SET state='failed' WHERE id=?", (b,))
    assert sorted(deps.cascade(con, home)) == [c, e]
    for j in (c, e):
        row = db.get(con, j)
        assert row["state"] == "cancelled" and row["cause"] == b
        assert row["message"] == "dependency {cause} failed"  # the client writes b's id in
        assert "dependency %d failed" % b in open(home.job(j).log).read()
    assert db.get(con, d)["state"] == "queued" and deps.verdict(deps.pending(con)[d]) is None
    with pytest.raises(AgentError) as err:  # an after-ok on a failed job can never start
        deps.check(con, [b], [])
    assert err.value.code == "dependency_failed"
    assert deps.resolve(con, [a, str(b), a]) == [a, b]


def test_a_group_dependency_is_every_job_of_the_group(tmp_path):
    from launcher.agent import groups
    home, con = _home(tmp_path)
    gid = groups.create(con, "t", "array", "3", 3)
    members = [_job(con, home, "succeeded", group=gid) for _ in range(3)]
    assert deps.resolve(con, ["g%d" % gid]) == members


def test_a_group_limit_lets_that_many_through_per_pass(tmp_path):
    from launcher.agent import groups
    home, con = _home(tmp_path)
    gid = groups.create(con, "t", "array", "0-9%3", 10, max_running=3)
    ids = [_job(con, home, group=gid) for _ in range(10)]
    con.execute("UPDATE jobs SET state='running' WHERE id=?", (ids[0],))
    g = gates.Gates(con, home)
    g.begin_pass()
    through = [i for i in ids[1:] if g.hold(db.get(con, i)) is None]
    assert through == ids[1:3]  # one runs already: two more
    assert "at most 3 at once" in db.get(con, ids[5])["message"]
    other = _job(con, home)
    assert g.hold(db.get(con, other)) is None  # a job of no group is not held


def test_usage_counts_gpu_hours_in_the_window_and_shares_by_their_fraction(tmp_path):
    home, con = _home(tmp_path)
    now = time.time()
    for gpus, share, start, end, project in ((["g0", "g1"], 1, now - 7200, now - 3600, "a"),
                                             (["g2"], 2, now - 3600, None, "a"),
                                             (["g3"], 1, now - 10 * 86400, now - 9 * 86400, "b")):
        j = _job(con, home, "succeeded" if end else "running", share=share, project=project)
        con.execute("UPDATE jobs SET gpus=?, started_at=?, ended_at=? WHERE id=?",
                    (json.dumps(gpus), start, end, j))
    ctx = Context({"home": home.root, "since": now - 86400}, io.BytesIO(), io.StringIO(), ["agent"])
    res = usage_verb.usage(ctx)
    (a,) = res["projects"]
    assert a["project"] == "a" and a["jobs"] == 2 and a["running"] == 1
    assert abs(a["gpu_hours"] - (2.0 + 0.5)) < 0.01
