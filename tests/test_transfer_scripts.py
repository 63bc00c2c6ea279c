"""attention_copy.py and attention_distill.py end to end on fake data: 1 process and 2-process torchrun,
bf16 autocast; what their checkpoints hold."""
import pytest
import torch

from conftest import TINY, finetune, read_metrics, run_script
from test_cli import free_port
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


@pytest.mark.parametrize('procs', [1, 2])
def test_copy_runs_and_checkpoint_names_its_teacher(teacher_ckpt, tmp_path, procs):
    p = transfer('attention_copy.py', tmp_path, teacher_ckpt, procs=procs)
    assert 'autocast torch.bfloat16' in p.stdout and f'{procs} process(es)' in p.stdout
    assert read_metrics(tmp_path)[-1]['step'] == 3
    ck = torch.load(tmp_path / 'checkpoint.pt', weights_only=True)
    assert ck['teacher']['source'] == str(teacher_ckpt) and len(ck['teacher']['sha256']) == 64
    assert not any('qkv' in k for k in ck['model'])              # copied layers have no q / k
    from vit import VisionTransformer
    assert set(ck['model']) == set(VisionTransformer(**ck['arch']).state_dict())   # the student, nothing else
    from attention_copy import load_copy_model
    model = load_copy_model(str(tmp_path / 'checkpoint.pt'))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize('procs', [1, 2])
def test_distill_runs_and_saves_a_plain_vit(teacher_ckpt, tmp_path, procs):
    p = transfer('attention_distill.py', tmp_path, teacher_ckpt, '--layers', '0', '--ema', '0.99', procs=procs)
    assert ' attn ' in p.stdout and ' ce ' in p.stdout          # both loss terms logged
    ck = torch.load(tmp_path / 'checkpoint.pt', weights_only=True)
    assert 'teacher' not in ck and ck['distilled_from']['layer_map'] == {0: 0}
    assert set(ck['ema']) - {'n_averaged'} == {f'module.{k}' for k in ck['model']}   # EMA of the student only
    student = build_from_checkpoint(str(tmp_path / 'checkpoint.pt')).eval()        # no teacher needed
    assert student(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize('args', [['--transfer', 'q'], ['--transfer', 'v', '--heads', '0'], ['--heads', '1']])
def test_variants_run(teacher_ckpt, tmp_path, args):
    transfer('attention_copy.py', tmp_path / 'copy', teacher_ckpt, *args)
    transfer('attention_distill.py', tmp_path / 'distill', teacher_ckpt, *args)


def test_transfer_needs_a_teacher(tmp_path):
    p = run_script('attention_distill.py', *TINY, '--out-dir', tmp_path)
    assert p.returncode != 0 and 'error: --teacher is required' in p.stderr and 'Traceback' not in p.stderr
