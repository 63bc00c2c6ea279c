"""--resume true continues only the run that was saved (util/rundir.py): another setting, another global batch,
another teacher file, a damaged or foreign checkpoint are refused in one line before anything is written;
what may change is recorded in config.json; the time and the log go on; a non-finite loss stops with a true
message. The scripts run in this process (run_in_process), except the two processes under torchrun."""
import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import attention_distill
from conftest import (ROOT, SAME_MATHS, TINY, assert_one_line_error, ce_by_step, digest, free_port, read_metrics,
                      run_in_process, sub_env)
from conftest import finetune as finetune_tiny
import finetune


def train(monkeypatch, module, out, *args):
    msg = run_in_process(monkeypatch, module, *TINY, '--out-dir', out, *args)
    assert msg is None, msg


def edit_checkpoint(d, **changes):
    ck = torch.load(d / 'checkpoint.pt', weights_only=True)
    ck.update(changes)
    torch.save(ck, d / 'checkpoint.pt')
    return ck


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    """A tiny run stopped after 2 of its 8 steps (ViT-Tiny's 3 heads), and a copy to change per test."""
    d = tmp_path_factory.mktemp('resume') / 'run'
    with pytest.MonkeyPatch.context() as mp:
        train(mp, finetune, d, '--max-steps', '2', '--amp', 'off')

    def copy(tmp_path):
        shutil.copytree(d, tmp_path / 'run')
        return tmp_path / 'run'
    return d, copy

# -----------------------------------------------------------------------------
# What may not change


@pytest.mark.parametrize('change, says', [
    (['--num-heads', '4'], '--num-heads None -> 4'),       # same tensor shapes, another model
    (['--epochs', '3'], '--epochs 1 -> 3'),                # another schedule
    (['--blr', '0.01', '--smoothing', '0'], '--smoothing 0.1 -> 0.0; --blr 0.001 -> 0.01'),
    (['--batch-size', '16'], 'global batch 32 (--batch-size 32 x --accum-steps 1 x 1 process(es)) -> 16'),
    (['--amp', 'bf16'], '--amp off -> bf16'),
])
def test_resume_refuses_another_run(monkeypatch, saved, change, says):
    d, _ = saved
    before = digest(d)
    msg = run_in_process(monkeypatch, finetune, *TINY, '--out-dir', d, '--amp', 'off', '--resume', 'true', *change)
    assert msg and msg.startswith('error: --resume: ') and says in msg, msg
    assert digest(d) == before                              # config.json, log, metrics, checkpoint untouched


def test_each_config_names_what_may_change():
    """The rule itself, per config: RESUMABLE fields pass, any other is named old -> new, and so is a
    global batch changed by the number of processes."""
    from dataclasses import asdict
    from mae_pretrain import MAEConfig
    saved = {'config': asdict(MAEConfig()), 'rng': [None], 'world_size': 1}
    assert MAEConfig(export='teacher.pt', max_steps=5, out_dir='moved', num_workers=0).resume_conflicts(saved, 1) == []
    assert MAEConfig(mask_ratio=0.5, resume=True).resume_conflicts(saved, 1) == ['--mask-ratio 0.75 -> 0.5']
    assert MAEConfig(batch_size=16, accum_steps=4).resume_conflicts(saved, 2) == []    # 16 x 4 x 2 = 128
    assert MAEConfig().resume_conflicts(saved, 2)[0].startswith('global batch 128 (--batch-size 128 x '
                                                                 '--accum-steps 1 x 1 process(es)) -> 256')


