"""A command's session: the configuration, one agent client per host (opened on first use,
closed together), and finding a job by the id the user typed."""
from . import hosts as hostsmod
from .errors import AgentReplyError, RtrainError


class Session:
    """The configuration plus one open client per host, closed together."""

    def __init__(self, cfg, accept_new_host_key=False):
        self.cfg = cfg
        self.accept_new = accept_new_host_key
        self._clients = {}

    def client(self, name):
        if name not in self._clients:
            self._clients[name] = hostsmod.open_client(self.cfg.get(name), self.accept_new)
        return self._clients[name]

    def close(self):
        for c in self._clients.values():
            try:
                c.transport.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        self._clients.clear()

    def reset(self, name):
        """Drop a host's connection (after it broke); the next call opens a new one."""
        c = self._clients.pop(name, None)
        if c is not None:
            try:
                c.transport.close()
            except Exception:  # noqa: BLE001 - closing a broken connection is best effort
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def job_id(self, host, n):
        return hostsmod.format_id(self.cfg, host, n)

    def decorate(self, host, job):
        """A job as the agent on `host` gave it, with its host and its id as the user writes it."""
        job = dict(job)
        job["host"] = host
        job["num"] = job["id"]
        job["id"] = self.job_id(host, job["num"])
        if job.get("group") is not None:  # a sweep's or an array's (groups.py)
            from .groups import format_id
            job["group"] = format_id(self.cfg, host, job["group"])
        if job.get("cause") is not None and "{cause}" in (job.get("message") or ""):
            # "dependency {cause} failed": the job it names, as the user writes it (agent/deps.py)
            job["message"] = job["message"].replace("{cause}", self.job_id(host, job["cause"]))
        return job

    def hosts(self, host=None):
        """The names of the hosts a command covers: `host` alone (checked), else every one."""
        if host:
            self.cfg.get(host)
            return [host]
        return list(self.cfg.hosts)

    def locate(self, ref):
        """(host, numeric id) for a job reference: without a call when it names the host (or
        there is a default host), else by asking every host (find)."""
        host, n = hostsmod.parse_ref(self.cfg, ref)
        if host is not None:
            return host, n
        return self.find(ref)[:2]

    def find(self, ref):
        """(host, numeric id, job dict) for a job reference, asking every host if needed."""
        host, n = hostsmod.parse_ref(self.cfg, ref)
        if host is not None:
            try:
                jobs = self.client(host).call("status", {"ids": [n]})["jobs"]
            except AgentReplyError as e:
                if e.code == "no_such_job":
                    raise hostsmod.not_found(ref)
                raise
            return host, n, self.decorate(host, jobs[0])
        found, errors = [], []
        for name, res, err in hostsmod.parallel(
                lambda h: self.client(h).call("status", {"ids": [n]}), list(self.cfg.hosts)):
            if err is None:
                found.append((name, res["jobs"][0]))
            elif not (isinstance(err, AgentReplyError) and err.code == "no_such_job"):
                errors.append(err)
        if len(found) == 1:
            return found[0][0], n, self.decorate(found[0][0], found[0][1])
        if len(found) > 1:
            raise RtrainError("job %s exists on several hosts: %s" % (
                ref, ", ".join(h for h, _ in found)),
                "name it as HOST:%d, e.g. %s:%d" % (n, found[0][0], n))
        if errors:
            raise errors[0]
        raise hostsmod.not_found(ref)
