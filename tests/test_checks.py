"""Every field of every script's and tool's config against bad values, in one table of the scripts: each field meets
the values a user types by mistake (nan, inf, a huge or negative number, text, nothing) and gives one line and a
non-zero exit, or parses where the value is valid, never a traceback or a hang; a number without an upper bound is
refused. Each rule of BAD stops the script in parse_config, before it makes or loads anything, with one line naming
the flag and what is allowed. A new field needs a row in BAD (or a place in FREE, if every value parses and is
checked where it is used); --help beside a bad value prints the help."""
import dataclasses
import os
import re
import signal
import sys
import typing

import pytest

import attention_copy
import attention_distill
from conftest import TINY, assert_one_line_error, run_in_process, run_script
from conftest import finetune as finetune_tiny
import ensemble
import evaluate
import finetune
import mae_pretrain
import tools.benchmark as benchmark
import tools.features as features
import tools.reproduce as reproduce
from util.config import ConfigError, declared
from util.launch import parse_config, run_main

# script -> (module, config class, its presets as its command line picks them, the flags of a run that would
# otherwise go ahead)
SCRIPTS = {
    'finetune.py': (finetune, finetune.FinetuneConfig, finetune.presets,
                    [*TINY, '--out-dir', 'run', '--max-steps', '1']),
    'attention_copy.py': (attention_copy, attention_copy.CopyConfig, attention_copy.PRESETS,
                          [*TINY, '--out-dir', 'run', '--max-steps', '1', '--teacher', 'missing.pt']),
    'attention_distill.py': (attention_distill, attention_distill.DistillConfig, attention_distill.PRESETS,
                             [*TINY, '--out-dir', 'run', '--max-steps', '1', '--teacher', 'missing.pt']),
    'mae_pretrain.py': (mae_pretrain, mae_pretrain.MAEConfig, mae_pretrain.PRESETS,
                        [*TINY, '--out-dir', 'run', '--max-steps', '1']),
    'ensemble.py': (ensemble, ensemble.EnsembleConfig, ensemble.PRESETS, [*TINY, '--models', 'missing.pt']),
    'reproduce.py': (reproduce, reproduce.ReproduceConfig, reproduce.PRESETS,
                     [*TINY, '--out-dir', 'runs', '--results-dir', 'res', '--teacher', 'missing.pt']),
    'evaluate.py': (evaluate, evaluate.EvaluateConfig, {},
                    ['--models', 'missing.pt', '--imagenet', 'val', '--out', 'res']),
    'benchmark.py': (benchmark, benchmark.BenchConfig, getattr(benchmark, 'PRESETS', {}),
                     ['--quick', 'true', '--out-dir', 'bench']),
    'features.py': (features, features.FeaturesConfig, {},
                    ['--models', 'missing.pt', 'other.pt', '--teacher', 'missing.pt', '--out-dir', 'feat']),
}
TRAIN = ['finetune.py', 'attention_copy.py', 'attention_distill.py', 'mae_pretrain.py']
OWN_SIZE = ['finetune.py', 'mae_pretrain.py']    # the transfer scripts take the teacher's size, patch and heads