@pytest.mark.parametrize('damage, says', [
    ('pickled code', 'is not a readable PyTorch checkpoint'),
    ('state dict only', 'is not a training checkpoint'),
    ('other shapes', 'does not fit the run'),
    ('arch not a dict', '(arch: missing or of another kind)'),        # each was a traceback before it is read
    ('config not a dict', '(config: missing or of another kind)'),
    ('rng not tensors', 'does not fit the run built from these settings (expected a torch.ByteTensor'),
    ('step not a number', '(step: missing or of another kind)'),
    ('no metrics', '(metrics: missing or of another kind)'),
    ('optimizer of another model', 'does not fit the run'),
    # each read as it was, or a traceback: a step of -4 trained with a negative lr, a flipped bit was a weight
    ('step below 0', 'holds step -4, which no run of these scripts saves: it was edited or is damaged'),
    # set_rng_state's own words, before anything is written
    ('rng of floats', 'does not fit the run built from these settings (RNG state must be a torch.ByteTensor)'),
    ('rng cut short', 'does not fit the run built from these settings ('),
    # the fused AdamW step read and wrote by the parameter's size: glibc's abort (exit 134), or trained on
    ('optimizer state of one column', 'does not fit the run built from these settings (optimizer state 0 '
                                      'exp_avg of (1, 1, 1)'),
    ('optimizer state one float short', 'optimizer state 1 exp_avg_sq of'),
    ('step out of range', 'holds step 4611686018427387904, which no run'),       # "give --max-steps above"
])
def test_damaged_checkpoint_is_one_line(monkeypatch, saved, tmp_path, damage, says):
    d = saved[1](tmp_path)
    ck = torch.load(d / 'checkpoint.pt', weights_only=True)
    state = ck['optimizer']['state']
    broken = {'arch not a dict': {'arch': 'vit_tiny'}, 'config not a dict': {'config': 'finetune'},
              'rng not tensors': {'rng': ['seed 0']}, 'step not a number': {'step': '2'},
              'no metrics': {'metrics': None},
              'optimizer of another model': {'optimizer': {}},
              'step below 0': {'step': -4},
              'rng of floats': {'rng': [ck['rng'][0].float()]}, 'rng cut short': {'rng': [ck['rng'][0][:100]]},
              'optimizer state of one column': {'optimizer': {**ck['optimizer'], 'state': {
                  **state, 0: {**state[0], 'exp_avg': state[0]['exp_avg'][..., :1]}}}},
              'optimizer state one float short': {'optimizer': {**ck['optimizer'], 'state': {
                  **state, 1: {**state[1], 'exp_avg_sq': state[1]['exp_avg_sq'].flatten()[1:]}}}},
              'step out of range': {'step': 2 ** 62}}
    if damage in broken:
        edit_checkpoint(d, **broken[damage])
    elif damage == 'pickled code':    # weights_only refuses to unpickle arbitrary objects (no code is run)
        torch.save({**ck, 'config': argparse.Namespace(**ck['config'])}, d / 'checkpoint.pt')
    elif damage == 'state dict only':
        torch.save(ck['model'], d / 'checkpoint.pt')
    else:
        edit_checkpoint(d, model={**ck['model'], 'pos_embed': torch.zeros(1, 5, 192)})
    before = digest(d)
    msg = run_in_process(monkeypatch, finetune, *TINY, '--out-dir', d, '--amp', 'off', '--resume', 'true')
    assert msg and says in msg and str(d) in msg and 'last finite' not in msg, msg
    assert digest(d) == before


