"""Drives the agent's Slurm functions (launcher/agent/slurmjobs.py) the way the agent will: on the
login node, as the user, with `python3 -S`, from the shipped zipapp. Used by the Slurm tests and
bench/slurm.py over ssh (and by tests/fixtures/slurm/capture.py).

    python3 -S slurm_driver.py AGENT_PATH PACKAGE < request.json

AGENT_PATH goes first on sys.path (the zipapp, or the repo root), PACKAGE is rtrain_agent (the
zipapp) or launcher.agent (a checkout). The request: {"home": HOME, "calls": [[fn, {args}], ...]};
the reply: one JSON line {"results": [...]} where each result is {"ok": value} or {"error":
{"code", "message"}}. fn is one of the functions below.
"""
import importlib
import json
import os
import sys
import time


def main():
    sys.path.insert(0, sys.argv[1])
    pkg = sys.argv[2]
    paths = importlib.import_module(pkg + ".paths")
    slurmjobs = importlib.import_module(pkg + ".slurmjobs")
    protocol = importlib.import_module(pkg + ".protocol")
    req = json.loads(sys.stdin.read())
    home = paths.Home(paths.resolve_home(req["home"])).ensure()

    def make_jobs(ids, files=None):
        """Job folders as the agent builds them before a submit: jobs/N/work/ with files."""
        for i in ids:
            work = home.job(i).work
            os.makedirs(work, mode=0o700, exist_ok=True)
            for name, text in (files or {}).items():
                with open(os.path.join(work, name), "w") as f:
                    f.write(text)
        return ids

    def submit(jobs, options, mode=None):
        return slurmjobs.submit(home, jobs, options)

    def status(ids, mode="auto"):
        t = time.time()
        views = slurmjobs.status(home, ids, mode=mode)
        return {"views": {str(k): v for k, v in views.items()}, "seconds": time.time() - t}

    def wait(ids, timeout=60, mode="auto", states=("succeeded", "failed", "cancelled", "lost",
                                                   "preempted")):
        deadline = time.time() + timeout
        polls = 0
        while True:
            views = slurmjobs.status(home, ids, mode=mode)
            polls += 1
            if all(v["state"] in states for v in views.values()) or time.time() > deadline:
                return {"views": {str(k): v for k, v in views.items()}, "polls": polls}
            time.sleep(0.1)

    def files(ids, names=("log", "exit.json", "start.json")):
        out = {}
        for i in ids:
            d = home.job(i).dir
            out[str(i)] = {}
            for n in names:
                try:
                    with open(os.path.join(d, n), "rb") as f:
                        out[str(i)][n] = f.read().decode("utf-8", "replace")
                except OSError:
                    out[str(i)][n] = None
        return out

    fns = {"make_jobs": make_jobs, "submit": submit, "status": status, "wait": wait,
           "files": files,
           "cancel": lambda ids: {str(k): v for k, v in slurmjobs.cancel(home, ids).items()},
           "gpus": lambda: slurmjobs.gpus(),
           "show_job": lambda sid: slurmjobs.show_job(sid),
           "query": lambda sids, mode="auto": slurmjobs.query(home, sids, mode=mode),
           "sleep": lambda s: time.sleep(s)}
    results = []
    for fn, args in req["calls"]:
        try:
            results.append({"ok": fns[fn](**args)})
        except protocol.AgentError as e:
            results.append({"error": {"code": e.code, "message": e.message}})
    sys.stdout.write(json.dumps({"results": results}) + "\n")


if __name__ == "__main__":
    main()
