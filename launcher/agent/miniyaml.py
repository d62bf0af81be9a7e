"""The small YAML subset a tower policy needs (policy.py), parsed by hand: the agent is the
standard library only. Block mappings and lists (a list item may start a mapping: `- gpus: [0]`),
flow lists and mappings (`[0, 1]`, `{gpus: [0], users: [alice]}`), plain and quoted scalars
(true/false, null/~, integers, floats, strings), comments. Anything else (anchors, tags,
multi-line strings, documents) is an error with its line number: MiniYAMLError(line, message).
Standard library only, Python >= 3.8.
"""
import re


class MiniYAMLError(ValueError):
    def __init__(self, line, message):
        ValueError.__init__(self, "line %d: %s" % (line, message))
        self.line = line
        self.message = message


_INT = re.compile(r"\A[-+]?\d+\Z")
_FLOAT = re.compile(r"\A[-+]?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?\Z")
_UNSUPPORTED = ("&", "*", "!", "|", ">", "%", "@", "`")


def parse(text):
    """The value of a YAML document (None for an empty one)."""
    lines = []
    for no, raw in enumerate(text.splitlines(), 1):
        body = _strip_comment(raw, no).rstrip()
        if not body.strip():
            continue
        lead = body[:len(body) - len(body.lstrip())]
        if "\t" in lead:
            raise MiniYAMLError(no, "a tab in the indentation (indent with spaces)")
        if body.strip() in ("---", "..."):
            raise MiniYAMLError(no, "one document only (no ---)")
        lines.append([no, len(lead), body.strip()])
    if not lines:
        return None
    value, i = _block(lines, 0, lines[0][1])
    if i < len(lines):
        raise MiniYAMLError(lines[i][0], "unexpected indentation" if lines[i][1] != lines[0][1] else
                            "a %s where the %s above goes on" % (
                                "list item" if _is_item(lines[i][2]) else "key",
                                "list" if isinstance(value, list) else "mapping"))
    return value


def _strip_comment(raw, no):
    """The line without its comment (a # at the start or after a space, outside quotes)."""
    quote = None
    i = 0
    while i < len(raw):
        c = raw[i]
        if quote:
            if quote == '"' and c == "\\":
                i += 1
            elif c == quote and quote == "'" and raw[i + 1:i + 2] == "'":
                i += 1
            elif c == quote:
                quote = None
        elif c in "'\"" and (i == 0 or raw[i - 1] in " \t[{,:-"):
            quote = c
        elif c == "#" and (i == 0 or raw[i - 1] in " \t"):
            return raw[:i]
        i += 1
    if quote:
        raise MiniYAMLError(no, "a quoted string that does not end on its line")
    return raw


def _is_item(text):
    return text == "-" or text.startswith("- ")


def _block(lines, i, indent):
    if _is_item(lines[i][2]):
        return _seq(lines, i, indent)
    return _map(lines, i, indent)


def _nested(lines, i, indent, allow_seq_at_same_indent):
    """The value of a key or item with nothing after it: the block below, or null."""
    if i < len(lines) and lines[i][1] > indent:
        return _block(lines, i, lines[i][1])
    if allow_seq_at_same_indent and i < len(lines) and lines[i][1] == indent and _is_item(lines[i][2]):
        return _seq(lines, i, indent)  # `key:` followed by `- item` at the key's own column
    return None, i


def _at(lines, i, indent):
    """(line number, text) of line i when it belongs to the block at `indent`, None when the
    block ended before it; deeper is an error."""
    if i >= len(lines) or lines[i][1] < indent:
        return None
    if lines[i][1] > indent:
        raise MiniYAMLError(lines[i][0], "unexpected indentation")
    return lines[i][0], lines[i][2]


def _map(lines, i, indent):
    out = {}
    while _at(lines, i, indent):
        no, text = _at(lines, i, indent)
        if _is_item(text):
            raise MiniYAMLError(no, "a list item where a key was expected")
        key, rest = _split_key(no, text)
        if key in out:
            raise MiniYAMLError(no, "%r is given twice" % key)
        i += 1
        if rest:
            out[key] = _value(no, rest)
        else:
            out[key], i = _nested(lines, i, indent, True)
    return out, i


def _seq(lines, i, indent):
    out = []
    while _at(lines, i, indent) and _is_item(_at(lines, i, indent)[1]):
        no, text = _at(lines, i, indent)
        rest = text[1:].strip()
        if not rest:
            value, i = _nested(lines, i + 1, indent, False)
        elif _key_at(rest) is not None:
            # `- key: value` starts a mapping whose further keys line up with `key`
            lines[i] = [no, indent + len(text) - len(rest), rest]
            value, i = _map(lines, i, lines[i][1])
        else:
            value, i = _value(no, rest), i + 1
        out.append(value)
    return out, i


