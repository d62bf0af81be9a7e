"""A Slurm cluster as a host (`scheduler: slurm` in hosts.yaml): its keys, checked on the laptop
by the agent's own rules (agent/slurmcmd.py), the Slurm settings every request to it carries
(agentclient: "slurm"), what `rtrain hosts` says of its login node, and its GPUs for placement.
docs/design.md "Backends"."""

KEYS = {
    "scheduler": "who runs the jobs: rtrain (its own scheduler on the host, the default) or slurm "
                 "(the host is a cluster's login node; `home` must be on a file system the compute "
                 "nodes share)",
    "partition": "Slurm: the partition of the jobs (sbatch --partition)",
    "account": "Slurm: the account the jobs are charged to",
    "qos": "Slurm: the quality of service of the jobs",
    "time": "Slurm: each job's time limit, as sbatch takes it (90, 4:00:00, 1-00:00:00)",
    "mem": "Slurm: memory per node (sbatch --mem: 32G)",
    "cpus_per_gpu": "Slurm: CPUs per GPU (sbatch --cpus-per-gpu)",
    "constraint": "Slurm: node features the jobs need (sbatch --constraint)",
    "sbatch_args": "Slurm: more sbatch options, a list (['--exclusive']); those rtrain sets itself "
                   "(--output, --chdir, --array, --dependency...) are refused",
    "squeue_format": "Slurm: how status asks squeue: auto (--json where it works), json, or text "
                     "(much faster on a large Slurm 22.05 cluster, whose --json lists every job)",
    "gpu_option": "Slurm: how GPUs are asked for: gres (--gres=gpu:N, the default), gpus, "
                  "gpus-per-node",
    "gpu_type": "Slurm: the GPU type to ask for (--gres=gpu:TYPE:N)",
    "container_engine": "the container tool of container jobs: docker or podman on a tower; "
                        "pyxis, apptainer or singularity on a Slurm cluster",
}
SLURM_ONLY = tuple(k for k in KEYS if k not in ("scheduler", "container_engine"))
ENGINES = ("pyxis", "apptainer", "singularity")
NOT_ON_SLURM = {"autostop": "rtrain does not stop a cluster", "stall_after": "Slurm owns the GPUs",
                "gpus": "Slurm hands out the GPUs"}


def parse(data, bad, kw):
    """hosts.yaml's Slurm keys of one host into kw["slurm"] (None: not a Slurm host).
    bad(key, what) raises the config error that names the file and line."""
    scheduler = data.get("scheduler", "rtrain")
    if scheduler not in ("rtrain", "slurm"):
        bad("scheduler", "rtrain or slurm")
    if scheduler != "slurm":
        for key in SLURM_ONLY:
            if key in data:
                bad(key, "set only on a host with `scheduler: slurm`")
        return
    for key, why in NOT_ON_SLURM.items():
        if key in data:
            bad(key, "left out on a Slurm host (%s)" % why)
    s = {}
    for key in ("partition", "account", "qos", "constraint", "gpu_type"):
        if key in data:
            if not isinstance(data[key], str) or not data[key].strip():
                bad(key, "a non-empty string")
            s[key] = data[key]
    for key in ("time", "mem"):
        if key in data:
            v = data[key]
            if isinstance(v, bool) or not isinstance(v, (str, int)) or not str(v).strip():
                bad(key, "a %s as sbatch takes it" % ("time" if key == "time" else "size"))
            s[key] = str(v)
    if "cpus_per_gpu" in data:
        v = data["cpus_per_gpu"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            bad("cpus_per_gpu", "a whole number, 1 or more")
        s["cpus_per_gpu"] = v
    if "sbatch_args" in data:
        s["sbatch_args"] = _sbatch_args(data["sbatch_args"], bad)
    for key, allowed in (("squeue_format", ("auto", "json", "text")),
                         ("gpu_option", ("gres", "gpus", "gpus-per-node")),
                         ("container_engine", ENGINES)):
        if key in data:
            if data[key] not in allowed:
                bad(key, " or ".join(allowed))
            s[key] = data[key]
    kw["slurm"] = s


def _sbatch_args(v, bad):
    from .agent.slurmcmd import owned_option
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        bad("sbatch_args", "a list of sbatch options (strings)")
    for x in v:
        if owned_option(x):
            bad("sbatch_args", "free of %s (rtrain sets it)" % owned_option(x))
    return list(v)


def capacity(gpus_reply):
    """(GPUs in all, GPUs free) of a Slurm host's `gpus` reply (sinfo's GRES per node)."""
    nodes = gpus_reply.get("slurm_nodes") or []
    return sum(n["gpus_total"] for n in nodes), sum(n["gpus_free"] for n in nodes)


def checks(rep):
    """`rtrain hosts` lines for a Slurm login node, from its agent's report (agent/slurmcheck.py)."""
    missing = [n for n, p in rep["commands"].items() if not p]
    if missing:
        return [{"name": "slurm", "ok": False, "detail": "%s not found on PATH (%s)" % (
            ", ".join(missing), rep.get("path") or "empty"),
            "fix": "is this a Slurm login node? the commands must be on the PATH of a non-interactive "
                   "ssh session there (not only after `module load`)"}]
    out = [{"name": "slurm", "ok": True, "detail": "%s, %s" % (
        rep.get("version") or "Slurm", ", ".join(sorted(rep["commands"]))), "fix": ""}]
    if rep.get("error"):
        return out + [{"name": "cluster", "ok": False, "detail": rep["error"],
                       "fix": "check the host's partition, account and qos in hosts.yaml"}]
    nodes = rep.get("nodes") or []
    total = sum(n["gpus_total"] for n in nodes)
    free = sum(n["gpus_free"] for n in nodes)
    parts = sorted({p for n in nodes for p in n["partitions"]})
    out.append({"name": "cluster", "ok": bool(nodes), "detail": "%d node(s), %d GPU(s), %d free; "
                "partitions %s" % (len(nodes), total, free, ", ".join(parts) or "-"),
                "fix": "" if nodes else "sinfo lists no node for this host's partition"})
    sq = rep.get("squeue") or {}
    used = sq.get("setting") if sq.get("setting") != "auto" else ("json" if sq.get("json") else "text")
    out.append({"name": "squeue", "ok": True, "detail": "status reads squeue's %s format (%s)" % (
        used, "squeue_format: %s" % sq.get("setting")), "fix": ""})
    fs = rep.get("fscheck") or {}
    out.append({"name": "shared fs", "ok": fs.get("ok"), "detail": fs.get("detail") or "-",
                "fix": "" if fs.get("ok") else "set `home:` to a folder the compute nodes mount (your "
                "cluster home, or a shared scratch)" if fs.get("ok") is False else
                "run `rtrain hosts` again once the check job ran"})
    c = rep.get("container")
    if c:
        out.append({"name": "containers", "ok": bool(c["found"]), "detail": "%s %s" % (
            c["what"], "found" if c["found"] else "not found"),
            "fix": "" if c["found"] else "ask the cluster's admins, or change container_engine"})
    return out
