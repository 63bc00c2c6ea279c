"""finetune.py as a user runs it: under torchrun (2 CPU processes, gloo) against one process, and the
errors a user gets for bad input (one line, no traceback, nothing of an earlier run overwritten)."""
import hashlib
import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY, finetune, read_metrics, sub_env

# -----------------------------------------------------------------------------
# 7. Two processes under torchrun == one process with the same global batch

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


def test_torchrun_two_processes_match_one(tmp_path):
    one, two = tmp_path / 'one', tmp_path / 'two'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes', '1', '--nproc_per_node', '2',
           '--master_addr', '127.0.0.1', '--master_port', str(free_port()),
           'finetune.py', *TINY, '--out-dir', str(two), '--batch-size', '16', *SAME_MATHS]
    p2 = subprocess.Popen(cmd, cwd=ROOT, env=sub_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        finetune(one, '--batch-size', '32', *SAME_MATHS)
        out2, err2 = p2.communicate(timeout=240)
    finally:
        if p2.poll() is None:
            p2.kill()
    assert p2.returncode == 0, f'torchrun failed ({p2.returncode}):\n{out2[-2000:]}\n{err2[-4000:]}'
    with open(two / 'config.json') as f:
        assert json.load(f)['world_size'] == 2
    with open(one / 'config.json') as f:
        assert json.load(f)['world_size'] == 1
    ce1, ce2 = ce_by_step(one), ce_by_step(two)
    assert sorted(ce1) == sorted(ce2) == [1, 2, 3, 4], (ce1, ce2)
    for s in ce1:
        assert ce2[s] == pytest.approx(ce1[s], rel=1e-4), f'step {s}: ce {ce1[s]} (1 proc) vs {ce2[s]} (2 procs)'
    assert len({round(v, 3) for v in ce1.values()}) > 1   # the steps saw different data / weights
    m1, m2 = read_metrics(one)[-1], read_metrics(two)[-1]
    assert m1['step'] == m2['step'] == 4
    assert m1['top1'] == m2['top1'] and m1['top5'] == m2['top5']
    assert m2['loss'] == pytest.approx(m1['loss'], rel=1e-4)


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


@pytest.mark.parametrize('source, change', [
    ('state_dict', ['--depth', '3']),
    ('state_dict', ['--embed-dim', '96']),
    ('checkpoint', ['--depth', '3']),
])
def test_init_architecture_mismatch(depth2_run, tmp_path, source, change):
    out, plain = depth2_run
    src = plain if source == 'state_dict' else out / 'checkpoint.pt'
    p = finetune(tmp_path / 'r', '--init', src, *change, check=False)
    assert_one_line_error(p, 'architecture mismatch')


def test_init_from_own_checkpoint(depth2_run, tmp_path):
    """The positive case next to the mismatches: this project's checkpoint.pt, the same architecture,
    loads (blr 0: the weights cannot move, so the result is exactly what was loaded)."""
    out, _ = depth2_run
    finetune(tmp_path / 'r', '--init', out / 'checkpoint.pt', '--blr', '0', '--max-steps', '1', '--amp', 'off')
    src = torch.load(out / 'checkpoint.pt', map_location='cpu', weights_only=False)['model']
    got = torch.load(tmp_path / 'r' / 'checkpoint.pt', map_location='cpu', weights_only=False)['model']
    assert src.keys() == got.keys()
    assert all(torch.equal(src[k], got[k]) for k in src)


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
