"""
What a user reads. The refusals a user meets as one line: each names the file or the option, what is wrong, and the
fix, and util/launch.run_main prints it and exits non-zero, never a traceback. Every file of util/ raises them, so they
sit here, below all of them, with the words that spell a flag and its value (flag, show, word) and first_few, the way
a message lists what it found; and say, the print every line a command writes to its user goes through (the run's
log lines, --help, a script's results). This file imports nothing of the project.
"""
import os
import sys



class ConfigError(ValueError):
    """A setting that cannot run: the flag, its value, what is allowed."""


class DataError(RuntimeError):
    """Data that is missing, misplaced or damaged: the file and the fix."""


class CheckpointError(RuntimeError):
    """A file of weights that cannot be read or used: the file and the fix."""


class DamagedFile(ConfigError):
    """A run or report file that does not hold what the program that wrote it writes."""


class WriteError(ConfigError):
    """A file that could not be written whole (a full disk, a file size limit, a read-only disk); run_main adds how
    to continue the run, or to run the command again (AGAIN)."""


AGAIN = 'run the command again'   # what ends a line outside a run (a script that trains nothing; set-up)


def first_few(items):
    """Items named in a one-line message: the first three, then ' ...' where there are more."""
    shown = ', '.join(map(str, items[:3]))
    if len(items) > 3:
        shown += ' ...'
    return shown


def flag(name):
    return '--' + name.replace('_', '-')


def show(value):
    return ' '.join(map(str, value)) if isinstance(value, list) else str(value)


def word(value):
    """A value as it is written on the command line: true / false, none, '' for an empty string."""
    if isinstance(value, bool):
        return str(value).lower()
    return 'none' if value is None else "''" if value == '' else show(value)


def say(msg):
    """print(msg); where stdout cannot be written (`| head` has gone: a broken pipe; a full device) the command goes
    on, its files whole (log.txt holds every line), and stdout goes to /dev/null from then on."""
    try:
        print(msg, flush=True)
    except OSError:
        # what is buffered, and the rest, go there
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