def _key_at(text):
    """The index of the ':' that ends a key at the start of text, or None."""
    if text[:1] in "[{":
        return None
    quote = None
    for i, c in enumerate(text):
        if quote:
            if c == quote:
                quote = None
        elif c in "'\"" and i == 0:
            quote = c
        elif c == ":" and (i + 1 == len(text) or text[i + 1] == " "):
            return i
    return None


def _split_key(no, text):
    at = _key_at(text)
    if at is None:
        raise MiniYAMLError(no, "expected `key: value`, got %r" % text)
    key = _scalar(no, text[:at].strip())
    if key is None or isinstance(key, (list, dict)):
        raise MiniYAMLError(no, "a key must be a plain value")
    return str(key) if not isinstance(key, bool) else str(key).lower(), text[at + 1:].strip()


def _value(no, text):
    if text[:1] in "[{":
        value, pos = _flow(no, text, 0)
        if text[pos:].strip():
            raise MiniYAMLError(no, "unexpected %r after %s" % (text[pos:].strip(), text[:pos]))
        return value
    return _scalar(no, text)


def _flow(no, text, pos):
    """A flow list or mapping starting at text[pos]: (value, position after it)."""
    close = "]" if text[pos] == "[" else "}"
    items = [] if close == "]" else {}
    pos += 1
    while True:
        pos = _skip(text, pos)
        if pos >= len(text):
            raise MiniYAMLError(no, "%r is not closed on its line" % text[:1])
        if text[pos] == close:
            return items, pos + 1
        if close == "}":
            key, pos = _flow_item(no, text, pos, ":")
            pos = _skip(text, pos)
            if pos >= len(text) or text[pos] != ":":
                raise MiniYAMLError(no, "expected ':' after %r in a flow mapping" % (key,))
            value, pos = _flow_item(no, text, pos + 1, ",}")
            items[str(key)] = value
        else:
            value, pos = _flow_item(no, text, pos, ",]")
            items.append(value)
        pos = _skip(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos < len(text) and text[pos] != close:
            raise MiniYAMLError(no, "expected ',' or %r, got %r" % (close, text[pos]))


def _flow_item(no, text, pos, stops):
    pos = _skip(text, pos)
    if pos < len(text) and text[pos] in "[{":
        return _flow(no, text, pos)
    if pos < len(text) and text[pos] in "'\"":
        end = _quote_end(no, text, pos)
        return _scalar(no, text[pos:end]), end
    end = pos
    while end < len(text) and text[end] not in stops and not (
            text[end] == ":" and ":" in stops and (end + 1 == len(text) or text[end + 1] in " ,}")):
        end += 1
    return _scalar(no, text[pos:end].strip()), end


def _quote_end(no, text, pos):
    q = text[pos]
    i = pos + 1
    while i < len(text):
        if q == '"' and text[i] == "\\":
            i += 2
            continue
        if text[i] == q:
            if q == "'" and text[i + 1:i + 2] == "'":
                i += 2
                continue
            return i + 1
        i += 1
    raise MiniYAMLError(no, "a quoted string that does not end")


def _skip(text, pos):
    while pos < len(text) and text[pos] == " ":
        pos += 1
    return pos


_ESCAPES = {"n": "\n", "t": "\t", '"': '"', "\\": "\\", "/": "/", "0": "\0"}


def _scalar(no, text):
    if text[:1] == '"':
        if len(text) < 2 or text[-1] != '"':
            raise MiniYAMLError(no, "bad double-quoted string %s" % text)
        out, i, body = [], 0, text[1:-1]
        while i < len(body):
            if body[i] == "\\":
                if i + 1 >= len(body) or body[i + 1] not in _ESCAPES:
                    raise MiniYAMLError(no, "unknown escape in %s" % text)
                out.append(_ESCAPES[body[i + 1]])
                i += 2
            else:
                out.append(body[i])
                i += 1
        return "".join(out)
    if text[:1] == "'":
        if len(text) < 2 or text[-1] != "'":
            raise MiniYAMLError(no, "bad single-quoted string %s" % text)
        return text[1:-1].replace("''", "'")
    if text[:1] in _UNSUPPORTED:
        raise MiniYAMLError(no, "%r: anchors, tags and block strings are not supported here" % text)
    low = text.lower()
    if low in ("", "~", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    if _INT.match(text):
        return int(text)
    if _FLOAT.match(text):
        return float(text)
    return text
