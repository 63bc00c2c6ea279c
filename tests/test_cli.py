"""finetune.py as a user runs it: the errors a user gets for bad input (one line, no traceback, nothing of an
earlier run overwritten)."""
import errno
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys

import urllib.error

import pytest
import torch

import attention_copy
import attention_distill
import data
from conftest import ROOT, TINY, finetune, run_in_process, sub_env
import finetune as finetune_script
from util import datafiles
from util.checkpoints import CheckpointError, build_from_checkpoint, load_weights, read_checkpoint
from vit import VisionTransformer


def read(path):
    """load_weights' source and checkpoint: a file's name and what read_checkpoint reads of it."""
    return str(path), read_checkpoint(str(path))


# -----------------------------------------------------------------------------
# Two processes under torchrun == one process with the same global batch (tests/test_transfer_scripts.py, on
# distillation; tests/test_resume.py)

SAME_MATHS = ['--amp', 'off', '--hflip', '0', '--crop-pad', '0', '--drop-path', '0', '--max-steps', '4',
              '--log-every', '1', '--blr', '0.01', '--warmup-epochs', '0']


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def ce_by_step(out_dir):
    with open(os.path.join(str(out_dir), 'log.txt')) as f:
        return {int(m.group(1)): float(m.group(2))
                for m in re.finditer(r'step (\d+)/\d+ \| ce ([0-9.]+)', f.read())}


# -----------------------------------------------------------------------------
# 8. Bad input: one line on stderr, non-zero exit, no traceback