@pytest.mark.parametrize('where', ['a weight', 'the optimizer'])
def test_a_checkpoint_edited_to_hold_a_nan_stops_as_a_divergence(monkeypatch, saved, tmp_path, where):
    """Run.save never writes a nan: one put into the file stops the resumed run at its first step that meets it,
    as a divergence (one line, non-zero exit), before anything is saved over the checkpoint or its evaluations.
    (An AdamW step below 0 is refused as damaged, before anything is built: test_damaged_checkpoint_is_one_line.)"""
    d = saved[1](tmp_path)
    ck = torch.load(d / 'checkpoint.pt', weights_only=True)
    if where == 'a weight':
        nan = ck['model']['cls_token'].clone()
        nan[0, 0, 0] = float('nan')
        edit_checkpoint(d, model={**ck['model'], 'cls_token': nan})
    else:
        state = ck['optimizer']['state']
        edited = {'exp_avg': state[0]['exp_avg'] * float('nan')}
        edit_checkpoint(d, optimizer={**ck['optimizer'], 'state': {**state, 0: {**state[0], **edited}}})
    before, log = digest(d), (d / 'log.txt').read_text()
    msg = run_in_process(monkeypatch, finetune, *TINY, '--out-dir', d, '--amp', 'off', '--resume', 'true')
    assert msg and re.search(r'is -?(nan|inf) at step \d+: the run diverged and stopped', msg), msg
    after = digest(d)
    assert [after[n] == before[n] for n in ('checkpoint.pt', 'metrics.jsonl')] == [True, True]
    assert (d / 'log.txt').read_text().startswith(log)
    config = json.loads((d / 'config.json').read_text())
    assert config['diverged']['checkpoint'] == 2 and len(config['resumes']) == 1


@pytest.mark.parametrize('arch', [{'num_heads': 4}, {'num_heads': 0}, {'depth': '2'}, {'epoch': float('nan')}])
def test_a_record_edited_by_hand_is_written_anew_by_the_resume(monkeypatch, saved, tmp_path, arch):
    """The model is built from the config (compared with the saved one) and its weights loaded by shape, the epoch
    counted from the step: an arch record or epoch edited by hand changes nothing the resumed run computes, and
    its next checkpoint holds the model's own."""
    d = saved[1](tmp_path)
    ck = torch.load(d / 'checkpoint.pt', weights_only=True)
    if 'epoch' in arch:
        edit_checkpoint(d, **arch)
    else:
        edit_checkpoint(d, arch={**ck['arch'], **arch})
    train(monkeypatch, finetune, d, '--amp', 'off', '--resume', 'true', '--max-steps', '4', '--save-every', '4')
    again = torch.load(d / 'checkpoint.pt', weights_only=True)
    assert again['arch'] == ck['arch'] and again['step'] == 4 and again['epoch'] == 0.5


def test_a_resumed_optimizer_takes_its_hyperparameters_from_the_config(monkeypatch, saved, tmp_path):
    """lr_scale 10, betas (2.0, 0.999), weight decay 10 and eps 0 in the file's param groups resumed silently:
    lr_scale 10 trained at 10x the lr the command states."""
    d = saved[1](tmp_path)
    ck = torch.load(d / 'checkpoint.pt', weights_only=True)
    own = [{k: v for k, v in g.items() if k != 'params'} for g in ck['optimizer']['param_groups']]
    edited = [{**g, 'lr_scale': 10.0, 'betas': (2.0, 0.999), 'weight_decay': 10.0, 'eps': 0.0}
              for g in ck['optimizer']['param_groups']]
    edit_checkpoint(d, optimizer={**ck['optimizer'], 'param_groups': edited})
    train(monkeypatch, finetune, d, '--amp', 'off', '--resume', 'true', '--max-steps', '3')
    groups = torch.load(d / 'checkpoint.pt', weights_only=True)['optimizer']['param_groups']
    keys = ('lr_scale', 'betas', 'weight_decay', 'eps')
    assert [[g[k] for k in keys] for g in groups] == [[tuple(g[k]) if k == 'betas' else g[k] for k in keys]
                                                     for g in own]


def test_a_saved_config_without_a_field_counts_it_as_its_default(monkeypatch, saved, tmp_path):
    """A checkpoint from before a field existed: the field is its default, no KeyError (batch size included)."""
    d = saved[1](tmp_path)
    config = torch.load(d / 'checkpoint.pt', weights_only=True)['config']
    edit_checkpoint(d, config={k: v for k, v in config.items() if k not in ('randaug', 'ema')})   # both default
    train(monkeypatch, finetune, d, '--amp', 'off', '--resume', 'true', '--max-steps', '3')
    edit_checkpoint(d, config={k: v for k, v in config.items() if k != 'batch_size'})   # 32, not the default 128
    msg = run_in_process(monkeypatch, finetune, *TINY, '--out-dir', d, '--amp', 'off', '--resume', 'true')
    assert msg and 'global batch 128 (--batch-size 128 x --accum-steps 1 x 1 process(es)) -> 32' in msg, msg

