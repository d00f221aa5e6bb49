"""Reading and writing data files with errors that name the file, the line and the field.

Bad input stops with a `DataError`, unless the caller asked to skip bad lines: then `BadLines` counts what was
skipped and why, so nothing is dropped silently. Files are written through a temporary file and renamed, so an
interrupted run never leaves a half-written file where a good one was.
"""
import json
import os
import tempfile
from collections import Counter
from pathlib import Path


class DataError(ValueError):
    def __init__(self, path, line, problem, field=None):
        self.path, self.line, self.field, self.problem = str(path), line, field, problem
        # line: a line number, or a label such as "record 12" for the items of a JSON array
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: " + (f"field {field!r}: " if field else "") + problem)


class BadLines:
    """Either raise on the first bad line, or (skip=True) count skipped lines by reason."""

    def __init__(self, skip=False):
        self.skip = skip
        self.reasons = Counter()
        self.examples = {}

    def handle(self, error: DataError):
        if not self.skip:
            raise error
        reason = (f"field {error.field!r}: " if error.field else "") + error.problem
        self.reasons[reason] += 1
        self.examples.setdefault(reason, f"{error.path}:{error.line}")

    @property
    def count(self):
        return sum(self.reasons.values())

    def summary(self):
        if not self.count:
            return "skipped lines: 0"
        lines = [f"skipped lines: {self.count}"]
        lines += [f"  {n} x {reason} (first at {self.examples[reason]})" for reason, n in self.reasons.most_common()]
        return "\n".join(lines)


def read_text(path) -> str:
    """The file as text (UTF-8, BOM allowed); undecodable bytes are an error naming the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "file not found")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(path, line, f"not valid UTF-8 (byte {raw[err.start]:#04x} at offset {err.start}); re-save the file as UTF-8") from err


def iter_json_lines(path, bad_lines: BadLines = None):
    """(line number, object) for each non-blank line of a JSON-lines file."""
    bad_lines = bad_lines or BadLines()
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            bad_lines.handle(DataError(path, number, f"not valid JSON ({err.msg} at column {err.colno})"))


def iter_json_records(path, bad_lines: BadLines = None):
    """(line number, object) from a JSON array file or a JSON-lines file (detected from the first character)."""
    text = read_text(path)
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(path, err.lineno, f"not valid JSON ({err.msg} at column {err.colno})") from err
        # A JSON array has no line per record: errors name the record's position instead.
        for index, record in enumerate(records, start=1):
            yield f"record {index}", record
    else:
        yield from iter_json_lines(path, bad_lines)


def require_str(record, field, path, line, allow_empty=False):
    """record[field] as a string, or a DataError naming the problem."""
    if not isinstance(record, dict):
        raise DataError(path, line, f"expected a JSON object, got {type(record).__name__}")
    if field not in record:
        raise DataError(path, line, "missing", field)
    value = record[field]
    if not isinstance(value, str):
        raise DataError(path, line, f"expected a string, got {type(value).__name__}", field)
    if not allow_empty and not value.strip():
        raise DataError(path, line, "empty", field)
    return value


def write_atomic(path, text: str):
    """Write text to path through a temporary file in the same folder, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def write_jsonl(path, records):
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
