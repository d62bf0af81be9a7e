"""interactive.py: the URL a web server job prints is found in its log, whatever the server."""
from launcher import interactive


def test_the_urls_servers_print():
    for line, port, path in (
            ("[I 2026-11-29 ServerApp] http://127.0.0.1:8888/lab?token=ab12", "8888", "/lab?token=ab12"),
            ("TensorBoard 2.17.0 at http://localhost:6006/ (Press CTRL+C to quit)", "6006", "/"),
            ("Serving HTTP on 0.0.0.0 port 8000 (http://0.0.0.0:8000/) ...", "8000", "/")):
        m = interactive.URL.search(line)
        assert m and m.group(2) == port and m.group(3) == path, line
    assert interactive.URL.search("no url here, port 80") is None


def test_tensorboard_reads_the_jobs_work_dir():
    argv = interactive.tensorboard_argv({"work_dir": "/home/a/.rtrain/jobs/7/work"})
    assert argv[:3] == ["python3", "-m", "tensorboard.main"]
    assert argv[argv.index("--logdir") + 1] == "/home/a/.rtrain/jobs/7/work" and "127.0.0.1" in argv
