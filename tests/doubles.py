"""Test doubles shared by the unit tests: a real Session whose hosts are all served by one stub
agent client (no transport, no agent process), and the base of such stub clients. The simulated
nvidia-smi has its own module (fakesmi.py)."""
from launcher import config
from launcher.session import Session


class StubClient:
    """What AgentClient offers the verbs, answering from memory. Subclasses override the verbs
    a test is about (stream for logs, exchange for submit...). `status` of any id answers a
    running job, so Session.find() works as it does against a real agent."""

    def prestart(self, verb):
        pass

    def settings(self):
        return {}

    def call(self, verb, req=None):
        if verb == "status" and req and req.get("ids"):
            return {"jobs": [{"id": int(i), "state": "running"} for i in req["ids"]]}
        raise AssertionError("unexpected call %s %r" % (verb, req))


class StubSession(Session):
    """A real Session (find, decorate, hosts, job ids as users write them) over hosts that are
    all answered by `client`. reset() is counted: the verbs call it after a dropped connection."""

    def __init__(self, client, hosts=("tower",), default=None):
        table = {}
        for name in hosts:
            table[name] = config.LOCAL if name == "local" else config.Host(name=name, kind="ssh", ssh=name)
        Session.__init__(self, config.Config(path="hosts.yaml" if hosts != ("local",) else None,
                                             default=default, hosts=table))
        self.stub = client
        self.resets = 0

    def client(self, name):
        self.cfg.get(name)
        return self.stub

    def reset(self, name):
        self.resets += 1
