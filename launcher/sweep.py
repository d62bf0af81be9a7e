"""Sweeps and arrays: one submit, one snapshot, one job per point (docs/design.md "Many runs").

    --sweep lr=1e-3,3e-4 --sweep seed=0..4     the cartesian product: 10 points
    sweep: {lr: [1e-3, 3e-4], seed: 0..4}      the same in rtrain.yaml (the command line wins)
    --array 10 | 0-9 | 0-9%3 | 1,4,7           one job per index, RTRAIN_ARRAY_INDEX; %3: at most 3 at once

`{name}` in the command is the point's value: shell-quoted in a one-string command (the shell
reads it as one word), as is in an argument of an argv (quoted whole later). Each job also gets
RTRAIN_SWEEP_<NAME>. What is wrong is one RtrainError each: an empty value list, a placeholder
with no sweep variable, a sweep variable the command never uses, more points than the host's
max_points (1,000) without --yes."""
import itertools
import re
import shlex

from .errors import RtrainError

MAX_POINTS = 1000
_NAME = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*\Z")
_RANGE = re.compile(r"\A(-?\d+)\.\.(-?\d+)\Z")
# {name} not preceded by `$` (${HOME} is the shell's) and not doubled ({{literal}})
_PLACEHOLDER = re.compile(r"(?<![${])\{([A-Za-z_][A-Za-z0-9_]*)\}(?!\})")
_ARRAY = re.compile(r"\A(?P<spec>[0-9,\-]+)(?:%(?P<limit>\d+))?\Z")


def values(name, text, where="--sweep"):
    """The values of one sweep variable: "a,b,c" or "0..4" (integers, both ends included)."""
    text = text.strip()
    m = _RANGE.match(text)
    if m:
        a, b = int(m.group(1)), int(m.group(2))
        if b < a:
            raise RtrainError("%s %s=%s: the range runs backwards" % (where, name, text),
                              "write it low..high, e.g. %s=0..4" % name)
        return [str(i) for i in range(a, b + 1)]
    vals = [v.strip() for v in text.split(",")] if text else []
    if not vals or any(v == "" for v in vals):
        raise RtrainError("%s %s=%s: an empty value list" % (where, name, text) if not text else
                          "%s %s=%s: an empty value in the list" % (where, name, text),
                          "give values: %s=1e-3,3e-4 or a range %s=0..4" % (name, name))
    return vals


def parse_sweeps(items):
    """[NAME=VALUES, ...] from the command line -> {name: [values]} in their order."""
    out = {}
    for item in items:
        if "=" not in item:
            raise RtrainError("--sweep %r is not NAME=VALUES" % item,
                              "e.g. --sweep lr=1e-3,3e-4 or --sweep seed=0..4")
        name, text = item.split("=", 1)
        name = name.strip()
        _check_name(name, "--sweep")
        if name in out:
            raise RtrainError("--sweep %s is given twice" % name, "give all its values at once: %s=a,b,c" % name)
        out[name] = values(name, text)
    return out


def from_project(sweep, where):
    """rtrain.yaml's `sweep:` (checked by project.py) -> {name: [values]}."""
    out = {}
    for name, v in sweep:
        out[name] = list(v) if isinstance(v, tuple) else values(name, v, where)
        if not out[name]:
            raise RtrainError("%s: sweep %s: an empty value list" % (where, name), "give it values")
    return out


def _check_name(name, where):
    if not _NAME.match(name):
        raise RtrainError("%s %r: a sweep variable is a name of letters, digits and _" % (where, name),
                          "e.g. --sweep lr=1e-3,3e-4")