def assert_one_line_error(p, *words):
    assert p.returncode != 0, f'expected a failure, got exit 0:\n{p.stdout[-2000:]}'
    err = p.stderr
    assert 'Traceback' not in err, err[-4000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and len(lines) <= 2, f'expected one error line, got {len(lines)}:\n{err[-4000:]}'
    assert 'error:' in lines[-1], lines[-1]
    for w in words:
        assert w in lines[-1], (w, lines[-1])
    return lines[-1]


@pytest.fixture(scope='module')
def depth2_run(tmp_path_factory):
    """A finished tiny run (depth 2) and its model as a plain state-dict file."""
    out = tmp_path_factory.mktemp('cli') / 'depth2'
    finetune(out, '--max-steps', '2', '--amp', 'off')
    ck = torch.load(out / 'checkpoint.pt', map_location='cpu', weights_only=False)
    plain = out.parent / 'depth2_state_dict.pt'
    torch.save(ck['model'], plain)
    return out, plain


def test_unknown_data_name(tmp_path):
    assert_one_line_error(finetune(tmp_path / 'r', '--data', 'nosuchdata', check=False), 'nosuchdata')


def test_missing_dataset_directory(tmp_path):
    p = finetune(tmp_path / 'r', '--data', 'folder', '--data-dir', tmp_path / 'missing', check=False)
    assert_one_line_error(p, str(tmp_path / 'missing'))


def test_init_not_a_checkpoint(tmp_path):
    bad = tmp_path / 'weights.pt'
    bad.write_text('these are not weights\n')
    assert_one_line_error(finetune(tmp_path / 'r', '--init', bad, check=False), str(bad))
    missing = tmp_path / 'nothing_here.pt'
    assert_one_line_error(finetune(tmp_path / 'r', '--init', missing, check=False), str(missing))


@pytest.mark.parametrize('source, change, says', [
    ('state_dict', ['--init-num-heads', '3', '--depth', '3'], 'architecture mismatch'),
    ('state_dict', ['--init-num-heads', '3', '--embed-dim', '96'], 'architecture mismatch'),
    ('state_dict', ['--init-num-heads', '6'], 'the checkpoint has num_heads 6 (here 3)'),
    ('state_dict', [], 'do not say how many attention heads'),   # weights alone: never guessed
    ('checkpoint', ['--depth', '3'], 'architecture mismatch'),
])
def test_init_architecture_mismatch(depth2_run, tmp_path, source, change, says):
    out, plain = depth2_run
    src = plain if source == 'state_dict' else out / 'checkpoint.pt'
    p = finetune(tmp_path / 'r', '--init', src, *change, check=False)
    assert_one_line_error(p, says)


def test_init_from_own_checkpoint(depth2_run, tmp_path):
    """The positive case next to the mismatches: this project's checkpoint.pt, the same architecture,
    loads (blr 0: the weights cannot move, so the result is exactly what was loaded)."""
    out, _ = depth2_run
    finetune(tmp_path / 'r', '--init', out / 'checkpoint.pt', '--blr', '0', '--max-steps', '1', '--amp', 'off')
    src = torch.load(out / 'checkpoint.pt', map_location='cpu', weights_only=False)['model']
    got = torch.load(tmp_path / 'r' / 'checkpoint.pt', map_location='cpu', weights_only=False)['model']
    assert src.keys() == got.keys()
    assert all(torch.equal(src[k], got[k]) for k in src)


def test_blr_0_keeps_the_weights_as_loaded_after_the_warm_up_too(depth2_run, tmp_path):
    """--blr 0 was exempt from "the lr never rises": with --min-lr 1e-2 the cosine rose from 0 to 1e-2 and trained
    the weights meant to stay as loaded. A peak of 0 ends at 0, and the start log says so."""
    out, _ = depth2_run
    p = finetune(tmp_path / 'r', '--init', out / 'checkpoint.pt', '--blr', '0', '--min-lr', '1e-2', '--warmup-epochs',
                 '0', '--max-steps', '3', '--amp', 'off')
    assert 'lr 0 = blr 0 x effective batch 32 / 256 at its peak, 0 at the end |' in p.stdout
    src = torch.load(out / 'checkpoint.pt', weights_only=True)['model']
    got = torch.load(tmp_path / 'r' / 'checkpoint.pt', weights_only=True)['model']
    assert src.keys() == got.keys() and all(torch.equal(src[k], got[k]) for k in src)


def test_a_loader_that_cannot_start_its_workers_stops_before_anything_is_written(tmp_path, monkeypatch, capfd):
    """--num-workers 100 under a container's process limit (here fork is made to fail as the kernel makes it: EAGAIN):
    no check of ours foresees it, so its traceback is shown, with no advice to run the same command again. The
    start-up check takes the run's first evaluation batch, so the loader's workers start before the run directory
    is written: nothing written."""
    def refused():
        raise BlockingIOError(errno.EAGAIN, 'Resource temporarily unavailable')
    monkeypatch.setattr(os, 'fork', refused)
    monkeypatch.setattr(datafiles, 'FAKE_HELD', 0)   # read per image by loader workers, as a folder is
    out = tmp_path / 'r'
    msg = run_in_process(monkeypatch, finetune_script, *TINY[:-2], '--num-workers', '100', '--out-dir', out)
    assert msg == (f'error: BlockingIOError: [Errno {errno.EAGAIN}] Resource temporarily unavailable (its '
                   f'traceback above); more processes than this machine allows: lower --num-workers'), msg
    err = capfd.readouterr().err
    assert 'Traceback (most recent call last)' in err and 'in refused' in err, err[-3000:]
    assert not out.exists()


def test_a_newline_in_out_dir_is_refused_in_one_line(tmp_path, monkeypatch):
    """--out-dir 'run<newline>b' cut every line that names the run in two (the log, the error lines)."""
    monkeypatch.chdir(tmp_path)
    msg = run_in_process(monkeypatch, finetune_script, *TINY, '--out-dir', 'run\nb', '--max-steps', '1')
    assert msg and msg.startswith('error: --out-dir ') and os.listdir(tmp_path) == [], msg


# an error of no kind the project raises, planted where a learner's own bug would be: in data.py, or in the step
def planted(*args, **kwargs):
    raise KeyError('oops')


@pytest.mark.parametrize('where', ['data.py', 'the step'])
def test_an_unexpected_error_shows_its_traceback_and_no_advice_to_continue(tmp_path, monkeypatch, capfd, where):
    """A KeyError put into data.py printed one line, `error: KeyError: 'oops' (raised at data.py:228); no checkpoint
    was saved yet: there is nothing to continue; run the command again`: a learner's own bug hidden, with advice that
    would meet it again. Its traceback is on stderr (and in the run's log once there is one); the line after it says
    where, and how to continue only where a checkpoint was saved."""
    out = tmp_path / 'r'
    if where == 'data.py':
        monkeypatch.setattr(data, 'build_splits', planted)
        args = TINY
    else:   # the third step, after the checkpoint of step 2
        steps = []

        def loss(cfg):
            def loss_fn(net, x, y):
                steps.append(1)
                if len(steps) == 3:
                    planted()
                return real(cfg)(net, x, y)
            return loss_fn
        real = finetune_script.classification_loss
        monkeypatch.setattr(finetune_script, 'classification_loss', loss)
        args = [*TINY, '--max-steps', '4', '--save-every', '2']
    msg = run_in_process(monkeypatch, finetune_script, *args, '--out-dir', out)
    err = capfd.readouterr().err
    assert msg.startswith("error: KeyError: 'oops' (its traceback above"), msg
    assert 'Traceback (most recent call last)' in err and 'in planted' in err and "KeyError: 'oops'" in err, err
    assert 'run the command again' not in msg and 'nothing to continue' not in msg, msg
    if where == 'data.py':
        assert 'continue' not in msg and not out.exists(), msg
    else:
        log = (out / 'log.txt').read_text()
        assert f'in {out / "log.txt"} too)' in msg and 'in planted' in log, msg
        assert msg.endswith(f'{out / "checkpoint.pt"} holds the last checkpoint; continue with: python finetune.py '
                            f'{" ".join(map(str, args))} --out-dir {out} --resume true'), msg


@pytest.mark.parametrize('script', ['finetune.py', 'mae_pretrain.py', 'attention_copy.py', 'attention_distill.py',
                                    'ensemble.py', 'evaluate.py'])
def test_ctrl_c_while_torch_is_imported_exits_130_quietly(script, tmp_path):
    """Ctrl-C in a script's first second, while it imports torch, printed a KeyboardInterrupt traceback. A fresh
    interpreter (no fork server), the SIGINT sent once -X importtime says a module of torch has been imported."""
    p = subprocess.Popen([sys.executable, '-X', 'importtime', script, '--out-dir', str(tmp_path / 'r')], cwd=ROOT,
                         env=sub_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in p.stderr:
        lines.append(line)
        if line.startswith('import time:') and line.split('|')[-1].strip().split('.')[0] == 'torch':
            break
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    said = [line for line in lines + err.splitlines(True) if not line.startswith('import time:')]
    assert any('torch' in line for line in lines), 'torch was never imported'
    assert p.returncode == 130 and not ''.join(said).strip(), (p.returncode, ''.join(said)[-2000:])


def test_unknown_config_key(tmp_path):
    assert_one_line_error(finetune(tmp_path / 'r', '--no-such-key', '1', check=False), '--no-such-key')


def test_resume_without_checkpoint(tmp_path):
    empty = tmp_path / 'empty'
    empty.mkdir()
    assert_one_line_error(finetune(empty, '--resume', 'true', check=False), 'checkpoint')
    assert os.listdir(empty) == []


# -----------------------------------------------------------------------------
# 9. Nothing of an earlier run is overwritten


def digest(d):
    return {name: hashlib.sha256((d / name).read_bytes()).hexdigest() for name in sorted(os.listdir(d))}


def test_existing_run_is_not_overwritten(depth2_run, tmp_path):
    out, _ = depth2_run
    before = digest(out)
    assert {'checkpoint.pt', 'metrics.jsonl', 'config.json', 'log.txt'} <= set(before)
    assert_one_line_error(finetune(out, '--max-steps', '2', '--amp', 'off', check=False), '--resume')
    assert digest(out) == before
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(b'\x00not a checkpoint')
    assert_one_line_error(finetune(out, '--init', bad, '--max-steps', '2', check=False))
    assert digest(out) == before


def test_failed_resume_start_leaves_run_untouched(depth2_run, tmp_path):
    """--resume true with a bad --init fails before training; the run's files (config.json included)
    must stay as they were."""
    out, _ = depth2_run
    before = digest(out)
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(b'\x00not a checkpoint')
    assert_one_line_error(finetune(out, '--init', bad, '--resume', 'true', check=False), str(bad))
    changed = sorted(k for k in set(before) | set(digest(out)) if before.get(k) != digest(out).get(k))
    assert not changed, f'a failed --resume start changed {changed} in the run dir'


# -----------------------------------------------------------------------------
# 10. Checkpoints that do not fit, names that cannot be fetched, directories that cannot be written


def save_vit(path, extra=None, **arch):
    model = VisionTransformer(**{**dict(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=4,
                                        num_classes=10), **arch})
    torch.save({'model': model.state_dict(), 'arch': model.arch, **(extra or {})}, path)
    return path


def test_init_compares_heads_and_every_recorded_field(tmp_path, monkeypatch):
    """4 heads and 3 heads of a 48-wide model have tensors of the same shapes: only 'arch' tells them apart."""
    four = save_vit(tmp_path / 'four.pt')
    with pytest.raises(CheckpointError, match=r'num_heads 4 \(here 3\)'):
        load_weights(VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3), *read(four))
    # what loading adapts may differ: image size (position embeddings resized), classes (new head), pooling
    load_weights(VisionTransformer(img_size=64, patch_size=8, embed_dim=48, depth=1, num_heads=4, num_classes=5,
                                   global_pool=True), *read(four))
    msg = run_in_process(monkeypatch, finetune_script, *TINY, '--out-dir', tmp_path / 'r', '--init', four,
                         '--embed-dim', '48', '--depth', '1', '--num-heads', '3')
    assert msg and 'architecture mismatch' in msg and 'num_heads 4 (here 3)' in msg, msg


def test_copy_student_is_neither_a_teacher_nor_an_init(tmp_path, monkeypatch):
    copy = save_vit(tmp_path / 'copy.pt', extra={'teacher': {'source': 't.pt', 'sha256': None}}, no_qk_layers=[0])
    for load in (lambda: build_from_checkpoint(str(copy)),
                 lambda: load_weights(VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=1,
                                                        num_heads=4), *read(copy))):
        with pytest.raises(CheckpointError, match='is an attention-copy student'):
            load()
    msg = run_in_process(monkeypatch, attention_distill, *TINY, '--out-dir', tmp_path / 'r', '--teacher', copy)
    assert msg and 'is an attention-copy student' in msg, msg