# -----------------------------------------------------------------------------
# What may change, and what the run directory then says


def test_a_resume_on_other_data_is_refused_unless_said(monkeypatch, tmp_path):
    """The checkpoint records what its data is, by content (util/datafiles.fingerprint): each split's image paths,
    labels and sizes, and a sample of each class's bytes; no modification time. A `cp -r` copy of the data (new times
    everywhere: a job staging its data to node-local scratch) resumes, bit for bit as an unbroken run. Two class
    folders of the same file names and sizes swapped (every label flipped), or one evaluation image replaced by another
    of its size, is refused in one line naming what changed, the run as it was; --new-data true goes on on purpose,
    recorded."""
    from test_folders import FOLDER_RUN, save_png
    root, out, again = tmp_path / 'images', tmp_path / 'run', tmp_path / 'unbroken'
    for split in ('train', 'val'):
        for c, seed in (('cat', 0), ('dog', 100)):   # the same names and sizes in both classes (BMP: sizes exact)
            for i in range(8):
                noise = np.random.default_rng(seed + i).integers(0, 256, (32, 32, 3), dtype=np.uint8)
                save_png(root / split / c / f'{i}.bmp', noise)
    args = [*FOLDER_RUN, '--data-dir', root, '--out-dir', out]
    assert run_in_process(monkeypatch, finetune, *args, '--max-steps', '1') is None
    time.sleep(1.1)   # a copy a second later: every file's time differs
    copy = tmp_path / 'scratch' / 'images'
    copy.parent.mkdir()
    subprocess.run(['cp', '-r', str(root), str(copy)], check=True)
    assert run_in_process(monkeypatch, finetune, *[a if a != root else copy for a in args], '--resume', 'true',
                          '--max-steps', '2') is None
    assert run_in_process(monkeypatch, finetune, *FOLDER_RUN, '--data-dir', root, '--out-dir', again,
                          '--max-steps', '2') is None
    resumed, unbroken = (torch.load(d / 'checkpoint.pt', weights_only=True)['model'] for d in (out, again))
    assert all(torch.equal(resumed[k], unbroken[k]) for k in unbroken)
    os.rename(root / 'train' / 'cat', root / 'train' / 'was_cat')
    os.rename(root / 'train' / 'dog', root / 'train' / 'cat')
    os.rename(root / 'train' / 'was_cat', root / 'train' / 'dog')
    before = digest(out)
    msg = run_in_process(monkeypatch, finetune, *args, '--resume', 'true', '--max-steps', '3')
    assert msg and f'--resume: {out / "checkpoint.pt"} was trained on other data than the data here (the training ' \
        "split (its images' content) differ)" in msg and '--new-data true' in msg, msg
    assert digest(out) == before
    os.rename(root / 'train' / 'cat', root / 'train' / 'was_cat')   # back as it was; an evaluation image replaced
    os.rename(root / 'train' / 'dog', root / 'train' / 'cat')
    os.rename(root / 'train' / 'was_cat', root / 'train' / 'dog')
    shutil.copyfile(root / 'val' / 'dog' / '1.bmp', root / 'val' / 'dog' / '0.bmp')
    msg = run_in_process(monkeypatch, finetune, *args, '--resume', 'true', '--max-steps', '3')
    assert msg and "(the evaluation split (its images' content) differ)" in msg, msg
    assert run_in_process(monkeypatch, finetune, *args, '--resume', 'true', '--max-steps', '3', '--new-data',
                          'true') is None
    assert json.loads((out / 'config.json').read_text())['resumes'][-1]['changed']['new_data'] == [False, True]
    assert run_in_process(monkeypatch, finetune, *args, '--resume', 'true', '--max-steps', '4') is None   # its own
    # a set held in memory: by its bytes (one label is another split); one made at random has none
    from util.datafiles import TensorImages, fingerprint
    images, labels = torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.arange(4)
    held = fingerprint(TensorImages(images, labels, None, None, 'idx'))
    assert held == fingerprint(TensorImages(images.clone(), labels.clone(), None, None, 'idx'))
    assert held != fingerprint(TensorImages(images, labels.flip(0), None, None, 'idx'))
    assert fingerprint(TensorImages(images, labels, None, None, None)) is None


