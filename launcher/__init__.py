"""rtrain: a thin client that queues training jobs on GPU hosts.

Kept import-free on purpose: `rtrain --version` must not pull in paramiko or rich.
"""
from .agent.protocol import VERSION as __version__  # noqa: F401 - the one version string
