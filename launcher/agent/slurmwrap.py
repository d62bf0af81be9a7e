"""Slurm, the fixed scripts sbatch runs: the batch wrapper of every rtrain job, and the job of
`rtrain hosts` that checks the compute nodes see RTRAIN_HOME. No user text is ever spliced into
them; what a job runs comes from files in its folder (docs/contracts.md, "Slurm backend").
Standard library only, Python >= 3.8."""
import hashlib

# The batch script of every rtrain job on Slurm. sbatch copies it into the job at submit time.
# $1 is the job's folder (for an array: a folder of links named by task index to the jobs'
# folders). It runs the argv of the file `argv0` (NUL-separated, written by slurmjobs.prepare)
# in the job's work/, in a bash that first sources `env.sh` (the job's variables as `export
# NAME=...` lines that expand $VAR on the compute node: runtime.shell_assignment), so no
# variable of the job can change the wrapper's own. It writes start.json when it starts and
# exit.json (the format of runner.py's, plus a few keys) when the command ends. An exit status
# above 128 is recorded as the signal 128 - status (a command that exits with 137 on its own
# reads as killed by SIGKILL: bash reports both the same way). Slurm signals every process of
# the job on scancel, time limit and preemption; the traps let the wrapper outlive that signal
# to write the record. (A signal sent to the batch shell only, `--signal=B:USR1@60`, reaches the
# wrapper, not the command: it runs in the foreground so that it keeps SIGINT, which bash
# ignores in background jobs.) `read -d ''` rather than mapfile -d: bash 4.2 (EL7) has no -d.
WRAPPER = r"""#!/bin/bash
# rtrain: the batch wrapper of a job on Slurm (launcher/agent/slurmwrap.py).
d=$1
if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
  d=$1/$SLURM_ARRAY_TASK_ID
  real=$(cd -P "$d" 2>/dev/null && pwd) && d=$real
fi
now() { local t=${EPOCHREALTIME:-}; if [ -n "$t" ]; then echo "${t/,/.}"; else date +%s; fi; }
put() { printf '%s\n' "$2" > "$d/$1.tmp$$" && mv -f "$d/$1.tmp$$" "$d/$1"; }
node=${SLURMD_NODENAME:-$(hostname)}
case $node in *[!A-Za-z0-9._-]*) node= ;; esac
jid=${SLURM_JOB_ID:-}
[ -z "${SLURM_ARRAY_JOB_ID:-}" ] || jid=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID:-}
case $jid in *[!0-9_]*) jid= ;; esac
restarts=${SLURM_RESTART_COUNT:-0}
case $restarts in ''|*[!0-9]*) restarts=0 ;; esac
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-}
gpus=$CUDA_VISIBLE_DEVICES
case $gpus in *[!A-Za-z0-9,:_-]*) gpus= ;; esac
started=$(now)
rm -f "$d/exit.json"
info="\"node\": \"$node\", \"slurm_job_id\": \"$jid\", \"restarts\": $restarts, \"gpus\": \"$gpus\""
put start.json "{\"started_at\": $started, $info}"
terminated=false
trap 'terminated=true' TERM INT HUP
trap ':' USR1 USR2
argv=()
if [ -r "$d/argv0" ] && cd -P "$d/work"; then
  while IFS= read -r -d '' a; do argv+=("$a"); done < "$d/argv0"
fi
if [ ${#argv[@]} -gt 0 ]; then
  # (stderr of this group to /dev/null: bash's own "Killed" notice; the job's goes to fd 3)
  { /bin/bash -c '[ ! -e "$1" ] || . "$1" || exit 127; shift; exec "$@"' rtrain-job "$d/env.sh" \
      "${argv[@]}" 2>&3 3>&-; rc=$?; } 3>&2 2>/dev/null
else
  echo "rtrain: cannot start the job (its folder $d is not readable from $node)" >&2
  rc=127
fi
sig=null
if [ "$rc" -gt 128 ] && [ "$rc" -lt 193 ] && n=$(kill -l $((rc - 128)) 2>/dev/null); then
  sig="\"SIG$n\""
fi
cancelled=false
[ ! -e "$d/cancel" ] || cancelled=true
ended=$(now)
put exit.json "{\"exit_code\": $rc, \"signal\": $sig, \"ended_at\": $ended, \"cancelled\": $cancelled,\
 \"terminated\": $terminated, \"started_at\": $started, $info}"
exit $rc
"""
WRAPPER_HASH = hashlib.sha256(WRAPPER.encode()).hexdigest()[:16]
WRAPPER_NAME = "wrapper-%s.sh" % WRAPPER_HASH

# The job `rtrain hosts` runs to see that a compute node reads and writes RTRAIN_HOME: $1 is a
# fresh folder under it holding a random token; the job copies it to `seen` and names its node.
FSCHECK = r"""#!/bin/sh
# rtrain: does this compute node see RTRAIN_HOME? (launcher/agent/slurmcheck.py)
echo "${SLURMD_NODENAME:-$(hostname)}" > "$1/node.tmp" && mv -f "$1/node.tmp" "$1/node"
cat "$1/token" > "$1/seen.tmp" && mv -f "$1/seen.tmp" "$1/seen"
"""
FSCHECK_NAME = "fscheck-%s.sh" % hashlib.sha256(FSCHECK.encode()).hexdigest()[:16]