def test_readme_names_every_field_a_resume_may_change():
    """The resume rules (REFERENCE.md, linked from the README) list each config's RESUMABLE fields (the teacher's
    path is said in words)."""
    import attention_copy
    import mae_pretrain
    with open(os.path.join(ROOT, 'REFERENCE.md'), encoding='utf-8') as f:
        rules = f.read().split('**The resume rules.**')[1].split('\n\n')[0]
    for cls in (finetune.FinetuneConfig, attention_copy.CopyConfig, attention_distill.DistillConfig,
                mae_pretrain.MAEConfig):
        for name in set(cls.RESUMABLE) - {'resume', 'teacher'}:
            assert f"`--{name.replace('_', '-')}" in rules, f'REFERENCE.md does not say --{name} may change on resume'
    assert "the teacher's path" in rules and 'old → new' in rules and 'global batch' in rules


def test_resume_records_what_changed_and_keeps_the_time(monkeypatch, saved, tmp_path):
    d = saved[1](tmp_path)
    edit_checkpoint(d, time=1000.0)   # as if the first 2 steps had taken 1000 s
    config = json.loads((d / 'config.json').read_text())
    (d / 'config.json').write_text(json.dumps({**config, 'blr': 0.5}))   # a hand edit: the run never had it
    train(monkeypatch, finetune, d, '--amp', 'off', '--resume', 'true', '--max-steps', '4', '--log-every', '1',
          '--save-every', '3')
    config = json.loads((d / 'config.json').read_text())
    assert (config['max_steps'], config['log_every'], config['save_every'], config['resume']) == (4, 1, 3, True)
    assert config['argv'][-2:] == ['--amp', 'off']          # the first launch's command stays
    last = config['resumes'][-1]
    assert last['step'] == 2 and last['changed']['max_steps'] == [2, 4] and '--resume' in last['argv']
    records = read_metrics(d)
    assert 'blr' not in last['changed']          # config.json's hand edit below came after: never a change of the run
    assert [r['step'] for r in records] == [2, 4] and records[1]['time'] > 1000 > records[0]['time']
    assert torch.load(d / 'checkpoint.pt', weights_only=True)['time'] > 1000


def test_a_new_run_starts_its_log_afresh(monkeypatch, tmp_path):
    """An earlier attempt that was killed before its first evaluation and checkpoint leaves nothing to continue
    (one that evaluated is a finished run kept without its checkpoint: test_rundir.py)."""
    d = tmp_path / 'run'
    d.mkdir()
    (d / 'log.txt').write_text('an earlier attempt\n')
    (d / 'config.json').write_text(json.dumps({'epochs': 99, 'out_dir': str(d), 'argv': ['finetune.py']}))   # ours
    (d / 'metrics.jsonl').write_text('')
    train(monkeypatch, finetune, d, '--max-steps', '1')
    assert 'an earlier attempt' not in (d / 'log.txt').read_text()
    assert [r['step'] for r in read_metrics(d)] == [1]
    assert json.loads((d / 'config.json').read_text())['epochs'] == 1