# (scripts, field, bad values) -> each value, given as --field value, must be refused naming --field
BAD = [
    (TRAIN, 'data', [['nosuchdata']]),
    (TRAIN, 'val_size', [['-1']]),
    (TRAIN, 'out_dir', [['']]),
    (TRAIN, 'model', [['vit_nope']]),
    (TRAIN, 'img_size', [['0']]),
    (OWN_SIZE, 'img_size', [['1000000']]),     # 62 billion patches: refused before a tensor is made
    (OWN_SIZE, 'img_size', [['30']]),          # not a multiple of the preset's patch 8
    (OWN_SIZE, 'patch_size', [['0'], ['-4']]),
    (['attention_copy.py', 'attention_distill.py'], 'patch_size', [['-1']]),   # 0 is allowed: the teacher's
    (TRAIN, 'embed_dim', [['0']]),
    (OWN_SIZE, 'embed_dim', [['100']]),        # 3 heads do not divide it
    (TRAIN, 'depth', [['0']]),
    (OWN_SIZE, 'depth', [['1000000']]),        # a million blocks: refused before the first is built
    (TRAIN, 'num_heads', [['0']]),
    (OWN_SIZE, 'num_heads', [['5']]),
    (TRAIN, 'drop_path', [['-0.1'], ['1'], ['2'], ['nan']]),
    (TRAIN, 'hflip', [['-0.5'], ['1.5']]),
    (TRAIN, 'crop_pad', [['-1']]),
    (TRAIN, 'min_scale', [['0'], ['1.5']]),
    (TRAIN, 'randaug', [['9'], ['rand-x9'], ['torchvision']]),
    (TRAIN, 'reprob', [['-0.1'], ['1.1']]),
    (TRAIN, 'mixup', [['-1'], ['inf']]),
    (TRAIN, 'cutmix', [['-1']]),
    (TRAIN, 'smoothing', [['-0.1'], ['1'], ['2']]),
    (TRAIN, 'epochs', [['0'], ['-1']]),
    (TRAIN, 'warmup_epochs', [['-1']]),
    (TRAIN, 'batch_size', [['0']]),
    (TRAIN, 'eval_batch_size', [['-1'], ['8']]),   # 8: below the fake preset's batch of 32
    (TRAIN, 'accum_steps', [['0']]),
    (TRAIN, 'blr', [['-1'], ['nan']]),
    (TRAIN, 'min_lr', [['-0.000001']]),
    (TRAIN, 'min_lr_ratio', [['-0.1'], ['1']]),
    (TRAIN, 'weight_decay', [['-0.05']]),
    (TRAIN, 'layer_decay', [['0'], ['1.5']]),
    (TRAIN, 'layer_decay_offset', [['-1']]),
    (TRAIN, 'beta2', [['1'], ['-0.1']]),
    (TRAIN, 'clip_grad', [['-1']]),
    (TRAIN, 'ema', [['1'], ['-0.5']]),
    (TRAIN, 'amp', [['fp32']]),
    (TRAIN, 'attn_implementation', [['flash']]),
    (TRAIN, 'compile', [['yes']]),
    (TRAIN, 'cuda_graph', [['yes']]),
    (TRAIN, 'seed', [['-1'], [str(2 ** 70)]]),     # 2**70: torch's generators take 64 bits
    (TRAIN, 'num_workers', [['-1']]),
    (TRAIN, 'fake_size', [['0']]),
    (TRAIN, 'log_every', [['0']]),
    (TRAIN, 'save_every', [['-1']]),
    (TRAIN, 'max_steps', [['-1']]),
    (TRAIN, 'dist_timeout', [['0'], ['-5']]),
    (['attention_copy.py', 'attention_distill.py'], 'teacher', [['']]),
    (['attention_copy.py', 'attention_distill.py'], 'layers', [['x'], ['3-1']]),
    (['attention_copy.py', 'attention_distill.py'], 'heads', [['0,,1']]),
    (['attention_copy.py', 'attention_distill.py'], 'layer_map', [['0-2'], ['0:1,0:2']]),
    (['attention_copy.py', 'attention_distill.py'], 'transfer', [['qk']]),
    (['attention_copy.py', 'attention_distill.py'], 'average_maps', [['images'], ['mean']]),
    (['attention_copy.py', 'attention_distill.py'], 'student_arch', [['vit']]),
    (['attention_copy.py', 'attention_distill.py'], 'teacher_num_heads', [['-1']]),
    (['finetune.py'], 'init_num_heads', [['-1']]),
    (['attention_distill.py'], 'weight', [['-1'], ['nan']]),
    (['attention_distill.py'], 'maps', [['random'], ['none']]),
    (['finetune.py', 'mae_pretrain.py'], 'layer_scale', [['-1'], ['nan']]),
    (['mae_pretrain.py', 'finetune.py'], 'act', [['relu']]),
    (['mae_pretrain.py'], 'global_pool', [['true']]),
    (['mae_pretrain.py'], 'mixup', [['0.8']]),
    (['mae_pretrain.py'], 'cutmix', [['1']]),
    (['mae_pretrain.py'], 'mask_ratio', [['0'], ['1'], ['0.99']]),   # 16 patches: 0.99 keeps none
    (['mae_pretrain.py'], 'decoder_dim', [['0']]),
    (['mae_pretrain.py'], 'decoder_depth', [['0']]),
    (['mae_pretrain.py'], 'decoder_heads', [['0'], ['5']]),
    (['ensemble.py'], 'data', [['nosuchdata']]),
    (['ensemble.py'], 'models', [[]]),
    (['ensemble.py', 'evaluate.py'], 'num_heads', [['-1'], ['8', '8']]),   # for one model: one count, or one each
    (['ensemble.py'], 'weights', [['nan'], ['-1'], ['0'], ['1', '2']]),
    (['ensemble.py'], 'val_size', [['-1']]),
    (['ensemble.py', 'evaluate.py'], 'img_size', [['-1']]),
    (['ensemble.py', 'evaluate.py'], 'batch_size', [['0']]),
    (['ensemble.py', 'evaluate.py'], 'num_workers', [['-1']]),
    (['ensemble.py', 'evaluate.py'], 'amp', [['fp32']]),
    (['ensemble.py', 'evaluate.py'], 'attn_implementation', [['flash']]),
    (['ensemble.py'], 'fake_size', [['0']]),
    (['ensemble.py', 'evaluate.py'], 'seed', [['-1'], [str(2 ** 70)]]),
    (['evaluate.py'], 'data', [['nosuchdata']]),
    (['evaluate.py'], 'shift', [['sideways'], ['invert']]),     # invert: only a --data test split is shifted
    (['reproduce.py'], 'data', [['imagenet']]),
    (['reproduce.py'], 'seeds', [['1', '1'], ['-1']]),
    (['reproduce.py'], 'val_size', [['-1']]),
    (['reproduce.py'], 'blr', [['-1']]),
    (['reproduce.py'], 'mae_epochs', [['0']]),
    (['reproduce.py'], 'epochs', [['0']]),
    (['reproduce.py'], 'max_steps', [['-1']]),
    (['reproduce.py'], 'num_workers', [['-1']]),
    (['reproduce.py'], 'fake_size', [['0']]),
    (['reproduce.py'], 'jobs', [['-1']]),
    (['reproduce.py'], 'batch_size', [['-1']]),
    (['reproduce.py'], 'amp', [['fp8']]),
    (['benchmark.py'], 'models', [['vit_nope']]),
    (['benchmark.py'], 'methods', [['nope'], ['train', 'nope']]),
    (['benchmark.py'], 'profile', [['nope']]),
    (['benchmark.py'], 'device', [['gpu']]),
    (['benchmark.py'], 'batch_size', [['-1']]),
    (['benchmark.py'], 'memory_batch_size', [['-2']]),
    (['benchmark.py'], 'fill', [['0'], ['1.5']]),
    (['benchmark.py'], 'img_size', [['30']]),
    (['benchmark.py'], 'patch_size', [['0'], ['-16']]),
    (['benchmark.py'], 'depth', [['-1']]),
    (['benchmark.py'], 'rounds', [['0']]),
    (['benchmark.py'], 'steps', [['0']]),
    (['benchmark.py'], 'warmup', [['-1']]),
    (['benchmark.py'], 'distill_frac', [['0'], ['1.5']]),
    (['benchmark.py'], 'copy_frac', [['0'], ['1.5']]),
    (['benchmark.py'], 'embed_dim', [['-1']]),
    (['benchmark.py'], 'num_heads', [['-1']]),
    (['benchmark.py'], 'num_classes', [['0']]),
    (['benchmark.py'], 'paths', [['nope']]),
    (['benchmark.py'], 'threads', [['-1']]),
    (['benchmark.py'], 'gemm_size', [['0']]),
    (['features.py'], 'images', [['-1']]),
    (['features.py'], 'blocks', [['nope']]),
    (['features.py'], 'batch_size', [['0']]),
]
# fields whose every value parses: booleans (a wrong word is a parse error), and files, directories and
# names that are checked where they are used (test_rundir.py, test_resume.py, test_ensemble.py)
FREE = {'data_dir', 'resume', 'saved_bytes', 'timing', 'norm_pre', 'global_pool', 'compile', 'init', 'new_teacher', 'new_data', 'norm_pix_loss', 'out', 'overwrite',
        'teacher', 'quick', 'scratch', 'out_dir', 'results_dir', 'export', 'models', 'ensembles', 'imagenet', 'imagenet_v2',
        'imagenet_sketch', 'imagenet_r', 'imagenet_a', 'replace_results', 'dirty'}
