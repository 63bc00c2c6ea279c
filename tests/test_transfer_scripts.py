"""attention_copy.py and attention_distill.py end to end on fake data, each run once under 2-process torchrun (gloo):
bf16 autocast, what their checkpoints hold; distillation's two processes against one process with the same global
batch, loss for loss (the launch and the step every script shares), eager with no start-up check; the variants'
flags."""
import json
import os
import re

import pytest
import torch

from conftest import SAME_MATHS, TINY, finetune, free_port, read_metrics, run_script
from util.checkpoints import build_from_checkpoint

@pytest.fixture(scope='module')
def teacher_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp('teacher')
    finetune(d, '--max-steps', '3')
    return d / 'checkpoint.pt'


def transfer(script, out_dir, teacher, *args, procs=1):
    launch = [] if procs == 1 else ['-m', 'torch.distributed.run', '--nnodes', '1', '--nproc_per_node', str(procs),
                                    '--master_addr', '127.0.0.1', '--master_port', str(free_port())]
    p = run_script(*launch, script, *TINY, '--out-dir', out_dir, '--teacher', teacher, '--amp', 'bf16', '--max-steps',
                   '3', '--log-every', '1', *args, timeout=300)
    assert p.returncode == 0, f'{script} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}'
    return p


def losses_by_step(out_dir):
    """{step: {loss name: value}} from a run's log.txt ('step 3/4 | attn 0.1234 ce 2.3026 | lr ...')."""
    with open(os.path.join(str(out_dir), 'log.txt')) as f:
        found = re.findall(r'step (\d+)/\d+ \| ([^|]+) \|', f.read())
    return {int(step): {k: float(v) for k, v in zip(*[iter(terms.split())] * 2)} for step, terms in found}


def test_copy_under_torchrun_and_its_checkpoint_names_its_teacher(teacher_ckpt, tmp_path):
    """sdpa, with its start-up check against eager on the first batch passing and recorded."""
    p = transfer('attention_copy.py', tmp_path, teacher_ckpt, '--attn-implementation', 'sdpa', procs=2)
    assert 'autocast torch.bfloat16' in p.stdout and '2 process(es)' in p.stdout
    assert 'sdpa holds' in p.stdout and 'falling back' not in p.stdout
    record = json.load(open(tmp_path / 'config.json'))['attention_check']
    assert record['implementation'] == 'sdpa' and 0 < record['error'] <= record['tolerance']
    assert record['backend'] == 'flash' and record['seconds'] < 5
    assert read_metrics(tmp_path)[-1]['step'] == 3
    ck = torch.load(tmp_path / 'checkpoint.pt', weights_only=True)
    assert ck['teacher']['source'] == str(teacher_ckpt) and len(ck['teacher']['sha256']) == 64
    assert not any('qkv' in k for k in ck['model'])              # copied layers have no q / k
    from vit import VisionTransformer
    assert set(ck['model']) == set(VisionTransformer(**ck['arch']).state_dict())   # the student, nothing else
    from attention_copy import load_copy_model
    model = load_copy_model(str(tmp_path / 'checkpoint.pt'))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_distill_two_processes_match_one_and_save_a_plain_vit(teacher_ckpt, tmp_path):
    """2 processes of 16 images a step (torchrun) against 1 process of 32: every loss term at every step, the
    evaluation after; the checkpoint a plain ViT with the EMA of the student only."""
    one, two = tmp_path / 'one', tmp_path / 'two'
    args = ['--layers', '0', '--ema', '0.99', '--attn-implementation', 'eager', *SAME_MATHS]
    p = transfer('attention_distill.py', two, teacher_ckpt, '--batch-size', '16', *args, procs=2)
    transfer('attention_distill.py', one, teacher_ckpt, '--batch-size', '32', *args)
    assert '2 process(es)' in p.stdout and 'autocast None' in p.stdout             # --amp off: fp32, after bf16
    assert 'start-up check' not in p.stdout                                        # eager: nothing to check
    for d, world in ((one, 1), (two, 2)):
        with open(d / 'config.json') as f:
            config = json.load(f)
        assert config['world_size'] == world and 'attention_check' not in config
    l1, l2 = losses_by_step(one), losses_by_step(two)
    assert sorted(l1) == sorted(l2) == [1, 2, 3, 4], (l1, l2)
    assert set(l1[1]) == {'attn', 'ce'}                                  # both loss terms logged
    for s in l1:
        for k in l1[s]:
            assert l2[s][k] == pytest.approx(l1[s][k], rel=1e-4), f'step {s}: {k} {l1[s][k]} (1) vs {l2[s][k]} (2)'
    assert len({round(v['ce'], 3) for v in l1.values()}) > 1           # the steps saw different data / weights
    m1, m2 = read_metrics(one)[-1], read_metrics(two)[-1]
    assert m1['step'] == m2['step'] == 4
    assert m1['top1'] == m2['top1'] and m1['top5'] == m2['top5']
    assert m2['loss'] == pytest.approx(m1['loss'], rel=1e-4)
    ck = torch.load(two / 'checkpoint.pt', weights_only=True)
    assert 'teacher' not in ck and ck['distilled_from']['layer_map'] == {0: 0}
    assert set(ck['ema']) - {'n_averaged'} == {f'module.{k}' for k in ck['model']}   # EMA of the student only
    student = build_from_checkpoint(str(two / 'checkpoint.pt')).eval()             # no teacher needed
    assert student(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize('args', [['--transfer', 'q'], ['--transfer', 'v', '--heads', '0'], ['--heads', '1']])
def test_variants_run(teacher_ckpt, tmp_path, args):
    transfer('attention_copy.py', tmp_path / 'copy', teacher_ckpt, '--max-steps', '1', *args)
    transfer('attention_distill.py', tmp_path / 'distill', teacher_ckpt, '--max-steps', '1', *args)


def test_transfer_needs_a_teacher(tmp_path):
    p = run_script('attention_distill.py', *TINY, '--out-dir', tmp_path)
    assert p.returncode != 0 and 'error: --teacher is required' in p.stderr and 'Traceback' not in p.stderr