def parse_array(text):
    """--array N | A-B | A-B%L | 1,4,7[%L] -> (indices, limit or None)."""
    m = _ARRAY.match(str(text).strip())
    if not m:
        raise RtrainError("--array %r: not N, A-B, A-B%%L or a list 1,4,7" % text,
                          "e.g. --array 10 (indices 0-9), --array 0-9%3 (at most 3 at once)")
    spec, limit = m.group("spec"), m.group("limit")
    idx = []
    if spec.isdigit():
        idx = list(range(int(spec)))
    else:
        for part in spec.split(","):
            a, _, b = part.partition("-")
            if not a.isdigit() or (b and not b.isdigit()) or (b and int(b) < int(a)):
                raise RtrainError("--array %r: %r is not an index or a range A-B" % (text, part),
                                  "e.g. --array 0-9 or --array 1,4,7")
            idx += list(range(int(a), int(b) + 1)) if b else [int(a)]
    if not idx:
        raise RtrainError("--array %s: no index" % text, "e.g. --array 10 for indices 0 to 9")
    if len(set(idx)) != len(idx):
        raise RtrainError("--array %s: an index is given twice" % text, "give each index once: --array 1,4,7")
    if limit is not None and int(limit) < 1:
        raise RtrainError("--array %s: %%%s runs nothing" % (text, limit), "the limit is 1 or more")
    return idx, (int(limit) if limit is not None else None)


def placeholders(argv):
    return {m.group(1) for a in argv for m in _PLACEHOLDER.finditer(a)}


def fill(argv, point):
    """The job's argv with its point's values in: shell-quoted in a one-string command."""
    def sub(text, quote):
        text = _PLACEHOLDER.sub(lambda m: quote(point[m.group(1)]), text)
        return text.replace("{{", "{").replace("}}", "}")
    if len(argv) == 1:
        return [sub(argv[0], shlex.quote)]
    return [sub(a, str) for a in argv]


def plan(argv, sweep=None, array=None):
    """What a submit with a sweep or an array sends (submit.py): {"points": [{"argv", "env",
    "suffix"}], "group": {"kind", "label", "max_running"}}, or None for one plain job."""
    if sweep and array is not None:
        raise RtrainError("--array and --sweep cannot go together",
                          "an index is a sweep variable too: --sweep i=0..9")
    if array is not None:
        idx, limit = parse_array(array)
        points = [{"argv": list(argv), "env": {"RTRAIN_ARRAY_INDEX": str(i)}, "suffix": "[%d]" % i}
                  for i in idx]
        group = {"kind": "array", "label": str(array), "max_running": limit}
    elif sweep:
        used = placeholders(argv)
        text = " ".join(argv)
        for name in sorted(used - set(sweep)):
            raise RtrainError("the command uses {%s}, but no sweep variable is named %s" % (name, name),
                              "add --sweep %s=... (or write {{%s}} for the braces themselves)" % (name, name))
        for name in sweep:
            if name not in used and "RTRAIN_SWEEP_%s" % name.upper() not in text:
                raise RtrainError("sweep variable %s is not used in the command" % name,
                                  "put {%s} in the command where its value goes (the job also gets "
                                  "$RTRAIN_SWEEP_%s)" % (name, name.upper()))
        names = list(sweep)
        points = []
        for combo in itertools.product(*(sweep[n] for n in names)):
            point = dict(zip(names, combo))
            points.append({"argv": fill(argv, point),
                           "env": {"RTRAIN_SWEEP_%s" % n.upper(): v for n, v in point.items()},
                           "suffix": " " + " ".join("%s=%s" % kv for kv in point.items())})
        group = {"kind": "sweep", "label": " x ".join("%s(%d)" % (n, len(sweep[n])) for n in names),
                 "max_running": None}
    else:
        return None
    return {"points": points, "group": group}


def check_count(many, max_points, yes):
    """More points than the host's max_points (default 1,000) need --yes."""
    n = len(many["points"])
    if n > max_points and not yes:
        raise RtrainError("the %s makes %d jobs, more than %d" % (many["group"]["kind"], n, max_points),
                          "pass --yes to queue them all (max_points in hosts.yaml sets the limit)")