# one case per rule: a row of BAD runs on one of its scripts, taken in turn so that every script is exercised;
# the others share the rule through their config's base class (test_shared_rules_are_in_every_script)
CASES = [(scripts[k % len(scripts)], field, values) for k, (scripts, field, values) in enumerate(BAD)]


@pytest.mark.parametrize('script, field, values', CASES, ids=[f'{s}:{f}' for s, f, _ in CASES])
def test_bad_value_is_one_line_naming_the_flag(monkeypatch, tmp_path, capsys, script, field, values):
    module, _, _, base = SCRIPTS[script]
    monkeypatch.chdir(tmp_path)
    flag = '--' + field.replace('_', '-')
    for value in values:
        argv = [*base, flag, *value] if value else [a for a in base if a not in ('--models', 'missing.pt')]
        monkeypatch.setattr(sys, 'argv', [script, *argv])
        with pytest.raises(SystemExit) as e:
            run_main(module.main)
        msg = e.value.code
        assert isinstance(msg, str), f'{script} {flag} {value}: exit code {msg!r}, expected a message'
        assert msg.startswith('error: ') and '\n' not in msg, msg
        assert re.match(f'error: {flag}\\b', msg), f'{script} {flag} {value}: the message names another cause: {msg}'
        assert capsys.readouterr().err == ''
        assert os.listdir(tmp_path) == [], f'{script} {flag} {value} made {os.listdir(tmp_path)}'


