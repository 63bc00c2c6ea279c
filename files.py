"""
The small files that runs and reports leave behind and read back (done.json, results.json, ensemble.json,
metrics.jsonl, ...), and the folders they go in.

A file cut short by a kill or a full disk, edited by hand, or written by another program is one error
naming the file and the fix, never a traceback; a JSON file is written to a temporary file and renamed, so
that it is never left half written; an output folder that cannot be written is refused before any work.
"""
import json
import os

from config import ConfigError


class DamagedFile(ConfigError):
    """A file that does not hold what the program that wrote it writes."""


def read_json(path, fix, keys=None):
    """The JSON object in `path`. keys: {key: type or tuple of types} it must hold. Otherwise DamagedFile:
    '<path> <what is wrong>: <fix>'."""
    try:
        with open(path, 'rb') as f:
            record = json.loads(f.read())
    except OSError as e:
        raise DamagedFile(f'{path}: cannot read it ({e.strerror}): {fix}') from None
    except ValueError as e:   # JSONDecodeError, or bytes that are not UTF-8
        raise DamagedFile(f'{path} is not JSON, cut short or damaged ({e}): {fix}') from None
    if not isinstance(record, dict):
        raise DamagedFile(f'{path} holds a JSON {type(record).__name__}, not the object expected: {fix}')
    bad = [k for k, kind in (keys or {}).items() if not isinstance(record.get(k), kind)]
    if bad:
        raise DamagedFile(f"{path} lacks {', '.join(bad)} (missing or of another kind): {fix}")
    return record


def read_jsonl(path, fix):
    """The JSON objects of a JSON-lines file, one a line (blank lines skipped). A line that is not one (a
    record cut short by a kill, say) is DamagedFile naming the file and the line."""
    try:
        with open(path, 'rb') as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise DamagedFile(f'{path}: cannot read it ({e.strerror}): {fix}') from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            records.append(None)
        if not isinstance(records[-1], dict):
            raise DamagedFile(f'{path}: line {n} is not a JSON record (cut short?): {fix}')
    return records


def write_json(path, record):
    """`record` as indented JSON, to path + '.tmp' and then renamed over path: a reader never sees half a file,
    and a failed write (a full disk) leaves the file as it was, and no .tmp beside it."""
    try:
        with open(path + '.tmp', 'w') as f:
            json.dump(record, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + '.tmp', path)
    finally:
        if os.path.exists(path + '.tmp'):
            os.remove(path + '.tmp')


def check_out_dir(path, flag):
    """Refuse, before any work, a folder to write into that is a file, lies under a file, or cannot be made
    or written there (no permission, a read-only file system). Makes nothing."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f'{flag} {path} is a file, not a folder: choose another {flag}')
    parent = path
    while not os.path.exists(parent):   # the nearest folder that exists: the one written into, or made in
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f'{flag} {path}: {parent} is a file, so no folder can be made there: choose another {flag}')
    if not os.access(parent, os.W_OK | os.X_OK):   # also false on a read-only file system, for root too
        raise ConfigError(f'{flag} {path}: {parent} cannot be written (read-only, or no permission): choose '
                          f'another {flag}')
