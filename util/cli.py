"""
A config dataclass (util/config.py) becomes its script's command line: `--key-name VALUE` for each field, typed
by its annotation; `--data` picks a preset applied before your flags; `--help` lists every flag with the value this
command line runs with, where that value comes from (default, preset, your flag) and the field's help sentence.
Wrong types exit at once with one line; values out of range are ConfigError (config.check), before anything is made.
"""
import argparse
import dataclasses
import sys
import textwrap
import typing
from dataclasses import asdict

from util.config import check, declared, flag, show
from util.engine import say

class _Parser(argparse.ArgumentParser):
    def error(self, message):     # one line, non-zero exit, no usage dump
        sys.exit(f'{self.prog}: error: {message} (see --help)')


class _Help(argparse.HelpFormatter):
    """argparse's layout, with room for the longest flags and no line broken inside a --flag-name."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=30)

    def _split_lines(self, text, width):
        return textwrap.wrap(' '.join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text, width, indent):
        return textwrap.fill(' '.join(text.split()), width, initial_indent=indent, subsequent_indent=indent,
                             break_on_hyphens=False)


def _converter(tp):
    if typing.get_origin(tp) is typing.Union:   # Optional[X]
        inner = _converter(typing.get_args(tp)[0])
        return lambda s: None if s.lower() == 'none' else inner(s)
    if tp is bool:
        def to_bool(s):
            if s.lower() in ('1', 'true', 'yes', 'on'):
                return True
            if s.lower() in ('0', 'false', 'no', 'off'):
                return False
            raise argparse.ArgumentTypeError(f"expected true/false, got '{s}'")
        return to_bool
    return tp


def _metavar(tp):
    return _metavar(typing.get_args(tp)[0]) if typing.get_origin(tp) in (typing.Union, list) else tp.__name__.upper()


def parse_config(cls, presets=None, argv=None, preset_label='preset of --data {}'):
    """cls's defaults < presets[--data] < command line. Unknown keys and bad values are errors:
    wrong types exit at once, values out of range raise ConfigError (check), before anything is made.
    --help prints every flag's value for this command line (preset_label names where a preset's come from)."""
    presets, defaults = presets or {}, asdict(cls())
    given = vars(parser(cls, presets).parse_args(argv))
    data = given.get('data', defaults.get('data'))
    preset = presets.get(data, {})
    for k in preset:
        assert k in defaults, f'preset key {k} is not a config field'
    if given.pop('help', False):   # before check(): the help of a line that would be refused is still shown
        notes = {k: md['help'] for k, md in declared(cls).items() if md.get('help')}
        label = preset_label.format(data)
        source = {k: 'your flag' if k in given else label if k in preset else 'default' for k in defaults}
        values = {**defaults, **preset, **given}
        helps = {k: f"{word(v)} ({source[k]}){'; ' + notes[k] if k in notes else ''}" for k, v in values.items()}
        say(parser(cls, presets, helps).format_help())   # `| head` may close the pipe: no traceback
        sys.exit(0)
    return check(cls(**{**defaults, **preset, **given}))


def parser(cls, presets, helps=None):
    """The command line of a config: --key-name VALUE for each field, typed by its annotation; helps: {field: its
    line in --help} ('%' escaped: argparse formats help strings)."""
    hints, helps = typing.get_type_hints(cls), helps or {}
    doc = ' '.join((sys.modules[cls.__module__].__doc__ or '').strip().split('\n\n')[0].split())
    epilog = f"--data picks a preset ({', '.join(presets)}), applied before your flags: `--data X --help` shows the " \
             f"values under X's." if presets else None
    p = _Parser(allow_abbrev=False, add_help=False, description=doc, usage='%(prog)s [--flag value ...]',
                formatter_class=_Help, epilog=epilog)
    p.add_argument('-h', '--help', action='store_true', default=argparse.SUPPRESS,
                   help="show each flag's value for this command line, where it comes from, and what it means")
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        many = typing.get_origin(tp) is list    # list[X]: --key a b c
        p.add_argument(flag(f.name), dest=f.name, nargs='+' if many else None,
                       type=_converter(typing.get_args(tp)[0] if many else tp), default=argparse.SUPPRESS,
                       metavar=_metavar(tp), help=helps.get(f.name, '').replace('%', '%%'))
    return p


def without_help(argv=None):
    """argv (None: sys.argv[1:]) without -h / --help: for a parse that only picks the presets, before the one that
    prints the help with them (finetune.py's --scratch, reproduce.py's --quick)."""
    return [a for a in (sys.argv[1:] if argv is None else argv) if a not in ('-h', '--help')]

# -----------------------------------------------------------------------------
# --help: each flag's value written as on the command line, and the field's help


def word(value):
    """A value as it is written on the command line: true / false, none, '' for an empty string."""
    if isinstance(value, bool):
        return str(value).lower()
    return 'none' if value is None else "''" if value == '' else show(value)
