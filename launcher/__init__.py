"""rtrain: a thin client that queues training jobs on GPU hosts.

Kept import-free on purpose: `rtrain --version` must not pull in paramiko or rich.
"""
__version__ = "0.1.0"
