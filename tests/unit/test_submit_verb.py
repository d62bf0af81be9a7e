"""The agent's submit verb (docs/design.md "Atomic submit"): a job appears only while its client
is still there, never half made, and its work dir is left to the daemon."""
import hashlib
import io
import json
import os

import pytest

from launcher.agent import db, paths, store
from launcher.agent.verbs import submit as submit_verb
from launcher.agent.verbs.context import Context
from launcher.agent.protocol import AgentError


def _request(home, data=b"print('hi')\n"):
    h = hashlib.sha256(data).hexdigest()
    store.Store(os.path.join(home, "store")).receive(
        io.BytesIO(b"%s %d\n%s" % (h.encode(), len(data), data) + b"END\n"))
    return {"protocol": 1, "home": home, "command": "python3 t.py", "upload": True, "token": "t1",
            "manifest": {"entries": [{"path": "t.py", "type": "file", "hash": h, "size": len(data),
                                      "exec": False}], "git": None}}


def _submit(req, client_stays):
    r, w = os.pipe()
    if not client_stays:
        os.close(w)  # the connection was cut: sshd closed the agent's stdin
    ctx = Context(req, os.fdopen(r, "rb"), io.StringIO(), ["agent"])
    ctx.poke = lambda: None
    try:
        return ctx, submit_verb.submit(ctx)
    finally:
        if client_stays:
            os.close(w)


def test_no_job_when_the_client_went_away(tmp_path):
    home = str(tmp_path / "home")
    req = _request(home)
    with pytest.raises(AgentError) as e:
        _submit(req, client_stays=False)
    assert e.value.code == "client_gone"
    h = paths.Home(home)
    assert db.connect(h.db).execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 0
    assert os.listdir(h.tmp) == [] and os.listdir(h.jobs) == []


def test_a_job_is_queued_with_its_manifest_and_no_work_dir_yet(tmp_path):
    home = str(tmp_path / "home")
    ctx, res = _submit(_request(home), client_stays=True)
    job = res["job"]
    assert job["state"] == "queued" and job["files"] == 1 and not res["duplicate"]
    h = paths.Home(home)
    assert sorted(os.listdir(h.job(job["id"]).dir)) == ["env.json", "log", "manifest.json"]
    with open(os.path.join(h.job(job["id"]).dir, "manifest.json")) as f:
        assert [e["path"] for e in json.load(f)["entries"]] == ["t.py"]
    assert os.listdir(h.tmp) == []
    # the same request again (a client retrying after a lost reply) is the same job
    _, again = _submit(_request(home), client_stays=True)
    assert again["duplicate"] and again["job"]["id"] == job["id"]


@pytest.mark.parametrize("entries", [
    [{"path": "../x", "type": "file", "hash": "0" * 64, "size": 1}],
    [{"path": "a", "type": "symlink", "target": "/etc/passwd"}],
    [{"path": "a", "type": "file", "hash": "0" * 64, "size": 1},
     {"path": "a/b", "type": "file", "hash": "0" * 64, "size": 1}],
])
def test_a_bad_manifest_is_refused_at_submit(tmp_path, entries):
    home = str(tmp_path / "home")
    req = _request(home)
    req["manifest"]["entries"] = entries
    with pytest.raises(AgentError) as e:
        _submit(req, client_stays=True)
    assert e.value.code == "bad_manifest"
    assert os.listdir(paths.Home(home).jobs) == []


def test_env_values_stay_out_of_the_job_database(tmp_path):
    """--env values may be secrets (docs/design.md): they live in the job's 0600 env.json."""
    home = str(tmp_path / "home")
    req = _request(home)
    req["env"] = {"WANDB_API_KEY": "s3cr3t-value"}
    _, res = _submit(req, client_stays=True)
    h = paths.Home(home)
    env_file = h.job(res["job"]["id"]).env
    assert oct(os.stat(env_file).st_mode & 0o777) == "0o600"
    with open(env_file) as f:
        assert json.load(f) == {"WANDB_API_KEY": "s3cr3t-value"}
    for name in os.listdir(home):
        if name.startswith("jobs.sqlite"):
            with open(os.path.join(home, name), "rb") as f:
                assert b"s3cr3t-value" not in f.read(), name
