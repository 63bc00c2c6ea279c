"""Every script's own main() run on the stand-in CUDA device (tests/standin_cuda.py: fake tensors on `cuda:0`, the
host's own work real): set-up, the start-up check, two training steps, an evaluation, a save and a resume; ensemble.py
and evaluate.py (--shift) scoring. The paper's two methods as a user runs them (--transfer attn: the fused copy, the
map-free distillation loss) with every per-step option on (RandAugment, random erasing, MixUp / CutMix, drop-path,
clipping, accumulation, EMA). On a set held in memory (on the device) and on one read an image at a time (a folder's
way), in bf16 and in fp16 (its GradScaler). An operator mixing the host's tensors with the device's fails as on a GPU;
inside a training step (fp16's included: fused AdamW takes the GradScaler's inf check on the device) or a scoring
pass, a host sync or a host tensor read by a device operator fails.
What it cannot cover: numbers (a loss, an accuracy: the stand-in's), kernels (none runs: the start-up check's verdict
is on stand-in numbers), backward's own operators (torch's autograd engine needs a real CUDA context for a device
tensor: the gradients are stand-in zeros on each parameter's device), and a checkpoint's bytes (the host's zeros in
the device tensors' shapes and dtypes)."""
import contextlib
import json

import pytest
import torch

import attention_copy
import attention_distill
import ensemble
import evaluate
import finetune
import mae_pretrain
from conftest import TINY, finetune as finetune_run, run_in_process
from standin_cuda import standin_cuda
from util import datafiles, engine, run
from util.datafiles import unwrap

# every option that changes a training step; a batch of 16 accumulated twice keeps 4 steps an epoch
EVERY_OPTION = ['--randaug', 'rand-m9-mstd0.5-inc1', '--reprob', '0.25',
                '--mixup', '0.8', '--cutmix', '1.0', '--drop-path', '0.1', '--clip-grad', '1.0',
                '--batch-size', '16', '--accum-steps', '2', '--ema', '0.99']
SCRIPTS = {'finetune': (finetune, []), 'mae_pretrain': (mae_pretrain, []),
           'copy': (attention_copy, EVERY_OPTION), 'distill': (attention_distill, EVERY_OPTION),
           'copy-v': (attention_copy, ['--transfer', 'v']), 'copy-heads': (attention_copy, ['--heads', '1']),
           'distill-q': (attention_distill, ['--transfer', 'q'])}
SETS = [('held', 'bf16'), ('folder', 'fp16')]
# each script on both sets; the transfer variants, whose difference is in the model and not in the data's way or
# the GradScaler, on the first
RUNS = [(name, *where) for name in SCRIPTS for where in (SETS if '-' not in name else SETS[:1])]


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
    d = tmp_path_factory.mktemp('teacher')
    finetune_run(d, '--max-steps', '1')
    return d / 'checkpoint.pt'


def lenient(cuda, fn):
    """fn run outside the strict step: a progress line, an evaluation's result and a save read the device."""
    def outside_the_step(*args, **kwargs):
        cuda.in_step, was = False, cuda.in_step
        try:
            return fn(*args, **kwargs)
        finally:
            cuda.in_step = was
    return outside_the_step


@contextlib.contextmanager
def on_standin(held, script=None):
    """The stand-in device as torch.cuda; each training epoch strict (no host sync in a step). Every replacement is
    the stand-in's, undone with it."""
    with standin_cuda() as cuda:
        if held == 'folder':
            cuda.patch(datafiles, 'FAKE_HELD', 0)
        cuda.patch(torch.cuda, 'is_available', lambda: True)
        for owner, name in ((engine, 'log_progress'), (run.Run, 'save'), (run.Run, 'evaluate')):
            cuda.patch(owner, name, lenient(cuda, getattr(owner, name)))
        if script is not None:
            def strict_epoch(run, loader, *args, epoch=script.train_one_epoch):
                with cuda.strict():
                    return epoch(run, loader, *args)
            cuda.patch(script, 'train_one_epoch', strict_epoch)
        yield cuda


@pytest.mark.parametrize('name, held, amp', RUNS)
def test_a_training_script_runs_on_the_device(name, held, amp, teacher, tmp_path, monkeypatch):
    script, args = SCRIPTS[name]
    if script in (attention_copy, attention_distill):
        args = [*args, '--teacher', teacher]
    out = tmp_path / 'run'
    with on_standin(held, script):
        for more in (['--max-steps', '2'], ['--max-steps', '3', '--resume', 'true']):
            # 128 images (the fake set is made afresh by each main()): 4 steps an epoch, resumed mid-epoch
            msg = run_in_process(monkeypatch, script, *TINY, '--fake-size', '128', '--out-dir', out,
                                 '--amp', amp, '--log-every', '1', *args, *more)
            assert msg is None, msg
    with open(out / 'metrics.jsonl') as f:
        records = [json.loads(line) for line in f]
    assert [r['step'] for r in records] == [2, 3]
    # the EMA evaluated, resumed
    assert all(('ema_top1' in r) == ('--ema' in args) for r in records)
    log = (out / 'log.txt').read_text()
    if script in (attention_copy, attention_distill):
        assert 'attention: sdpa' in log, log    # the fused copy, the map-free loss: what a GPU runs
    assert ('held on cuda:0' in log) == (held == 'held'), log   # where the set is, said
    assert f'autocast torch.{ {"bf16": "bfloat16", "fp16": "float16"}[amp]}' in log


@pytest.mark.parametrize('held, amp', SETS)
def test_ensemble_and_evaluate_run_on_the_device(held, amp, teacher, tmp_path, monkeypatch):
    models = ['--models', teacher, teacher]
    common = [*models, '--data', 'fake', '--num-workers', '0', '--amp', amp]
    ensemble_set = ['--fake-size', '512']   # its test split: 64 images, evaluate.py's
    with on_standin(held) as cuda:
        for script in (ensemble, evaluate):
            score = script.predict_all

            def strict_scores(models, loader, place, score=score):
                with cuda.strict(allowed=len(models) + 1):   # each model's logits and the labels, copied once
                    return score(models, loader, place)
            cuda.patch(script, 'predict_all', strict_scores)
        held_on = []   # where each set scored is held: on the device where it fits (the fake set does)
        for script in (ensemble, evaluate):
            loader = script.build_loader

            def where(cfg, dataset, *args, loader=loader, **kwargs):
                held_on.append(getattr(unwrap(dataset), 'images', torch.empty(0)).device.type)
                return loader(cfg, dataset, *args, **kwargs)
            cuda.patch(script, 'build_loader', where)
        msg = run_in_process(monkeypatch, ensemble, *common, *ensemble_set, '--out', tmp_path / 'e.json')
        assert msg is None, msg
        msg = run_in_process(monkeypatch, evaluate, *common, '--ensembles', '0,1', '--shift', 'none', 'noise',
                             '--out', tmp_path / 'robustness')
        assert msg is None, msg
    assert held_on == [{'held': 'cuda', 'folder': 'cpu'}[held]] * 3    # ensemble's set, evaluate's two shifts
    assert json.loads((tmp_path / 'e.json').read_text())['images'] == 64   # 512 / 8
    rows = json.loads((tmp_path / 'robustness' / 'robustness.json').read_text())['rows']
    assert [set(r['top1']) for r in rows] == [{'none', 'noise'}] * 3
