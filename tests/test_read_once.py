"""Decided once, read once: every file a command reads is read once (counted where it is opened), a teacher hashed from
the bytes its weights were loaded from, and the attention implementation is told to the models in one place, once,
after the start-up check has settled it."""
import builtins
import hashlib
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import attention_copy
import attention_distill
import ensemble
import finetune as finetune_script
import vit
from attention_copy import load_copy_model
from conftest import TINY, finetune, run_in_process, run_script
from util import checkpoints

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
    """{path: how many times a checkpoint file (*.pt) was opened to be read}, filled as a command runs in this
    process."""
    counted = Counter()
    real = builtins.open

    def counting(file, mode='r', *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and str(file).endswith('.pt') and 'r' in mode:
            counted[os.path.realpath(file)] += 1
        return real(file, mode, *args, **kwargs)
    monkeypatch.setattr(builtins, 'open', counting)
    return counted


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def put(other, path):
    """`other`'s bytes put at `path` whole, as a sync or a copy finishing does (a rename over it)."""
    shutil.copy(other, f'{path}.new')
    os.replace(f'{path}.new', path)


def swapped_after_loading(monkeypatch, path, other):
    """torch.load, patched to put `other` at `path` right after its first load in this process: a file replaced
    between the read of a teacher's weights and anything done later."""
    load = torch.load
    done = []

    def swapping(*args, **kwargs):
        out = load(*args, **kwargs)
        if not done:
            done.append(path)
            put(other, path)
        return out
    monkeypatch.setattr(torch, 'load', swapping)
    return done


def test_finetune_init_is_read_and_loaded_once_and_recorded_as_those_bytes(runs, tmp_path, monkeypatch):
    """--init was read and loaded in the resolve step, then read again where the model is built; then read once and
    loaded twice, into a model on the meta device and again into a new ViT. Now the resolve step's model, holding
    its weights, is the model the run trains; and config.json holds the SHA-256 of the bytes its weights were loaded
    from (it recorded nothing of the file), even where the file was replaced right after."""
    a, b = runs / 'ft' / 'checkpoint.pt', runs / 'other' / 'checkpoint.pt'
    init, out = tmp_path / 'init.pt', tmp_path / 'ft'
    shutil.copy(a, init)
    counted = reads(monkeypatch)
    swapped_after_loading(monkeypatch, init, b)
    loaded = []
    load = checkpoints.load_weights

    def counting(model, *args, **kwargs):
        loaded.append(model)
        return load(model, *args, **kwargs)
    monkeypatch.setattr(checkpoints, 'load_weights', counting)
    msg = run_in_process(monkeypatch, finetune_script, *TINY, '--init', init, '--max-steps', '1', '--out-dir', out)
    assert msg is None, msg
    assert counted[os.path.realpath(init)] == 1, counted
    assert len(loaded) == 1, loaded
    assert sha(init) == sha(b) and json.loads((out / 'config.json').read_text()).get('init_sha256') == sha(a)


def test_ensemble_reads_each_checkpoint_once_and_records_the_bytes_it_loaded(runs, tmp_path, monkeypatch):
    """A copy student's checkpoint was read to see what it is, then again to load it; its teacher's file is read
    once, by the resolve step's inspect_teacher. The results named the files scored, not what they held; now each
    file's SHA-256, of the bytes its weights were loaded from, even where the file was replaced right after."""
    a, b = runs / 'ft' / 'checkpoint.pt', runs / 'other' / 'checkpoint.pt'
    model, copy = tmp_path / 'model.pt', runs / 'copy' / 'checkpoint.pt'
    shutil.copy(a, model)
    counted = reads(monkeypatch)
    swapped_after_loading(monkeypatch, model, b)
    msg = run_in_process(monkeypatch, ensemble, *TINY, '--models', model, copy, '--out', tmp_path / 'r.json')
    assert msg is None, msg
    # each model, the copy student's teacher (a), and b, read by this test to put it at the model's path
    assert counted == Counter({os.path.realpath(p): 1 for p in (model, copy, a, b)}), counted
    assert sha(model) == sha(b) and json.loads((tmp_path / 'r.json').read_text())['sha256'][str(model)] == sha(a)


def test_a_teacher_is_read_once_and_recorded_as_the_bytes_it_was_loaded_from(runs, tmp_path, monkeypatch):
    """The teacher's weights were read in the resolve step and its SHA-256 computed later, in a read of its own: a
    file replaced between the two trained from A and recorded B, and the run's resume took B without --new-teacher.
    Now the digest is of the bytes the weights were loaded from, and the resume compares the file with it."""
    a, b = runs / 'ft' / 'checkpoint.pt', runs / 'other' / 'checkpoint.pt'
    teacher, out = tmp_path / 'teacher.pt', tmp_path / 'distill'
    shutil.copy(a, teacher)
    counted = reads(monkeypatch)
    assert swapped_after_loading(monkeypatch, teacher, b) == []
    msg = run_in_process(monkeypatch, attention_distill, *TINY, '--teacher', teacher, '--max-steps', '1',
                         '--out-dir', out)
    assert msg is None, msg
    opened = counted[os.path.realpath(teacher)]
    assert sha(teacher) == sha(b)                                   # replaced while the run read it
    ck = torch.load(out / 'checkpoint.pt', weights_only=True)
    assert ck['distilled_from']['sha256'] == sha(a), 'recorded the file that came after the one loaded'
    assert json.loads((out / 'config.json').read_text())['teacher_sha256'] == sha(a)
    assert opened == 1, counted
    msg = run_in_process(monkeypatch, attention_distill, *TINY, '--teacher', teacher, '--max-steps', '2',
                         '--out-dir', out, '--resume', 'true')
    assert msg and sha(a) in msg and sha(b) in msg and '--new-teacher true' in msg, msg


def test_a_resume_compares_the_teacher_it_loads(runs, tmp_path, monkeypatch):
    """A resume loaded the teacher file, then hashed it again to compare with the record: B loaded, A put back before
    the hash, and the run went on from B as if it were A."""
    a, b = runs / 'ft' / 'checkpoint.pt', runs / 'other' / 'checkpoint.pt'
    teacher, out = tmp_path / 'teacher.pt', tmp_path / 'distill'
    shutil.copy(a, teacher)
    assert run_in_process(monkeypatch, attention_distill, *TINY, '--teacher', teacher, '--max-steps', '1',
                          '--out-dir', out) is None
    put(b, teacher)
    swapped_after_loading(monkeypatch, teacher, a)                  # the recorded teacher back, after the load
    msg = run_in_process(monkeypatch, attention_distill, *TINY, '--teacher', teacher, '--max-steps', '2',
                         '--out-dir', out, '--resume', 'true')
    assert msg and sha(a) in msg and sha(b) in msg and '--new-teacher true' in msg, msg
    assert torch.load(out / 'checkpoint.pt', weights_only=True)['step'] == 1


def test_a_copy_students_teacher_is_the_file_its_digest_was_compared_on(runs, tmp_path, monkeypatch):
    """A copy student's teacher was hashed (and found to be its own), then read again to be loaded: a file replaced
    between the two gave the student another teacher, and its predictions, without a word."""
    a, b = runs / 'ft' / 'checkpoint.pt', runs / 'other' / 'checkpoint.pt'
    teacher = tmp_path / 'teacher.pt'
    shutil.copy(a, teacher)
    real, done = builtins.open, []

    def swapping(file, mode='r', *args, **kwargs):
        f = real(file, mode, *args, **kwargs)
        if str(file) == str(teacher) and not done:                 # replaced once its first read is over
            close = f.close

            def closed():
                close()
                if not done:
                    done.append(file)
                    put(b, teacher)
            f.close = closed
        return f
    monkeypatch.setattr(builtins, 'open', swapping)
    model = load_copy_model(str(runs / 'copy' / 'checkpoint.pt'), str(teacher))
    assert done and sha(teacher) == sha(b)
    weights = torch.load(a, weights_only=True)['model']
    for k, v in model.teacher.state_dict().items():
        torch.testing.assert_close(v, weights[k].float(), msg=f'the teacher loaded is not the one compared ({k})')


def test_evaluate_records_the_bytes_it_loaded(runs, tmp_path, monkeypatch):
    """evaluate.py's results named the files scored (as ensemble.py's did), not what they held."""
    import evaluate
    a, b = runs / 'ft' / 'checkpoint.pt', runs / 'other' / 'checkpoint.pt'
    model = tmp_path / 'model.pt'
    shutil.copy(a, model)
    swapped_after_loading(monkeypatch, model, b)
    msg = run_in_process(monkeypatch, evaluate, '--data', 'fake', '--num-workers', '0', '--models', model,
                         '--out', tmp_path / 'out')
    assert msg is None, msg
    result = json.loads((tmp_path / 'out' / 'robustness.json').read_text())
    assert sha(model) == sha(b) and result.get('sha256') == {str(model): sha(a)}


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
    layer. Now settle_attention decides it and tells the teacher and the student once each."""
    calls = told(monkeypatch, attention_copy, *TINY, '--teacher', runs / 'ft' / 'checkpoint.pt',
                 '--max-steps', '1', '--attn-implementation', implementation, '--out-dir', tmp_path / 'copy')
    assert calls == [('attention_check.py', 'settle_attention')] * 2, calls
    # scoring trained models: on_device tells each model (the copy pair as one) once, after its check
    calls = told(monkeypatch, ensemble, *TINY, '--models', runs / 'other' / 'checkpoint.pt',
                 runs / 'copy' / 'checkpoint.pt', '--attn-implementation', implementation)
    assert calls == [('launch.py', 'on_device')] * 2, calls
