"""Every script's --help: its description is the docstring's first paragraph, whole, and each flag shows the value
that same command line runs with (the config parse_config returns without --help) and where it comes from (your
flag, the preset of --data X, the default)."""
import dataclasses
import re
import sys

import pytest

import attention_copy
import attention_distill
from conftest import run_script
import ensemble
import evaluate
import finetune
import mae_pretrain
import tools.benchmark as benchmark
import tools.reproduce as reproduce
from util.launch import parse_config

# script -> (module, its config class)
SCRIPTS = {'finetune.py': (finetune, finetune.FinetuneConfig),
           'attention_copy.py': (attention_copy, attention_copy.CopyConfig),
           'attention_distill.py': (attention_distill, attention_distill.DistillConfig),
           'mae_pretrain.py': (mae_pretrain, mae_pretrain.MAEConfig),
           'ensemble.py': (ensemble, ensemble.EnsembleConfig),
           'evaluate.py': (evaluate, evaluate.EvaluateConfig), 'reproduce.py': (reproduce, reproduce.ReproduceConfig),
           'benchmark.py': (benchmark, benchmark.BenchConfig)}


def help_of(monkeypatch, capsys, module, *args):
    """What `python <script> args --help` prints, through the script's own main() (its way to its presets)."""
    monkeypatch.setattr(sys, 'argv', [f'{module.__name__}.py', *args, '--help'])
    with pytest.raises(SystemExit) as stop:
        module.main()
    assert stop.value.code == 0
    return capsys.readouterr().out


def description(text):
    """The paragraph after the usage line."""
    return ' '.join(text.split('\n\n')[1].split())


def flag_lines(text):
    """{field name: its help text, wrapped lines joined}."""
    out, name = {}, None
    for line in text.splitlines():
        m = re.match(r'  --([\w-]+)(?: [A-Z]+(?: \[[A-Z]+ \.\.\.\])?)?(?:\s+(.*))?$', line)
        if m:
            name = m[1].replace('-', '_')
            out[name] = m[2] or ''
        elif name and re.match(r'\s{4,}\S', line):
            out[name] = f'{out[name]} {line.strip()}'.strip()
        else:
            name = None
    return out


def written(value):
    """A value as it is typed on a command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ' '.join(map(str, value))
    return 'none' if value is None else "''" if value == '' else str(value)


@pytest.mark.parametrize('script', SCRIPTS)
def test_the_description_is_the_docstrings_first_paragraph_whole(monkeypatch, capsys, script):
    module, cls = SCRIPTS[script]
    text = help_of(monkeypatch, capsys, module)
    first = ' '.join(module.__doc__.strip().split('\n\n')[0].split())
    assert description(text) == first and re.search(r'[.!?]$', first), description(text)
    assert set(flag_lines(text)) == {f.name for f in dataclasses.fields(cls)}      # every flag listed


@pytest.mark.parametrize('script, args, presets, label', [
    ('attention_distill.py', ['--data', 'fashion-mnist', '--teacher', 't.pt'], attention_distill.PRESETS,
     'preset of --data fashion-mnist'),
    ('attention_distill.py', ['--teacher', 't.pt'], attention_distill.PRESETS,
     'preset of --data fashion-mnist'),   # the default data set's
    ('attention_copy.py', ['--data', 'imagenet', '--epochs', '30'], attention_copy.PRESETS, 'preset of --data imagenet'),
    ('finetune.py', ['--data', 'imagenet', '--scratch', 'true'], {**finetune.PRESETS, **finetune.SCRATCH},
     'preset of --data imagenet'),
    ('mae_pretrain.py', ['--data', 'cifar10'], mae_pretrain.PRESETS, 'preset of --data cifar10'),
    ('reproduce.py', ['--quick', 'true'], {k: {**v, **reproduce.QUICK} for k, v in reproduce.PRESETS.items()},
     'preset of --data fashion-mnist with --quick true'),
])
def test_each_flag_shows_the_value_this_command_line_runs_with(monkeypatch, capsys, script, args, presets, label):
    """The value beside each flag is the one parse_config gives the same line without --help, and its source is
    where that value was set: on the line, in --data's preset, or the dataclass default."""
    module, cls = SCRIPTS[script]
    lines = flag_lines(help_of(monkeypatch, capsys, module, *args))
    cfg = parse_config(cls, presets, args)
    preset = presets[cfg.data]
    for name, value in dataclasses.asdict(cfg).items():
        source = 'your flag' if f"--{name.replace('_', '-')}" in args else label if name in preset else 'default'
        assert lines[name].startswith(f'{written(value)} ({source})'), (name, lines[name])


def test_the_distill_preset_on_the_command_line(monkeypatch, capsys):
    """The case a newcomer met: the dataclass says 10 epochs and no global pooling, the preset 9 and pooling."""
    lines = flag_lines(help_of(monkeypatch, capsys, attention_distill, '--data', 'fashion-mnist'))
    assert lines['epochs'] == '9 (preset of --data fashion-mnist)'
    assert lines['global_pool'].startswith('true (preset of --data fashion-mnist)')
    assert 'only cuts the run short' in lines['max_steps'] and '--epochs' in lines['max_steps']   # not a short run
    assert lines['weight'] == '3.0 (default); w: weight of the attention loss'   # the field's comment


def test_help_from_the_command_line(tmp_path):
    """`python attention_distill.py --data fashion-mnist --help` itself: exit 0, nothing written, no run started."""
    p = run_script('attention_distill.py', '--data', 'fashion-mnist', '--out-dir', tmp_path / 'run', '--help')
    assert p.returncode == 0 and p.stderr == '', p.stderr[-2000:]
    assert description(p.stdout).startswith('Attention distillation (Li et al. 2024, sec. 3.2)')
    assert flag_lines(p.stdout)['epochs'] == '9 (preset of --data fashion-mnist)'
    assert not (tmp_path / 'run').exists()


def test_a_first_parse_that_picks_the_presets_prints_no_help(capsys):
    """parse_config(checked=False) (finetune.py's --scratch, reproduce.py's --quick) reads a line with --help as it
    reads the same line without: the parse after it, with the presets chosen, prints the help."""
    argv = ['--data', 'fake', '-h', '--epochs', '2', '--help']
    cfg = parse_config(finetune.FinetuneConfig, finetune.PRESETS, argv, checked=False)
    assert (cfg.data, cfg.epochs, cfg.batch_size) == ('fake', 2, 32) and capsys.readouterr().out == ''
    with pytest.raises(SystemExit) as stop:
        parse_config(finetune.FinetuneConfig, finetune.PRESETS, argv)
    assert stop.value.code == 0 and '--epochs' in capsys.readouterr().out
