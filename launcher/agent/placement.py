"""Which GPUs a job gets, once it may start (scheduler.py `_place`): the tower's policy (hidden
GPUs, their order, reservations, the per-user cap: policy.py), GPUs shared by k jobs
(`--gpus 0.5`: shares.py), and fair share between the tower's users (fairshare.py). The leases
themselves are leases.py's. Standard library only, Python >= 3.8.
"""
import os
import time

from . import fairshare, leases, policy, shares
from .batch import _num


class Placer(object):
    def __init__(self, home_root, own_fds):
        self.entry = fairshare.Entry(home_root, own_fds)
        self.home_tag = self.entry.home_tag
        self.policy = policy.Policy(policy.path())
        self.me = None          # (user name, group names)
        self.waiting = None     # this pass: {"since", "want"} of the jobs waiting for GPUs
        self.defer = None       # (free GPUs we leave to others, since when: monotonic)

    # ------------------------------------------------------------------ a pass

    def begin_pass(self):
        self.policy = policy.load()
        self.waiting = {"since": None, "want": 0.0}

    def wants(self, row):
        """A GPU job that waits in this pass (take() counts its own): counted in our entry."""
        w = self.waiting
        w["want"] += row["gpus_requested"] / float(row["share"] or 1)
        w["since"] = row["submitted_at"] if w["since"] is None else min(w["since"], row["submitted_at"])

    def got(self, row):
        self.waiting["want"] -= row["gpus_requested"] / float(row["share"] or 1)

    def end_pass(self, lock_dir):
        """Post our entry in the waiting room while jobs wait for GPUs; withdraw it otherwise."""
        w = self.waiting
        if lock_dir and w and w["since"] is not None and w["want"] > 0 and not w.get("capped"):
            self.entry.post(lock_dir, w["since"], w["want"])
        else:
            self.entry.withdraw()
            self.defer = None

    # ------------------------------------------------------------------ one job

    def take(self, row, units, lock_dir, taken):
        """([leases.Lease], None) when the job got its GPUs; (None, why it waits or None for the
        scheduler's own words) otherwise."""
        n, k = row["gpus_requested"], row["share"] or 1
        self.wants(row)
        pol = self.policy
        if pol.state == "error":
            return None, "waiting: the tower policy has an error (%s); ask the admin to fix it" % pol.problem
        if self.me is None:
            self.me = policy.me()
        usable = [u for pos, u in sorted(enumerate(units), key=lambda x: pol.rank(x[1], x[0]))
                  if not pol.hides(u) and pol.may_use(u, self.me)]
        need = float(n) if k == 1 else 1.0 / k
        if pol.active and pol.cap is not None:
            mine = fairshare.held(lock_dir, [u["uuid"] for u in units]).get(os.getuid(), 0.0)
            if mine + need > pol.cap + 1e-9:
                self.waiting["capped"] = True  # no use asking others to make way
                return None, "waiting: %s holds %s GPUs, the cap is %s (%s)" % (
                    self.me[0], _num(mine), _num(pol.cap), pol.path)
        if k > 1:  # join a GPU already shared by k, first (fair share applies: a slot is 1/k)
            joinable = [u["uuid"] for u in usable if u["state"] != "unknown" and
                        shares.free_slots(lock_dir, u["uuid"], k)]
            why = self._fair(lock_dir, units, joinable, 1, joining=True) if joinable else None
            if why:
                return None, why
            for uuid in joinable:
                lease = leases.try_acquire(lock_dir, uuid, k)
                if lease is not None:
                    self.got(row)
                    return [lease], None
            n = 1
        # only GPUs no lease holds now: fair share vets these, and no other is tried below (one
        # whose lease goes between this look and the acquire, a job of ours just ending, waits
        # for the next pass, where fair share sees it free)
        free = [u for u in usable if u["state"] == "free" and u["uuid"] not in taken
                and not leases.is_held(lock_dir, u["uuid"])]
        why = self._fair(lock_dir, units, [u["uuid"] for u in free], n)
        if why:
            return None, why
        held = []
        try:
            for u in free:
                if len(held) == n:
                    break
                lease = leases.try_acquire(lock_dir, u["uuid"], k)
                if lease is not None:
                    held.append(lease)
        except BaseException:
            for lease in held:
                lease.release()
            raise
        if len(held) == n:
            self.defer = None
            self.got(row)
            return held, None
        for lease in held:
            lease.release()
        return None, self._why(n, k, units, usable, lock_dir) if (pol.active or k > 1) else None

    def _fair(self, lock_dir, units, candidates, n, joining=False):
        """Why we leave the free GPUs (joining: a free slot of a shared GPU, which counts as one
        thing to hand out) to another user now (fairshare.py), or None."""
        if not candidates:
            return None
        others = fairshare.room(lock_dir, skip_home=self.home_tag)
        me = os.getuid()
        if not any(e["uid"] != me for e in others):
            self.defer = None
            return None
        free_now = list(candidates) if joining else [u for u in candidates if not leases.is_held(lock_dir, u)]
        if not free_now:
            return None
        holding = fairshare.held(lock_dir, [u["uuid"] for u in units])
        users = {}
        for e in others:
            u = users.setdefault(e["uid"], {"held": holding.get(e["uid"], 0.0), "since": e["since"], "want": 0.0})
            u["since"] = min(u["since"], e["since"])
            u["want"] += e["want"]
        w = self.waiting or {}
        mine = users.setdefault(me, {"held": holding.get(me, 0.0), "since": w.get("since") or time.time(),
                                     "want": 0.0})
        mine["since"] = min(mine["since"], w.get("since") or mine["since"])
        mine["want"] += max(w.get("want") or 0.0, n)
        turn = fairshare.ahead(1 if joining else len(free_now), me, users, n)
        if turn is None:
            self.defer = None
            return None
        key = (joining, frozenset(free_now))
        if self.defer is None or self.defer[0] != key:
            self.defer = (key, time.monotonic())
        elif time.monotonic() - self.defer[1] >= fairshare.DEFER_S:
            return None  # they did not take it in time: it is ours (fairshare.py)
        from .lockdir import user_name
        return "waiting: fair share: %s holds %s GPU%s and waits too; the free GPU%s go%s to them first" % (
            user_name(turn), _num(users[turn]["held"]), "" if users[turn]["held"] == 1 else "s",
            "" if len(free_now) == 1 else "s", "es" if len(free_now) == 1 else "")

    def _why(self, n, k, units, usable, lock_dir):
        """The waiting message when the policy hides or reserves GPUs."""
        free = sum(1 for u in usable if u["state"] == "free" and not leases.is_held(lock_dir, u["uuid"]))
        hidden = sum(1 for u in units if self.policy.hides(u))
        reserved = len(units) - hidden - len(usable)
        notes = (["%d hidden" % hidden] if hidden else []) + (["%d reserved for others" % reserved]
                                                              if reserved else [])
        return "waiting for %s: %d of %d free%s" % (
            "1/%d of a GPU" % k if k > 1 else "%d GPU%s" % (n, "" if n == 1 else "s"),
            free, len(units), " (the tower policy: %s)" % ", ".join(notes) if notes else "")

