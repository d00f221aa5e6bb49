"""Reading and writing data files. Bad input is a `DataError` naming file, line and field, unless the caller skips bad
lines: `BadLines` then counts what was skipped and why. Files are written whole or not at all (write_atomic)."""
import json
import os
import re
import stat
import tempfile
from collections import Counter
from pathlib import Path

from utils.errors import UserError


# Line breaks to str.splitlines() and other line readers that json.dumps(ensure_ascii=False) leaves raw inside strings
# (it escapes those below U+0020): write_jsonl escapes them. The readers here split at \n only (text_lines).
LINE_BREAKS_IN_STRINGS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
FIELD_INDEX = re.compile(r"\[\d+\]")


def excerpt(text: str, limit=80) -> str:
    """repr of text for a message, cut after `limit` characters (with the full length) so a huge line stays short."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def json_shape(value) -> str:
    """A JSON value's types for a message ("[int, str]", "dict"), never the value: it may be huge or deeply nested."""
    if isinstance(value, list):
        return "[" + ", ".join(type(v).__name__ for v in value[:4]) + (", ..." if len(value) > 4 else "") + "]"
    return type(value).__name__


class DataError(UserError, ValueError):
    """A problem in an input file. BadLines counts by `reason`: the field without indices, then the kind of problem.
    `skippable`: BadLines raised it, i.e. --skip_bad_lines would have skipped it."""

    skippable = False

    @property
    def hint(self):
        return " (--skip_bad_lines skips such lines and counts them)" if self.skippable else ""

    def __init__(self, path, line, problem, field=None, reason=None):
        self.path, self.line, self.field, self.problem = str(path), line, field, problem
        self.reason = (f"field {FIELD_INDEX.sub('[]', field)!r}: " if field else "") + (reason or problem)
        # line: a line number, or a label such as "record 12" for the items of a JSON array
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: " + (f"field {field!r}: " if field else "") + problem)


class Tally:
    """Counts of problems by reason, with the locations of the first few of each."""

    def __init__(self):
        self.counts, self.examples = Counter(), {}

    def add(self, error: DataError):
        self.counts[error.reason] += 1
        examples = self.examples.setdefault(error.reason, [])
        if len(examples) < 3:
            examples.append(f"{error.path}:{error.line}")

    @property
    def total(self):
        return sum(self.counts.values())

    def lines(self):
        return [f"  {n} x {reason} (at {', '.join(self.examples[reason])}{', ...' if n > 3 else ''})"
                for reason, n in self.counts.most_common()]


class BadLines:
    """Either raise on the first bad line, or (skip=True) count skipped lines by reason. Problems that the standard
    reading repairs (an I- tag that opens an entity) are counted as repaired, or with strict_tags are bad lines."""

    def __init__(self, skip=False, strict_tags=False):
        self.skip, self.strict_tags = skip, strict_tags
        self.skipped, self.repaired = Tally(), Tally()

    def handle(self, error: DataError):
        if not self.skip:
            error.skippable = True
            raise error
        self.skipped.add(error)

    def repair(self, error: DataError):
        """Count a repaired problem; with strict_tags raise it instead, for the caller to handle as a bad line."""
        if self.strict_tags:
            raise error
        self.repaired.add(error)

    def kept(self, items, build):
        """(where, build(where, item)) for each (where, item) that build accepts; handle() takes the others' error."""
        for where, item in items:
            try:
                built = build(where, item)
            except DataError as err:
                self.handle(err)
                continue
            yield where, built

    @property
    def count(self):
        return self.skipped.total

    def summary(self):
        lines = [f"skipped lines: {self.count}", *self.skipped.lines()]
        if self.repaired.total:
            lines += [f"repaired: {self.repaired.total}", *self.repaired.lines()]
        return "\n".join(lines)


def special_file_kind(path) -> str:
    """What a path that exists but is neither a file nor a folder is, for a message."""
    mode = Path(path).stat().st_mode
    kinds = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"))
    return next((kind for test, kind in kinds if test(mode)), "neither a file nor a folder")


def read_text(path) -> str:
    """The file as text (UTF-8, BOM allowed); undecodable bytes are an error naming the line."""
    path = Path(path)
    if path.is_dir():
        raise DataError(path, None, "is a folder, not a file")
    if not path.is_file():
        if path.is_symlink() and not path.exists():
            raise DataError(path, None, f"is a symbolic link to {os.readlink(path)}, which does not exist or loops back")
        if not path.exists():
            raise DataError(path, None, "file not found")
        # Never opened: a FIFO would wait for a writer, a device could be read forever.
        raise DataError(path, None, f"is {special_file_kind(path)}, not a regular file; give a file")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(path, None, f"cannot read the file ({err.strerror})") from err
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(path, line, f"not valid UTF-8 (byte {raw[err.start]:#04x} at offset {err.start}); re-save the file as UTF-8") from err


