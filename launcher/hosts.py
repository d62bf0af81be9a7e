"""From a config.Host to an AgentClient over the right transport; job references."""
import re
from concurrent.futures import ThreadPoolExecutor

from .agentclient import AgentClient
from .errors import JobNotFound, RtrainError


def open_client(host, accept_new_host_key=False):
    if host.kind == "local":
        import sys
        from .transport import LocalTransport
        python = sys.executable if host.python in (None, "python3") else host.python
        return AgentClient(host, LocalTransport(host.name, python=python, home=host.home))
    return AgentClient(host, ssh_transport(host, accept_new_host_key))


def ssh_transport(host, accept_new_host_key=False):
    """The host's `transport:`, else OpenSSH where it can share connections, else paramiko."""
    from .sshcommon import transport_of
    if transport_of(host) == "openssh":
        from .openssh import OpenSSHTransport
        return OpenSSHTransport(host, accept_new_host_key=accept_new_host_key)
    from .paramiko_transport import ParamikoTransport
    return ParamikoTransport(host, accept_new_host_key=accept_new_host_key)


def default_host(cfg):
    """The host a bare job id and a plain submit mean, or None when placement must choose."""
    if cfg.default:
        return cfg.default
    names = [n for n in cfg.hosts if n != "local"]
    if not names:
        return "local"
    if len(names) == 1:
        return names[0]
    return None


def format_id(cfg, host, job_id):
    return str(job_id) if host == default_host(cfg) else "%s:%s" % (host, job_id)


_REF = re.compile(r"^(?:(?P<host>[^:\s]+):)?(?P<id>\d+)$")


def parse_ref(cfg, ref):
    """'12' or 'tower:12' -> (host or None, 12). None host: ask every host."""
    m = _REF.match(str(ref).strip())
    if not m:
        raise RtrainError("%r is not a job id" % ref,
                          "job ids look like 12 or tower:12 (see `rtrain status`)")
    host = m.group("host")
    if host is not None:
        cfg.get(host)
    else:
        host = default_host(cfg)
    return host, int(m.group("id"))


def parallel(fn, items, workers=16):
    """[(item, result, error)] for fn over items, in parallel, in the order of items."""
    items = list(items)
    if not items:
        return []
    if len(items) == 1:
        return [_guard(fn, items[0])]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as ex:
        return list(ex.map(lambda it: _guard(fn, it), items))


def _guard(fn, item):
    try:
        return item, fn(item), None
    except RtrainError as e:
        return item, None, e


def not_found(ref):
    return JobNotFound("no job %s" % ref, "`rtrain status --all` lists your jobs")
