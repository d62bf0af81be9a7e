"""Slurm, the pure part, in one namespace: the sbatch argv and Slurm's refusals (slurmcmd.py),
the batch wrapper (slurmwrap.py), the parsers of squeue, scontrol and sinfo (slurmparse.py), and
Slurm's states in rtrain's words (slurmstate.py). Nothing here runs a command or touches a file
(slurmjobs.py does); every function is pinned by tests/unit/test_slurm_outputs.py on real captures
(tests/fixtures/slurm/). The design: docs/contracts.md, "Slurm backend".

Job ids: a Slurm job is named by a string, "123" for a plain job and "123_4" for task 4 of
array job 123 (what squeue and scancel accept).
"""
from .slurmcmd import (OWNED_OPTIONS, SETTINGS, SINFO_ARGV, SQUEUE_TEXT_FORMAT, owned_option,
                       parse_sbatch, parse_scancel, sbatch_argv, scancel_argv, slurm_error,
                       squeue_json_argv, squeue_text_argv)
from .slurmparse import (expand_tasks, gpu_counts, job_from_scontrol, node_usable, parse_scontrol,
                         parse_sinfo_gres, parse_squeue_json, parse_squeue_text, pick, split_gres)
from .slurmstate import ENDED, FAILURES, STATES, job_view, map_state, split_status
from .slurmwrap import FSCHECK, FSCHECK_NAME, WRAPPER, WRAPPER_HASH, WRAPPER_NAME

__all__ = [
    "OWNED_OPTIONS", "SETTINGS", "SINFO_ARGV", "SQUEUE_TEXT_FORMAT", "owned_option", "parse_sbatch",
    "parse_scancel", "sbatch_argv", "scancel_argv", "slurm_error", "squeue_json_argv",
    "squeue_text_argv", "expand_tasks", "gpu_counts", "job_from_scontrol", "node_usable",
    "parse_scontrol", "parse_sinfo_gres", "parse_squeue_json", "parse_squeue_text", "pick",
    "split_gres", "ENDED", "FAILURES", "STATES", "job_view", "map_state", "split_status",
    "FSCHECK", "FSCHECK_NAME", "WRAPPER", "WRAPPER_HASH", "WRAPPER_NAME"]