def text_lines(text):
    """The lines of a text file split at \n only (a \r before it dropped), unlike str.splitlines()."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def parse_json(text, path, line=None):
    """json.loads, DataError for what it cannot read (line: where text starts; None: a whole file, its error's)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(path, line or err.lineno, f"not valid JSON ({err.msg} at column {err.colno})",
                        reason=f"not valid JSON ({err.msg})") from None
    except ValueError as err:  # an integer of more digits than Python converts
        raise DataError(path, line, f"cannot read the JSON ({err})", reason="cannot read the JSON") from None
    except RecursionError:
        raise DataError(path, line, "JSON nested too deeply to parse; flatten or remove it") from None


def check_surrogates(value, path, line, field=None):
    """Raise a DataError naming the field (below `field`) of the first string with a lone surrogate (half of a UTF-16
    pair, which a \\ud800-style escape can leave in a JSON string; it cannot be written as UTF-8)."""
    stack = [(field, value)]
    while stack:  # iterative: a record may be nested deeper than Python's recursion limit allows
        field, item = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                name = f"{field}.{key}" if field else key
                stack += [(name, key), (name, child)]  # the key is a string too
        elif isinstance(item, list):
            stack.extend((f"{field or ''}[{k}]", child) for k, child in enumerate(item))
        elif isinstance(item, str) and (found := LONE_SURROGATE.search(item)):
            raise DataError(path, line, f"lone surrogate {found.group()!r} (half of a UTF-16 pair, not a character); "
                            "fix or remove it", field, reason="lone surrogate (half of a UTF-16 pair)")


def iter_json_records(path, bad_lines: BadLines = None, lines_only=False):
    """(line number, object) per non-blank line of a JSON-lines file, or unless lines_only ("record N", object) of a
    JSON array file."""
    bad_lines = bad_lines or BadLines()
    text = read_text(path)
    if not lines_only and text.lstrip().startswith("["):
        items = [(f"record {index}", record) for index, record in enumerate(parse_json(text, path), start=1)]
    else:
        items = [(number, line) for number, line in enumerate(text_lines(text), start=1) if line.strip()]

    def record(where, item):
        value = parse_json(item, path, where) if isinstance(where, int) else item
        if "\\u" in (item if isinstance(where, int) else text):  # valid UTF-8: only an escape makes a surrogate
            check_surrogates(value, path, where)
        return value
    yield from bad_lines.kept(items, record)


def iter_json_lines(path, bad_lines: BadLines = None):  # JSON lines only, not an array
    return iter_json_records(path, bad_lines, lines_only=True)


def json_reader(build, spread=False):
    """A reader (path, bad_lines) of (line, build(record, path, line)) per JSON record, `(line, *built)` with spread."""
    def read(path, bad_lines: BadLines = None):
        bad_lines = bad_lines or BadLines()
        records = iter_json_records(path, bad_lines)
        for number, built in bad_lines.kept(records, lambda number, record: build(record, path, number)):
            yield (number, *built) if spread else (number, built)
    return read


def require_str(record, key, path, line, allow_empty=False, prefix=None):
    """record[key] as a string; errors name the field `prefix.key` (or `key`)."""
    field = f"{prefix}.{key}" if prefix else key
    value = require_key(require_type(record, dict, path, line, prefix and field), key, str, path, line, prefix)
    if not allow_empty and not value.strip():
        raise DataError(path, line, "empty", field)
    return value


def require_type(value, kind, path, line, field):
    """value, if it is of JSON type `kind` (dict, list, str, or int: a bool is no integer here)."""
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        name = {dict: "a JSON object", list: "a JSON array", str: "a string", int: "an integer"}[kind]
        raise DataError(path, line, f"expected {name}, got {type(value).__name__}", field)
    return value


def require_key(record, key, kind, path, line, prefix=None):
    """record[key] of type `kind`; errors name the field `prefix.key` (or `key`)."""
    field = f"{prefix}.{key}" if prefix else key
    if key not in record:
        raise DataError(path, line, "missing", field)
    return require_type(record[key], kind, path, line, field)


def fsync_path(path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomic(path, text: str):
    """Write text through a flushed temporary file renamed into place: after a crash the path holds the old text or
    the new, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    fsync_path(path.parent)


def write_jsonl(path, records):
    """One JSON object a line, UTF-8 kept readable but for LINE_BREAKS_IN_STRINGS."""
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    for char, escape in LINE_BREAKS_IN_STRINGS.items():
        text = text.replace(char, escape)
    write_atomic(path, text)
