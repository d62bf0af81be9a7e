"""agent/notify.py: what a webhook gets in each format, and the sender: queued events go out,
a failing URL is retried with backoff and said once, and an event is dropped after RETRY_FOR_S."""
import json
import os
import time

import pytest

from launcher.agent import db, notify, paths


def _home(tmp_path):
    return paths.Home(str(tmp_path / "home")).ensure()


def _ended_job(home, con, notify_cfg, state="failed", exit_code=3, log=b"epoch 1\nTraceback: boom\n"):
    job_id = db.insert_job(con, {"name": "train.py", "command": "python3 train.py", "gpus": 1, "priority": 0,
                                 "retries": 0})
    os.makedirs(home.job(job_id).dir)
    with open(home.job(job_id).log, "wb") as f:
        f.write(log)
    if notify_cfg is not None:
        with open(home.job(job_id).notify, "w") as f:
            json.dump(notify.check(notify_cfg), f)
    con.execute("UPDATE jobs SET state=?, exit_code=?, started_at=?, ended_at=? WHERE id=?",
                (state, exit_code, time.time() - 65, time.time(), job_id))
    return db.get(con, job_id)


def test_check_refuses_what_it_cannot_send():
    assert notify.check({"url": "https://hooks.example/x"}) == {
        "url": "https://hooks.example/x", "format": "json", "on": list(notify.DEFAULT_ON), "host": ""}
    for bad in ({"url": "ftp://x"}, {"url": "https://x", "format": "teams"}, {"url": "https://x", "on": ["done"]},
                {"url": "https://x", "on": []}, "https://x"):
        with pytest.raises(notify.NotifyError):
            notify.check(bad)


def test_bodies_in_each_format(tmp_path):
    home = _home(tmp_path)
    con = home.open_db()
    row = _ended_job(home, con, None)
    ev = notify.event(home, row)
    assert ev["job"] == row["id"] and ev["state"] == "failed" and ev["exit_code"] == 3
    assert ev["log_tail"] == "epoch 1\nTraceback: boom" and 60 <= ev["duration_s"] <= 70
    data, headers = notify.body("json", ev, "tower")
    d = json.loads(data)
    assert d["host"] == "tower" and d["name"] == "train.py" and d["log_tail"].endswith("boom")
    assert d["summary"] == "rtrain job %d train.py on tower failed (exit code 3)" % row["id"]
    assert headers["Content-Type"] == "application/json"
    slack = json.loads(notify.body("slack", ev, "tower")[0])
    assert list(slack) == ["text"] and slack["text"].startswith(d["summary"]) and "```" in slack["text"]
    discord = json.loads(notify.body("discord", ev, "tower")[0])
    assert list(discord) == ["content"] and "Traceback: boom" in discord["content"]
    data, headers = notify.body("ntfy", ev, "tower")
    assert data.decode().startswith(d["summary"]) and headers["Priority"] == "high" and headers["Tags"] == "x"


def test_events_only_for_the_states_asked(tmp_path, monkeypatch):
    home = _home(tmp_path)
    con = home.open_db()
    started = []
    monkeypatch.setattr(notify, "start_sender", lambda h, argv=None: started.append(h.root))
    quiet = _ended_job(home, con, {"url": "http://127.0.0.1:9/x", "on": ["failed"]}, state="succeeded", exit_code=0)
    assert notify.job_event(home, quiet) is False
    loud = _ended_job(home, con, {"url": "http://127.0.0.1:9/x", "on": ["failed"]})
    assert notify.job_event(home, loud) is True and started == [home.root]
    assert notify.job_event(home, _ended_job(home, con, None)) is False  # asked for nothing
    (queued,) = os.listdir(os.path.join(home.root, "notify"))
    assert os.stat(os.path.join(home.root, "notify", queued)).st_mode & 0o777 == 0o600


def test_the_sender_retries_with_backoff_and_says_a_failure_once(tmp_path, monkeypatch):
    home = _home(tmp_path)
    con = home.open_db()
    monkeypatch.setattr(notify, "start_sender", lambda h, argv=None: None)
    for _ in range(2):
        notify.job_event(home, _ended_job(home, con, {"url": "https://hooks.example/T0KEN", "format": "slack"}))
    clock = [1000.0]
    answers = [500, 500, 200, 200]
    posts, said, slept = [], [], []

    def post(url, data, headers):
        posts.append((url, json.loads(data)["text"]))
        return answers.pop(0)

    def sleep(s):
        slept.append(s)
        clock[0] += s

    for item in os.listdir(os.path.join(home.root, "notify")):  # queued "now"
        p = os.path.join(home.root, "notify", item)
        rec = json.load(open(p))
        rec["first"] = clock[0]
        json.dump(rec, open(p, "w"))
    assert notify.deliver(home, post=post, sleep=sleep, now=lambda: clock[0], say=said.append) == 2
    assert len(posts) == 4 and all(u == "https://hooks.example/T0KEN" for u, _ in posts)
    assert len(said) == 1 and "HTTP 500" in said[0] and "T0KEN" not in said[0]  # once, token hidden
    assert slept and all(s <= 60 for s in slept)
    assert os.listdir(os.path.join(home.root, "notify")) == []


def test_the_sender_gives_up_after_its_window(tmp_path, monkeypatch):
    home = _home(tmp_path)
    con = home.open_db()
    monkeypatch.setattr(notify, "start_sender", lambda h, argv=None: None)
    notify.job_event(home, _ended_job(home, con, {"url": "http://127.0.0.1:9/hook"}))
    clock = [time.time()]
    said = []

    def post(url, data, headers):
        raise OSError("connection refused")

    def sleep(s):
        clock[0] += s

    assert notify.deliver(home, post=post, sleep=sleep, now=lambda: clock[0], say=said.append) == 0
    assert os.listdir(os.path.join(home.root, "notify")) == []
    assert any("gave up" in s for s in said) and clock[0] - time.time() >= notify.RETRY_FOR_S