@pytest.mark.parametrize('script', [s for s in SCRIPTS if sum(s in group for group, _, _ in BAD if len(group) > 1)])
def test_shared_rules_are_in_every_script(script):
    """A rule BAD gives several scripts is tested on one of them: every other one must check that field too."""
    cls = SCRIPTS[script][1]
    checked = {row[0] for row in cls().checks()} | {k for k, md in declared(cls).items()
                                                    if md.get('rule') or md.get('choices')}
    if 'randaug' in declared(cls):   # read in parse_config by util/augment.randaugment
        checked.add('randaug')
    shared = {field for group, field, _ in BAD if len(group) > 1 and script in group}
    assert not shared - checked, f'{script} does not check {sorted(shared - checked)}'


@pytest.mark.parametrize('script', SCRIPTS)
def test_every_field_is_checked(script):
    """A field with neither a row in BAD nor a place in FREE fails here: add its bad values."""
    fields = {f.name for f in dataclasses.fields(SCRIPTS[script][1])}
    tested = {field for scripts, field, _ in BAD if script in scripts}
    assert not fields - tested - FREE, f'{script}: no bad values for {sorted(fields - tested - FREE)}'


VALUES = ['nan', 'inf', '-inf', '1e309', '-1', '0', '1e20', '1e308', 'text', '', str(10 ** 20)]
NUMBERS = (int, float)


def kind(cls, field):
    """The element type of a field: int, float, str, bool (a list's or an Optional's own)."""
    tp = typing.get_type_hints(cls)[field.name]
    while typing.get_origin(tp) in (list, typing.Union):
        tp = typing.get_args(tp)[0]
    return tp


def outcome(cls, presets, argv):
    """'ok', or the one line the command ends with; anything else (a traceback, a hang) fails the test."""
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail(f'{argv}: no answer within 10 s'))
    signal.alarm(10)
    try:
        parse_config(cls, presets(argv) if callable(presets) else presets, argv)
        return 'ok'
    except SystemExit as e:
        return str(e.code)
    except ConfigError as e:
        return f'error: {e}'
    finally:
        signal.alarm(0)


@pytest.mark.parametrize('script', SCRIPTS)
def test_every_option_meets_each_bad_value_in_one_line(script, monkeypatch):
    _, cls, presets, base = SCRIPTS[script]
    monkeypatch.setattr(sys, 'argv', [script])     # --help is not asked for
    for field in dataclasses.fields(cls):
        flag = '--' + field.name.replace('_', '-')
        for value in VALUES:
            said = outcome(cls, presets, [*base, flag, value])
            assert said == 'ok' or ('\n' not in said.strip() and 'Traceback' not in said), (script, flag, value, said)
            if kind(cls, field) in NUMBERS and value in ('nan', 'inf', '1e309') or \
                    kind(cls, field) is int and value == str(10 ** 20):   # sizes, counts, seeds: bounded above
                assert said != 'ok', f'{script} {flag} {value}: accepted, a number without a range'