@pytest.mark.parametrize('amp', ['off', 'bf16'])
def test_non_finite_loss_stops_with_a_true_message(monkeypatch, tmp_path, amp):
    """An lr of 1e30 breaks the model in the first epoch; its end (step 4 of 8, not a logging step) is
    evaluated: nothing non-finite is recorded, no checkpoint exists to be 'kept', bf16 is not suggested on bf16."""
    msg = run_in_process(monkeypatch, finetune, *TINY, '--out-dir', tmp_path, '--fake-size', '64', '--batch-size', '16',
                         '--epochs', '2', '--log-every', '100', '--blr', '1e30', '--warmup-epochs', '0', '--amp', amp)
    assert msg and re.search(r'is -?(nan|inf) at step', msg) and 'no checkpoint was written yet' in msg, msg
    assert 'is kept' not in msg
    assert '--amp bf16' not in msg
    assert not (tmp_path / 'checkpoint.pt').exists()
    assert not (tmp_path / 'metrics.jsonl').exists() or 'NaN' not in (tmp_path / 'metrics.jsonl').read_text()

# -----------------------------------------------------------------------------
# Another number of processes: the same global batch continues the same run; another is refused


def test_two_processes_resume_in_one_with_the_same_global_batch(monkeypatch, tmp_path):
    two, one = tmp_path / 'two', tmp_path / 'one'
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nnodes', '1', '--nproc_per_node', '2',
                        '--master_addr', '127.0.0.1', '--master_port', str(free_port()), 'finetune.py', *TINY,
                        '--out-dir', str(two), '--batch-size', '16', *SAME_MATHS], cwd=ROOT, env=sub_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f'torchrun failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}'
    assert torch.load(two / 'checkpoint.pt', weights_only=True)['step'] == 4
    before = digest(two)
    msg = run_in_process(monkeypatch, finetune, *TINY, '--out-dir', two, '--batch-size', '16', *SAME_MATHS,
                         '--resume', 'true', '--max-steps', '8')
    assert msg and 'global batch 32 (--batch-size 16 x --accum-steps 1 x 2 process(es)) -> 16' in msg, msg
    assert digest(two) == before
    train(monkeypatch, finetune, two, '--batch-size', '32', *SAME_MATHS, '--resume', 'true', '--max-steps', '8')
    train(monkeypatch, finetune, one, '--batch-size', '32', *SAME_MATHS, '--max-steps', '8')
    ce_two, ce_one = ce_by_step(two), ce_by_step(one)
    assert sorted(ce_two) == sorted(ce_one) == list(range(1, 9))
    for s in ce_one:   # the same images in every step, the same lr: the same run, to float rounding
        assert ce_two[s] == pytest.approx(ce_one[s], rel=1e-4), (s, ce_two[s], ce_one[s])
    a, b = read_metrics(one)[-1], read_metrics(two)[-1]
    assert a['step'] == b['step'] == 8 and b['loss'] == pytest.approx(a['loss'], rel=1e-4)
    assert abs(a['top1'] - b['top1']) <= 100 / 64 + 1e-9     # 64 test images: one may flip on a rounding
    assert json.loads((two / 'config.json').read_text())['world_size'] == 1

# -----------------------------------------------------------------------------
# A transfer run continues with its own teacher: the file is compared by SHA-256


@pytest.fixture(scope='module')
def distilled(tmp_path_factory):
    """Two teachers of the same shape (seeds 0 and 1) and a distillation run from the first, 2 steps."""
    root = tmp_path_factory.mktemp('teachers')
    with pytest.MonkeyPatch.context() as mp:
        for seed in (0, 1):
            train(mp, finetune, root / f't{seed}', '--max-steps', '1', '--seed', seed)
        train(mp, attention_distill, root / 'distill', '--teacher', root / 't0' / 'checkpoint.pt', '--max-steps', '2')
    return root


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize('change, says', [
    (['--layers', '0'], '--layers all -> 0'),
    (['--weight', '1'], '--weight 3.0 -> 1.0'),
    (['--transfer', 'q'], '--transfer attn -> q'),
])
def test_distillation_resume_refuses_other_transfer_settings(monkeypatch, distilled, change, says):
    d = distilled / 'distill'
    before = digest(d)
    msg = run_in_process(monkeypatch, attention_distill, *TINY, '--out-dir', d, '--resume', 'true',
                         '--teacher', distilled / 't0' / 'checkpoint.pt', *change)
    assert msg and says in msg, msg
    assert digest(d) == before


