"""Images built on the host from the project's Dockerfile (rtrain.yaml `build:`), once per key
(builds.py, kind "image"; docs/design.md "Built once per key", docs/containers.md "Images built
on the host").

The context is the job's work dir (the project's root, as the job's snapshot has it). The key
hashes the engine, the Dockerfile and the files its COPY and ADD lines take from the context,
read from the job's manifest (no file is hashed again); when the Dockerfile does not say which
(a source with a variable, `COPY . .`, a heredoc) the key hashes the whole snapshot. The image
is tagged rtrain/PROJECT:KEY and built with the engine's own build (`docker build`, the legacy
builder; `podman build`), without network unless the Dockerfile has RUN steps or ADDs a URL.
Standard library only, Python >= 3.8.
"""
import fnmatch
import hashlib
import json
import os
import re
import subprocess

from .builds import BuildError

_DIRECTIVE = re.compile(r"\A#\s*([A-Za-z]+)\s*=\s*(\S+)\s*\Z")
_URL = re.compile(r"\A(https?|git)://|\Agit@")


def instructions(text):
    """[(INSTRUCTION, arguments)] of a Dockerfile: parser directives, comments and line
    continuations (the escape character, `\\` or the `# escape=` directive's) handled."""
    escape = "\\"
    lines = text.splitlines()
    i = 0
    while i < len(lines):  # directives: only at the top, before any other line
        m = _DIRECTIVE.match(lines[i].strip())
        if not m:
            break
        if m.group(1).lower() == "escape" and m.group(2) in ("\\", "`"):
            escape = m.group(2)
        i += 1
    out, cur = [], None
    for line in lines[i:]:
        stripped = line.strip()
        if cur is None and (not stripped or stripped.startswith("#")):
            continue
        if cur is not None and (not stripped or stripped.startswith("#")):
            continue  # an empty line or a comment inside a continued instruction
        body = line.rstrip()
        cont = body.endswith(escape)
        if cont:
            body = body[:-1]
        cur = body if cur is None else cur + " " + body.strip()
        if not cont:
            word, _, args = cur.strip().partition(" ")
            out.append((word.upper(), args.strip()))
            cur = None
    if cur is not None and cur.strip():
        word, _, args = cur.strip().partition(" ")
        out.append((word.upper(), args.strip()))
    return out


def sources(text):
    """What a Dockerfile takes from its context: (patterns, urls, whole). `patterns`: the
    sources of its COPY/ADD lines (not those --from another stage), relative, '/'-separated;
    `urls`: what ADD fetches; `whole`: True when they cannot be known, so the whole context
    counts."""
    patterns, urls, whole = [], [], False
    for word, args in instructions(text):
        if word not in ("COPY", "ADD"):
            continue
        if "<<" in args:
            return [], urls, True  # a heredoc (BuildKit)
        words = args.split()
        flags = []
        while words and words[0].startswith("--"):
            flags.append(words.pop(0))
        if any(f.startswith("--from") for f in flags):
            continue
        rest = " ".join(words)
        if rest.startswith("["):
            try:
                words = json.loads(rest)
            except ValueError:
                return [], urls, True
            if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
                return [], urls, True
        for src in words[:-1]:
            if word == "ADD" and _URL.match(src):
                urls.append(src)
                continue
            p = _normal(src)
            if p is None:
                whole = True
            else:
                patterns.append(p)
    return patterns, urls, whole


def _normal(src):
    """A COPY source as a relative pattern; None for the whole context or what can't be known."""
    if "$" in src:
        return None
    parts = [x for x in src.split("/") if x not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


def needs_network(text):
    """True when the Dockerfile has RUN steps (pip, apt) or ADDs a URL."""
    return any(word == "RUN" for word, _ in instructions(text)) or bool(sources(text)[1])


def _matches(path, pattern):
    """A context path taken by a COPY source: the pattern names it, or a folder above it (Go's
    filepath.Match per component, which fnmatch follows close enough)."""
    p, q = path.split("/"), pattern.split("/")
    return len(p) >= len(q) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(p, q))


def key_of(engine, project, dockerfile, text, entries):
    """(key, how): the image's key, 32 hex, and in words what it hashes. `entries`: the
    snapshot's manifest entries (the context)."""
    patterns, urls, whole = sources(text)
    used = []
    for e in entries:
        path = e["path"]
        if whole or path == ".dockerignore" or any(_matches(path, pat) for pat in patterns):
            used.append((path, e.get("hash") or e.get("target") or "", bool(e.get("exec"))))
    used.sort()
    rec = {"engine": engine, "project": project, "dockerfile": dockerfile,
           "text": hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest(),
           "whole": whole, "files": used, "urls": urls}
    key = hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()[:32]
    how = "the whole context (%d files)" % len(used) if whole else \
        "the Dockerfile and %d file(s) its COPY/ADD lines name" % len(used)
    return key, how


def tag(project, key):
    """rtrain/PROJECT:KEY, the project's name made a valid repository name (lowercase)."""
    name = re.sub(r"[^a-z0-9]+", "-", project.lower()).strip("-") or "project"
    return "rtrain/%s:%s" % (name[:100], key)


def build_argv(engine, engine_bin, dockerfile_path, image, context, network, labels=()):
    argv = [engine_bin, "build", "-f", dockerfile_path, "-t", image, "--network=%s" % network,
            "--force-rm"]
    for k, v in labels:
        argv += ["--label", "%s=%s" % (k, v)]
    return argv + [context]


def build(engine, engine_bin, image, dockerfile, context, network, labels=(), env=None):
    """builds.py's build function: `ENGINE build` of `image` from the job's work dir `context`,
    its output into the build's log. The marker records the image, engine and id."""

    def run(dest, log_fd):
        os.mkdir(dest, 0o700)  # the artifact is the image in the engine; this marks its key
        benv = dict(os.environ if env is None else env)
        if engine == "docker":
            benv["DOCKER_BUILDKIT"] = "0"  # the legacy builder: on every docker, no buildx needed
        argv = build_argv(engine, engine_bin, os.path.join(context, dockerfile), image, context,
                          network, labels)
        os.write(log_fd, ("rtrain: building image %s with %s from %s (network: %s)\n$ %s\n" % (
            image, engine, dockerfile, network, " ".join(argv))).encode("utf-8", "replace"))
        try:
            rc = subprocess.call(argv, cwd=context, env=benv, stdin=subprocess.DEVNULL, stdout=log_fd,
                                 stderr=subprocess.STDOUT, close_fds=True)
        except OSError as e:
            raise BuildError("cannot run %s: %s" % (engine_bin, e.strerror))
        if rc != 0:
            raise BuildError("%s build failed (exit code %d)" % (engine, rc))
        p = subprocess.run([engine_bin, "image", "inspect", "--format", "{{.Id}}", image], env=benv,
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        image_id = p.stdout.decode("utf-8", "replace").strip()
        os.write(log_fd, ("rtrain: image %s ready\n" % image).encode())
        return {"image": image, "engine": engine, "id": image_id}

    return run