@pytest.mark.parametrize('script', SCRIPTS)
def test_help_prints_beside_a_bad_value(script, monkeypatch):
    """`--blr nan --help` printed nothing: the value was refused first."""
    _, cls, presets, base = SCRIPTS[script]
    numeric = next(f for f in dataclasses.fields(cls) if kind(cls, f) in NUMBERS)
    flag = '--' + numeric.name.replace('_', '-')
    for value in ('nan', 'text'):
        argv = [*base, flag, value, '--help']
        monkeypatch.setattr(sys, 'argv', [script, *argv])
        with pytest.raises(SystemExit) as e:
            parse_config(cls, presets(argv) if callable(presets) else presets, argv)
        assert e.value.code in (0, None), (script, value, e.value.code)


@pytest.mark.parametrize('script, args, flag', [
    ('finetune.py', ['--batch-size', '0'], '--batch-size'),
    ('benchmark.py', ['--models', 'vit_nope'], '--models'),
])
def test_bad_value_from_the_shell(tmp_path, script, args, flag):
    """The same, as a user sees it: exit status 1, one line on stderr, nothing made."""
    base = SCRIPTS[script][3]
    p = run_script(*(['-m', 'tools.benchmark'] if script == 'benchmark.py' else [script]),
                   *[str(tmp_path / a) if a in ('run', 'bench') else a for a in base], *args)
    assert p.returncode == 1, p.stderr[-2000:]
    assert p.stderr.splitlines() == [p.stderr.strip()] and re.match(f'error: {flag}\\b', p.stderr), p.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('module', [attention_copy, attention_distill])
def test_a_missing_teacher_names_the_shipped_one(monkeypatch, tmp_path, module):
    """Without --teacher, --data fashion-mnist names the teacher the repository ships, as a path that reaches it
    from where the command runs; a data set with none shipped names one that downloads."""
    monkeypatch.chdir(tmp_path)
    msg = run_in_process(monkeypatch, module, '--data', 'fashion-mnist', '--out-dir', 'run')
    named = re.search(r'--teacher is required: --teacher (\S+) \(the MAE teacher this repository ships', msg or '')
    assert named and named[1].endswith('teachers/fashion-mnist-mae.pt') and os.path.isfile(named[1]), msg
    msg = run_in_process(monkeypatch, module, '--data', 'cifar10', '--out-dir', 'run')
    assert msg.startswith('error: --teacher is required: a name such as mae_vit_large') and 'teachers/' not in msg, msg
    assert os.listdir(tmp_path) == []


def test_unknown_config_key(tmp_path):
    assert_one_line_error(finetune_tiny(tmp_path / 'r', '--no-such-key', '1', check=False), '--no-such-key')


def test_a_layer_decay_offset_that_underflows_the_lr_scale(tmp_path, monkeypatch, depth2_run):
    """0.5 ** 2000 is 0.0: refused with the flag named (it ended in a ZeroDivisionError at the first log line).
    A teacher-sized student's depth is known only from its teacher: 0.5 ** (2 + 1074) is refused there."""
    msg = run_in_process(monkeypatch, finetune, *TINY, '--out-dir', tmp_path / 'r', '--layer-decay', '0.5',
                         '--layer-decay-offset', '2000')
    assert msg and msg.startswith('error: --layer-decay-offset 2000') and 'is 0 in floating point' in msg, msg
    assert not (tmp_path / 'r').exists()
    msg = run_in_process(monkeypatch, attention_distill, *TINY, '--out-dir', tmp_path / 'd', '--layer-decay', '0.5',
                         '--layer-decay-offset', '1074', '--teacher', depth2_run[0] / 'checkpoint.pt')
    assert msg and msg.startswith('error: --layer-decay-offset 1074') and 'is 0 in floating point' in msg, msg
    assert not (tmp_path / 'd').exists()        # refused: the folder it made is gone again