@pytest.mark.parametrize('arch', [{'embed_dim': 50, 'num_heads': 3}, {'no_such_field': 1}])
def test_checkpoint_with_a_bad_arch(tmp_path, arch):
    path = tmp_path / 'bad.pt'
    torch.save({'model': VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=1).state_dict(),
                'arch': {**VisionTransformer(depth=1).arch, **arch}}, path)
    for size in (None, 64):   # the checkpoint's fault, whatever the caller asks for
        with pytest.raises(CheckpointError, match="bad.pt' cannot be built"):
            build_from_checkpoint(str(path), img_size=size)


def test_teacher_at_an_image_size_its_patches_do_not_divide(tmp_path, monkeypatch):
    """--img-size 30 with a patch-8 teacher: one line naming the file and the size VisionTransformer refuses."""
    path = save_vit(tmp_path / 'teacher.pt')
    with pytest.raises(CheckpointError, match=r"cannot be built \(img_size 30 is not a multiple"):
        build_from_checkpoint(str(path), img_size=30)
    msg = run_in_process(monkeypatch, attention_distill, *TINY, '--out-dir', tmp_path / 'r', '--teacher', path,
                         '--img-size', '30')
    assert msg and 'cannot be built (img_size 30 is not a multiple' in msg and str(path) in msg, msg


