"""Wire format between client and agent.

Request: the first line of stdin is a JSON object; `submit` may read a blob stream after it
(docs/contracts.md). Reply: one JSON line on stdout:

    {"protocol": 1, "ok": true, "result": {...}}
    {"protocol": 1, "ok": false, "error": {"code": "...", "message": "...", "hint": "..."}}

Streaming verbs (logs, read) and submit write frames (JSON lines without "protocol") before
it; the reply is the line that carries "protocol". Both sides check the protocol number.
"""
import json

PROTOCOL = 1
VERSION = "0.2.0"  # rtrain's version, client and agent alike (launcher/__init__.py reads it)


class AgentError(Exception):
    """An error the agent reports to the client as a reply, not a traceback."""

    def __init__(self, code, message, hint="", data=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint
        self.data = data

    def to_dict(self):
        d = {"code": self.code, "message": self.message, "hint": self.hint}
        if self.data is not None:
            d["data"] = self.data
        return d


def ok(result):
    return {"protocol": PROTOCOL, "ok": True, "result": result}


def fail(err):
    return {"protocol": PROTOCOL, "ok": False, "error": err.to_dict()}


def dumps(obj):
    return json.dumps(obj, separators=(",", ":"), sort_keys=True) + "\n"
