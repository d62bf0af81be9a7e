"""The agent needs nothing but the standard library: run every verb from the shipped zipapp
under `python3 -I -S` (no site-packages at all) and check what got imported."""
import json
import subprocess
import sys
import textwrap

from launcher import agentpkg

PROBE = textwrap.dedent("""
    import io, json, sys
    pyz = sys.argv[1]
    sys.path.insert(0, pyz)
    from rtrain_agent import verbs
    from rtrain_agent.main import main
    out = []
    for verb, req in json.loads(sys.argv[2]):
        sys.argv = [pyz, verb]
        sys.stdin = io.TextIOWrapper(io.BytesIO((json.dumps(req) + "\\n").encode()))
        buf = io.StringIO()
        sys.stdout = buf
        try:
            main()
        except SystemExit:
            pass
        sys.stdout = sys.__stdout__
        out.append(buf.getvalue())
    stdlib = set(sys.stdlib_module_names) if hasattr(sys, "stdlib_module_names") else None
    bad = sorted(m for m in sys.modules
                 if stdlib is not None and m.split(".")[0] not in stdlib
                 and not m.startswith("rtrain_agent") and m != "__main__")
    print(json.dumps({"replies": out, "foreign": bad}))
""")


def test_every_verb_runs_with_the_stdlib_only(tmp_path):
    blob, digest = agentpkg.build()
    pyz = tmp_path / ("agent-%s.pyz" % digest[:16])
    pyz.write_bytes(blob)
    home = str(tmp_path / "home")
    reqs = [
        ["hello", {"home": home}],
        ["gpus", {"home": home, "settings": {"nvidia_smi": "definitely-not-here"}}],
        ["status", {"home": home}],
        ["submit", {"home": home, "command": "true", "gpus": 0, "manifest": {"entries": []},
                    "settings": {"nvidia_smi": "definitely-not-here", "lock_dir": str(tmp_path / "l")}}],
        ["logs", {"home": home, "id": 1}],
        ["cancel", {"home": home, "id": 1}],
    ]
    env = {"PATH": "/usr/bin:/bin", "RTRAIN_DAEMON_IDLE_S": "1"}
    p = subprocess.run([sys.executable, "-I", "-S", "-c", PROBE, str(pyz), json.dumps(reqs)],
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["foreign"] == []
    replies = [json.loads(r.strip().splitlines()[-1]) for r in res["replies"]]
    assert all(r["protocol"] == 1 for r in replies)
    assert all(r["ok"] for r in replies), replies
    assert replies[1]["result"]["nvidia_smi_found"] is False


def test_zipapp_is_deterministic():
    agentpkg._cache.clear()
    a = agentpkg.build()
    agentpkg._cache.clear()
    assert agentpkg.build() == a
