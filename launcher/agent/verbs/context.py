"""What every verb gets: the request, the streams, RTRAIN_HOME and its job database."""
import json
import os
import sqlite3

from .. import daemon, db, paths
from ..protocol import AgentError
from ..settings import Settings, SettingsError

TERMINAL = ("succeeded", "failed", "cancelled", "lost")


class Context:
    def __init__(self, req, stdin, out, argv):
        self.req = req
        self.stdin = stdin
        self.out = out
        self.agent_argv = argv
        self.home_root = paths.resolve_home(req.get("home"))
        self._home = None
        self._con = None

    @property
    def home(self):
        if self._home is None:
            self._home = paths.Home(self.home_root).ensure()
        return self._home

    @property
    def con(self):
        if self._con is None:
            try:
                self._con = self.home.open_db()
            except db.SchemaError as e:
                raise AgentError("schema", "%s: %s" % (self.home.db, e),
                                 "upgrade rtrain on this machine to the one that used this host last")
            except sqlite3.DatabaseError as e:
                text = str(e).lower()
                if "not a database" not in text and "malformed" not in text:
                    raise
                raise AgentError("bad_database", "the job database %s is damaged (%s)" % (
                    self.home.db, e), "restore it from a backup, or move RTRAIN_HOME aside "
                    "(mv %s %s.old) to start afresh" % (self.home_root, self.home_root))
        return self._con

    @property
    def settings(self):
        """The request's scheduling settings (settings.py); defaults where it sends none."""
        try:
            return Settings.from_dict(self.req.get("settings"))
        except SettingsError as e:
            raise AgentError("bad_request", "bad settings: %s" % e)

    def emit(self, frame):
        self.out.write(json.dumps(frame, separators=(",", ":")) + "\n")
        self.out.flush()

    def poke(self):
        daemon.poke(self.home, self.agent_argv)

    def job_row(self, job_id):
        try:
            job_id = int(job_id)
        except (TypeError, ValueError):
            raise AgentError("no_such_job", "no job %r: job ids are numbers" % (job_id,))
        row = self.con.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise AgentError("no_such_job", "no job %d on this host" % job_id,
                             "`rtrain status` lists your jobs")
        return row

    def public(self, row):
        """A job as the client sees it, with its paths on this host."""
        d = db.to_public(row)
        d["log"] = self.home.job(row["id"]).log
        d["work_dir"] = self.home.job(row["id"]).work
        try:
            d["log_size"] = os.path.getsize(d["log"])
        except OSError:
            d["log_size"] = 0
        return d
