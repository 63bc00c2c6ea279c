"""Decided once, read once: every file a command reads is read once (counted where torch reads it), and the attention
implementation is told to the models in one place, once, after the start-up check has settled it."""
import os
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import attention_copy
import ensemble
import finetune as finetune_script
import vit
from conftest import TINY, finetune, run_in_process, run_script

TEACHER = ['--img-size', '28']


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """A fine-tuned model (the copy student's teacher too) and a copy student of it."""
    d = tmp_path_factory.mktemp('once')
    finetune(d / 'ft', '--max-steps', '2')
    p = run_script('attention_copy.py', *TINY, '--out-dir', d / 'copy', '--teacher', d / 'ft' / 'checkpoint.pt',
                   '--max-steps', '2')
    assert p.returncode == 0, p.stderr[-3000:]
    finetune(d / 'other', '--max-steps', '2', '--seed', '1')
    return d


def reads(monkeypatch):
    """{path: how many times torch.load read it}, filled as a command runs in this process."""
    counted = Counter()
    load = torch.load

    def counting(f, *args, **kwargs):
        counted[os.path.realpath(f)] += 1
        return load(f, *args, **kwargs)
    monkeypatch.setattr(torch, 'load', counting)
    return counted


def test_finetune_init_reads_its_file_once(runs, tmp_path, monkeypatch):
    """--init was read and loaded in the resolve step, then read again where the model is built."""
    init = runs / 'ft' / 'checkpoint.pt'
    counted = reads(monkeypatch)
    msg = run_in_process(monkeypatch, finetune_script, *TINY, '--init', init, '--max-steps', '1',
                         '--out-dir', tmp_path / 'r')
    assert msg is None, msg
    assert counted[os.path.realpath(init)] == 1, counted


def test_ensemble_reads_each_checkpoint_once(runs, tmp_path, monkeypatch):
    """A copy student's checkpoint was read to see what it is, then again to load it; its teacher's file is read
    once, by the resolve step's inspect_teacher."""
    models = [runs / 'other' / 'checkpoint.pt', runs / 'copy' / 'checkpoint.pt']
    counted = reads(monkeypatch)
    assert run_in_process(monkeypatch, ensemble, *TINY, '--models', *models) is None
    teacher = runs / 'ft' / 'checkpoint.pt'
    assert counted == Counter({os.path.realpath(p): 1 for p in [*models, teacher]}), counted


def told(monkeypatch, module, *args):
    """[(file, function)] of each call to vit.set_attn_implementation while module's main() runs, and where the
    models ended (each attention layer's implementation)."""
    code = vit.set_attn_implementation.__code__
    calls = []

    def profile(frame, event, arg):
        if event == 'call' and frame.f_code is code:
            caller = frame.f_back.f_code
            calls.append((Path(caller.co_filename).name, caller.co_name))
    sys.setprofile(profile)
    try:
        msg = run_in_process(monkeypatch, module, *args)
    finally:
        sys.setprofile(None)
    assert msg is None, msg
    return calls


@pytest.mark.parametrize('implementation', ['eager', 'sdpa'])
def test_the_attention_implementation_is_told_once_where_it_is_settled(runs, tmp_path, monkeypatch, implementation):
    """A copy run: the teacher was set to eager where it was built, the start-up check set every model to eager and
    then to its verdict, and settle_attention set them all again; what the teacher hands over was read off its first
    layer. Now the plan holds it, and settle_attention tells the teacher and the student once each."""
    calls = told(monkeypatch, attention_copy, *TINY, '--teacher', runs / 'ft' / 'checkpoint.pt',
                 '--max-steps', '1', '--attn-implementation', implementation, '--out-dir', tmp_path / 'copy')
    assert calls == [('attention_check.py', 'settle_attention')] * 2, calls
    # scoring trained models: on_device tells each model (the copy pair as one) once, after its check
    calls = told(monkeypatch, ensemble, *TINY, '--models', runs / 'other' / 'checkpoint.pt',
                 runs / 'copy' / 'checkpoint.pt', '--attn-implementation', implementation)
    assert calls == [('launch.py', 'on_device')] * 2, calls
