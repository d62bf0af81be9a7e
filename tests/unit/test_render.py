"""render.py: user text (job names, commands, host errors) is printed as written, never
parsed as markup; piped output is never wrapped."""
import pytest

from launcher import render
from launcher.errors import HostError

MARKUP = ["[/]", "[red]red?[/red]", "a\\", "[bold", "x]", "back\\[/]", "[link=file:///etc]y[/link]"]


def _job(**kw):
    j = {"id": "7", "name": "n", "host": "local", "state": "failed", "gpus": [], "exit_code": 3,
         "signal": None, "submitted_at": 1.0e9, "started_at": 1.0e9, "ended_at": 1.0e9 + 5,
         "command": "c", "message": None, "gpus_requested": 0, "retries": 0, "attempts": 1,
         "git_commit": None, "git_dirty": None, "log": "/l", "work_dir": "/w"}
    j.update(kw)
    return j


@pytest.mark.parametrize("text", MARKUP)
def test_render_prints_user_text_as_written(text, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    job = _job(name=text, command="echo %s" % text, message=text, host="h%s" % text)
    render.job_table([job])
    render.job_detail(job)
    render.gpu_table([
        ("g%s" % text, {"gpus": [{"index": 0, "name": "GPU %s" % text, "uuid": "GPU-%s" % text,
                                  "state": "busy", "holder": "job %s" % text, "memory_used": 1,
                                  "memory_total": 2, "utilization": 0}]}, None),
        ("e%s" % text, None, HostError("e%s" % text, "down %s" % text, "fix %s" % text))])
    render.doctor([("d%s" % text, [{"name": "python", "ok": False, "detail": "old %s" % text,
                                    "fix": "use %s" % text}])])
    out = capsys.readouterr().out
    for want in ("h" + text, "echo " + text, "failed - " + text, "GPU " + text, "GPU-" + text,
                 "job " + text, "down " + text, "fix " + text, "d" + text, "old " + text, "use " + text):
        assert want in out, (want, out)


def test_host_errors_keep_their_hint(capsys):
    render.host_errors([("h", HostError("h", "down", "try this"))])
    assert capsys.readouterr().err == "rtrain: error: h: down\n  hint: try this\n"


def test_a_jobs_gpu_hours_and_cost(capsys):
    from launcher import app
    job = _job(gpus=["GPU-a", "GPU-b"], started_at=1000.0, ended_at=1000.0 + 5400)
    assert app.gpu_hours(job) == 3.0
    job.update(gpu_hours=3.0, cost=7.47)
    render.job_detail(job)
    assert "gpu-hours  3.00, cost 7.47" in capsys.readouterr().out