def test_pretrained_name_offline_says_where_to_put_the_file(tmp_path, monkeypatch):
    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError('no network')
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))
    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    with pytest.raises(CheckpointError) as e:
        build_from_checkpoint('mae_vit_base')
    msg = str(e.value)
    assert os.path.join(str(tmp_path / 'hub'), 'checkpoints', 'mae_pretrain_vit_base.pth') in msg and 'by hand' in msg
    assert '\n' not in msg


@pytest.mark.parametrize('name, file', [('deit_small', 'deit_small_patch16_224-cd65a155.pth'),
                                        ('clip_vitb16', 'ViT-B-16.pt')])
def test_teacher_name_offline_says_where_to_put_the_file(tmp_path, monkeypatch, name, file):
    """The other families by name (util/pretrained.py; CLIP's TorchScript its own way) fail offline as MAE's do."""
    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError('no network')
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))
    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    with pytest.raises(CheckpointError) as e:
        build_from_checkpoint(name)
    msg = str(e.value)
    assert os.path.join(str(tmp_path / 'hub'), 'checkpoints', file) in msg and 'by hand' in msg and '\n' not in msg
    msg = run_in_process(monkeypatch, attention_distill, *TINY, '--out-dir', tmp_path / 'r', '--teacher', name)
    assert msg and msg.startswith(f"error: '{name}' could not be downloaded"), msg


