"""Shared by the tests: where things are, and skip-locally-but-fail-in-CI."""
import json
import os
import signal
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def in_ci():
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(condition, reason):
    """Skip locally when a real part can't be started; fail in CI, where it must be there."""
    if not condition:
        if in_ci():
            pytest.fail("CI=true but " + reason)
        pytest.skip(reason)


def stop_agent(home):
    """SIGKILL, by pid, the daemon and every job process of the agent whose RTRAIN_HOME is
    `home` (a Path): what a test leaves running."""
    targets = []
    try:
        targets.append((int((home / "daemon.lock").read_text().strip()), False))
    except (OSError, ValueError):
        pass
    for f in home.glob("jobs/*/pid.json"):
        try:
            info = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        targets += [(info.get("pgid"), True), (info.get("wrapper_pid"), False)]
    for pid, group in targets:
        try:
            (os.killpg if group else os.kill)(pid, signal.SIGKILL)
        except (OSError, TypeError):
            pass