def test_distillation_resume_checks_the_teacher_file(monkeypatch, distilled, tmp_path):
    shutil.copytree(distilled / 'distill', tmp_path / 'distill')
    d, t0, t1 = tmp_path / 'distill', distilled / 't0' / 'checkpoint.pt', distilled / 't1' / 'checkpoint.pt'
    swapped = tmp_path / 'teacher.pt'                        # the recorded file replaced by another teacher
    shutil.copy(t1, swapped)
    before = digest(d)
    msg = run_in_process(monkeypatch, attention_distill, *TINY, '--out-dir', d, '--resume', 'true',
                         '--teacher', swapped, '--max-steps', '3')
    assert msg and sha(t0) in msg and sha(t1) in msg and '--new-teacher true' in msg, msg
    assert digest(d) == before
    moved = tmp_path / 'moved.pt'                            # the same teacher elsewhere: accepted
    shutil.copy(t0, moved)
    train(monkeypatch, attention_distill, d, '--resume', 'true', '--teacher', moved, '--max-steps', '3')
    # another teacher on purpose: accepted, and recorded as the teacher from now on
    train(monkeypatch, attention_distill, d, '--resume', 'true', '--teacher', swapped, '--new-teacher', 'true',
          '--max-steps', '4')
    ck = torch.load(d / 'checkpoint.pt', weights_only=True)
    assert ck['step'] == 4 and ck['distilled_from']['sha256'] == sha(t1)
    assert re.search(r'"new_teacher": \[\s*false,\s*true\s*\]', (d / 'config.json').read_text())


@pytest.mark.parametrize('max_steps', [3, 2])
def test_max_steps_at_or_below_a_mid_epoch_checkpoint_is_one_line(monkeypatch, tmp_path, max_steps):
    """Stopped after the checkpoint of step 3 (--save-every, mid-epoch, never evaluated): --max-steps 3 ended in a
    KeyError ('top1'), --max-steps 2 reported step 3 as its end."""
    calls, plain = [0], finetune.soft_cross_entropy   # the fine-tuning loss's cross-entropy

    def stopped(*args, **kw):
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt
        return plain(*args, **kw)
    monkeypatch.setattr(finetune, 'soft_cross_entropy', stopped)
    d = tmp_path / 'run'
    monkeypatch.setattr(sys, 'argv', ['finetune.py', *TINY, '--out-dir', str(d), '--save-every', '3'])
    with pytest.raises(KeyboardInterrupt):   # Ctrl-C after step 3's checkpoint
        finetune.main()
    monkeypatch.setattr(finetune, 'soft_cross_entropy', plain)
    assert torch.load(d / 'checkpoint.pt', weights_only=True)['step'] == 3
    before = digest(d)
    msg = run_in_process(monkeypatch, finetune, *TINY, '--out-dir', d, '--resume', 'true', '--max-steps', max_steps)
    assert msg and f'is at step 3, not below --max-steps {max_steps}, and was not evaluated there: give --max-steps ' \
                   f'above 3' in msg, msg
    assert digest(d) == before
    train(monkeypatch, finetune, d, '--resume', 'true', '--max-steps', '4')


def test_resume_without_checkpoint(tmp_path):
    empty = tmp_path / 'empty'
    empty.mkdir()
    assert_one_line_error(finetune_tiny(empty, '--resume', 'true', check=False), 'checkpoint')
    assert os.listdir(empty) == []
