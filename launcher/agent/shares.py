"""A GPU shared by k jobs (`--gpus 0.5`: k = 2; 0.33: 3; 0.25: 4), docs/design.md "Sharing a GPU".

Each of the k jobs holds one slot: an abstract socket `<the GPU's lease name>/s<k>.<i>`, i < k
(leases.py has the names), and the GPU's lease file flocked SHARED. So:
- at most k jobs hold slots of k: there are k names, and a name is bound once;
- a GPU shared at k is never shared at another k' at the same time (slots are taken only
  when no slot of another k is held);
- a whole-GPU lease and slots never coexist: both are taken under the GPU's admin socket
  (leases.try_acquire), each after checking the other is not held; an older agent, which
  knows neither slots nor the admin socket, is kept off by the shared flock of the lease file
  (its exclusive flock fails), and a slot checks the whole lease once more after it is taken.
Jobs on one GPU get the same CUDA_VISIBLE_DEVICES UUID. Nothing isolates their memory: each
must fit in its share (document it to users; MPS or MIG do isolate).
Standard library only, Python >= 3.8.
"""
import os

from . import leases

MAX_SHARE = 8


def slot_name(lock_dir, uuid, k, i, base=None):
    """The name of slot i of k on uuid (base: the GPU's lease name, if known already)."""
    return (base or leases.socket_name(lock_dir, uuid)) + ("/s%d.%d" % (k, i)).encode("ascii")


def holders(lock_dir, uuid):
    """{"k": k, "slots": [(slot, uid, pid)]} for a GPU shared now, else None. (uid, pid) are
    (None, None) for a slot held but whose holder cannot be asked (its queue is full)."""
    base = leases.socket_name(lock_dir, uuid)
    names = [(k, i, slot_name(lock_dir, uuid, k, i, base)) for k in range(2, MAX_SHARE + 1)
             for i in range(k)]
    got = leases.name_owners([n for _, _, n in names])
    if not got:
        return None
    k = min(k for k, _, n in names if n in got)
    return {"k": k, "slots": [(i, got[n][0], got[n][1]) for kk, i, n in names if kk == k and n in got]}


def held(lock_dir, uuid):
    """True while any slot of the GPU is held, whatever its k."""
    return holders(lock_dir, uuid) is not None


def free_slots(lock_dir, uuid, k):
    """How many slots of k are free on a GPU shared at k now (None: not shared at k)."""
    h = holders(lock_dir, uuid)
    if h is None or h["k"] != k:
        return None
    return k - len(h["slots"])


def take(lock_dir, uuid, k):
    """One of the k slots of uuid, as a Lease (share=k), or None. Called with the GPU's admin
    socket held (leases.try_acquire)."""
    if leases.socket_holder(lock_dir, uuid) is not None:
        return None  # a whole-GPU lease
    h = holders(lock_dir, uuid)
    if h is not None and h["k"] != k:
        return None  # shared at another ratio
    used = {i for i, _, _ in (h["slots"] if h else ())}
    for i in range(k):
        if i in used:
            continue
        sfd = leases._bind(slot_name(lock_dir, uuid, k, i))
        if sfd is not None:
            break
    else:
        return None
    ffd, why = leases._flock(leases.lock_path(lock_dir, uuid), shared=True)
    fds = [sfd] if ffd is None else [sfd, ffd]
    if why == leases._HELD or leases.socket_holder(lock_dir, uuid) is not None:
        # an older agent holds the whole GPU (its lease file's exclusive flock, or its socket
        # taken without the admin socket after we looked)
        for fd in fds:
            os.close(fd)
        return None
    return leases.Lease(uuid, fds, why and "its lease file is " + why, share=k, slot=i)