@pytest.mark.skipif(not os.path.isdir('/proc/self'), reason='needs Linux /proc')
def test_unusable_out_dir(tmp_path, monkeypatch):
    (tmp_path / 'a_file').write_text('mine\n')
    msg = run_in_process(monkeypatch, finetune_script, *TINY, '--out-dir', tmp_path / 'a_file', '--max-steps', '1')
    assert msg and f"{tmp_path / 'a_file'}: cannot make it (File exists)" in msg, msg
    assert (tmp_path / 'a_file').read_text() == 'mine\n'
    msg = run_in_process(monkeypatch, finetune_script, *TINY, '--out-dir', '/proc/no/such/run', '--max-steps', '1')
    assert msg and '/proc/no/such/run: cannot make it' in msg, msg


# -----------------------------------------------------------------------------
# 11. Values that break only once used, outputs written only at the end: refused before any work


def test_a_layer_decay_offset_that_underflows_the_lr_scale(tmp_path, monkeypatch, depth2_run):
    """0.5 ** 2000 is 0.0: refused with the flag named (it ended in a ZeroDivisionError at the first log line).
    A teacher-sized student's depth is known only from its teacher: 0.5 ** (2 + 1074) is refused there."""
    msg = run_in_process(monkeypatch, finetune_script, *TINY, '--out-dir', tmp_path / 'r', '--layer-decay', '0.5',
                         '--layer-decay-offset', '2000')
    assert msg and msg.startswith('error: --layer-decay-offset 2000') and 'is 0 in floating point' in msg, msg
    assert not (tmp_path / 'r').exists()
    msg = run_in_process(monkeypatch, attention_distill, *TINY, '--out-dir', tmp_path / 'd', '--layer-decay', '0.5',
                         '--layer-decay-offset', '1074', '--teacher', depth2_run[0] / 'checkpoint.pt')
    assert msg and msg.startswith('error: --layer-decay-offset 1074') and 'is 0 in floating point' in msg, msg
    assert not (tmp_path / 'd').exists()        # refused: the folder it made is gone again


def test_evaluate_out_is_checked_before_any_model_is_loaded(tmp_path, monkeypatch):
    """evaluate.py writes --out after every model has run on every set: a file, or a folder under a file, is
    refused first (the models named here do not even exist)."""
    import evaluate
    (tmp_path / 'a_file').write_text('mine\n')
    for out in (tmp_path / 'a_file', tmp_path / 'a_file' / 'res'):
        says = f'cannot write there ({tmp_path / "a_file"}: Not a directory): choose another --out'
        msg = run_in_process(monkeypatch, evaluate, '--models', tmp_path / 'missing.pt', '--imagenet', tmp_path,
                             '--out', out)
        assert msg and msg.startswith(f'error: --out {out}') and says in msg, msg
    assert (tmp_path / 'a_file').read_text() == 'mine\n' and sorted(os.listdir(tmp_path)) == ['a_file']


def test_a_copy_student_whose_teacher_is_gone_says_how_to_point_at_it(tmp_path, monkeypatch, depth2_run):
    from attention_copy import load_copy_model
    teacher = tmp_path / 'teacher.pt'
    teacher.write_bytes((depth2_run[0] / 'checkpoint.pt').read_bytes())
    msg = run_in_process(monkeypatch, attention_copy, *TINY, '--out-dir', tmp_path / 'copy', '--teacher', teacher,
                         '--max-steps', '1')
    assert msg is None, msg
    student, moved = str(tmp_path / 'copy' / 'checkpoint.pt'), tmp_path / 'moved.pt'
    teacher.rename(moved)
    digest = hashlib.sha256(moved.read_bytes()).hexdigest()
    with pytest.raises(CheckpointError) as e:
        load_copy_model(student)
    assert f'its recorded teacher {teacher} (sha256 {digest}) is gone' in str(e.value)
    assert 'teacher_source=' in str(e.value) and '--teacher' in str(e.value) and '\n' not in str(e.value)
    with pytest.raises(CheckpointError, match=f'the teacher given for it, {tmp_path / "nope.pt"}, is not a file'):
        load_copy_model(student, str(tmp_path / 'nope.pt'))
    assert load_copy_model(student, str(moved))(torch.randn(2, 3, 32, 32)).shape == (2, 10)
