"""Shared by the tests: where things are, and skip-locally-but-fail-in-CI."""
import os
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
