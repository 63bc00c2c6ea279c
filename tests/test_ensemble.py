"""ensemble.py: the maths of averaging probabilities and of disagreement, loading and checking models,
and a run over two tiny fine-tuned models and a copy student whose numbers match their own runs'."""
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys

import pytest
import torch

from attention_copy import load_copy_model
import attention_copy
from conftest import ROOT, TINY, finetune, read_metrics, run_in_process, run_script, sub_env
import ensemble
from ensemble import (PRESETS, EnsembleConfig, disagreement, ensemble_probs, load_models, normalise_weights,
                      summarise)
from util.checkpoints import CheckpointError
from util.launch import parse_config
from util.config import ConfigError
from util.engine import accuracy
from vit import VisionTransformer


# -----------------------------------------------------------------------------
# The maths


def test_ensemble_of_identical_models_is_the_model():
    torch.manual_seed(0)
    logits, labels = torch.randn(50, 7), torch.randint(0, 7, (50,))
    probs = ensemble_probs([logits, logits.clone()])
    assert torch.allclose(probs, logits.softmax(-1), atol=1e-7)
    for k in (1, 5):
        assert accuracy(probs, labels, k) == accuracy(logits, labels, k)
    r = summarise(['a', 'b'], [0.5, 0.5], [logits, logits.clone()], labels)
    assert r['ensemble'] == {'top1': r['models'][0]['top1'], 'top5': r['models'][0]['top5']}
    assert r['disagreement'] == [{'a': 'a', 'b': 'b', 'rate': 0.0}]


def test_probabilities_sum_to_one_and_weights_are_normalised():
    torch.manual_seed(0)
    a, b, c = torch.randn(3, 20, 10) * 4

    def weighted(logits, w):   # --weights w, as ensemble.py hands them over
        return ensemble_probs(logits, normalise_weights(w, len(logits)))
    for w in (None, [1, 1, 1], [0.2, 3, 1], [0, 0, 5]):
        assert torch.allclose(weighted([a, b, c], w).sum(-1), torch.ones(20), atol=1e-6)
    assert torch.allclose(weighted([a, b], [2, 2]), ensemble_probs([a, b]), atol=1e-7)
    assert torch.allclose(weighted([a, b], [3, 1]), 0.75 * a.softmax(-1) + 0.25 * b.softmax(-1), atol=1e-6)
    assert torch.allclose(weighted([a, b], [1, 0]), a.softmax(-1), atol=1e-7)
    assert normalise_weights([1, 3], 2) == [0.25, 0.75] and normalise_weights(None, 4) == [0.25] * 4
    for bad in ([1], [1, -1], [0, 0]):
        with pytest.raises(ConfigError):
            normalise_weights(bad, 2)


def test_ensemble_averages_probabilities_not_logits():
    # logits (3, 0) and (0, 4): the mean of their probabilities is (0.485, 0.515); the softmax of
    # their mean logits (1.5, 2) would be (0.378, 0.622)
    a, b = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 4.0]])
    probs = ensemble_probs([a, b])
    assert torch.allclose(probs, (a.softmax(-1) + b.softmax(-1)) / 2)
    assert not torch.allclose(probs, ((a + b) / 2).softmax(-1), atol=1e-2)


def test_disagreement():
    p = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    assert disagreement(p, p) == 0.0
    assert disagreement(p, torch.tensor([0, 1, 2, 3, 0, 0, 0, 0])) == 0.5
    assert disagreement(p, p + 1) == 1.0
    torch.manual_seed(0)
    a, b = torch.randn(100, 10), torch.randn(100, 10)
    assert disagreement(a.argmax(-1), b.argmax(-1)) > 0


def test_list_flags():
    cfg = parse_config(EnsembleConfig, PRESETS, ['--models', 'a.pt', 'b.pt', '--weights', '1', '2', '--data', 'fake'])
    assert (cfg.models, cfg.weights, cfg.data) == (['a.pt', 'b.pt'], [1.0, 2.0], 'fake')
    with pytest.raises(ConfigError, match='--models is required'):
        parse_config(EnsembleConfig, PRESETS, [])
    with pytest.raises(SystemExit):
        parse_config(EnsembleConfig, PRESETS, ['--weights', 'one'])

# -----------------------------------------------------------------------------
# Loading models


def save_vit(path, **arch):
    model = VisionTransformer(**{**dict(patch_size=8, embed_dim=32, depth=1, num_heads=2), **arch})
    torch.save({'model': model.state_dict(), 'arch': model.arch}, path)
    return str(path)


def test_models_must_share_an_image_size_and_have_a_classifier(tmp_path):
    a, b = save_vit(tmp_path / 'a.pt', img_size=32, num_classes=10), save_vit(tmp_path / 'b.pt', img_size=32)
    models, records, size = load_models([a, b])
    assert size == 32 and [r['num_classes'] for r in records] == [10, 1000] and not models[0].training
    with pytest.raises(ConfigError, match='different image sizes'):
        load_models([a, save_vit(tmp_path / 'c.pt', img_size=16, num_classes=10)])
    with pytest.raises(ConfigError, match='no classifier'):
        load_models([a, save_vit(tmp_path / 'd.pt', img_size=32, num_classes=0)])

# -----------------------------------------------------------------------------
# End to end


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp('ensemble')
    for seed in (0, 1):
        finetune(d / f'ft{seed}', '--max-steps', '3', '--seed', str(seed))
    p = run_script('attention_copy.py', *TINY, '--out-dir', d / 'copy', '--teacher', d / 'ft0' / 'checkpoint.pt',
                   '--max-steps', '3')
    assert p.returncode == 0, f'attention_copy.py failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}'
    return d


def test_ensemble_script_prints_the_table_and_matches_each_run(runs, tmp_path):
    paths = [str(runs / r / 'checkpoint.pt') for r in ('ft0', 'ft1', 'copy')]
    p = run_script('ensemble.py', *TINY, '--models', *paths, '--weights', '1', '1', '2',
                   '--out', tmp_path / 'r.json')
    assert p.returncode == 0, f'ensemble.py failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}'
    for path in paths:
        assert f'| {path} |' in p.stdout
    assert '| ensemble' in p.stdout and 'disagreement' in p.stdout
    with open(tmp_path / 'r.json') as f:
        r = json.load(f)
    assert [m['weight'] for m in r['models']] == [0.25, 0.25, 0.5] and len(r['disagreement']) == 3
    # each model's top-1 is what its own run measured on the same test split (one image of slack: batching)
    for m, run in zip(r['models'], ('ft0', 'ft1', 'copy')):
        assert abs(m['top1'] - read_metrics(runs / run)[-1]['top1']) <= 100 / r['images'] + 1e-9
    assert all(0 <= d['rate'] <= 1 for d in r['disagreement'])
    assert r['disagreement'][0]['rate'] > 0        # two models trained from different seeds


def test_ensemble_script_errors_are_one_line(runs):
    p = run_script('ensemble.py', *TINY, '--models', runs / 'ft0' / 'checkpoint.pt', '--weights', '1', '2')
    assert p.returncode != 0 and 'Traceback' not in p.stderr
    assert 'error: --weights: 2 weights for 1 models' in p.stderr

# -----------------------------------------------------------------------------
# Nothing written over, no other teacher


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_out_is_never_written_over_another_file(runs, tmp_path, monkeypatch):
    ckpt = runs / 'ft0' / 'checkpoint.pt'
    models = ['--models', ckpt]
    before = digest(ckpt)
    for more in ([], ['--overwrite', 'true']):     # the model it evaluates! Not even when told to overwrite
        msg = run_in_process(monkeypatch, ensemble, *TINY, *models, '--out', ckpt, *more)
        assert msg and 'is a file this command reads' in msg, msg
    assert digest(ckpt) == before
    other = tmp_path / 'other.pt'
    other.write_bytes(ckpt.read_bytes())
    msg = run_in_process(monkeypatch, ensemble, *TINY, *models, '--out', other)       # a checkpoint it does not read
    assert msg and 'is not an earlier result of ensemble.py' in msg and '--overwrite true' in msg, msg
    notes = tmp_path / 'notes.json'
    notes.write_text('{"mine": 1}\n')
    assert 'is not an earlier result' in run_in_process(monkeypatch, ensemble, *TINY, *models, '--out', notes)
    assert notes.read_text() == '{"mine": 1}\n'
    assert run_in_process(monkeypatch, ensemble, *TINY, *models, '--out', notes, '--overwrite', 'true') is None
    assert json.loads(notes.read_text())['models'][0]['model'] == str(ckpt)
    # its own earlier result is replaced without asking
    assert run_in_process(monkeypatch, ensemble, *TINY, *models, '--weights', '2', '--out', notes) is None
    for bad, says in ((tmp_path, 'is a directory'), ('/proc/no/such/result.json', 'cannot write there')):
        msg = run_in_process(monkeypatch, ensemble, *TINY, *models, '--out', bad)
        assert msg and says in msg, msg


def test_a_file_put_at_out_while_the_models_are_scored_is_kept(runs, tmp_path, monkeypatch):
    """ensemble.py --out R.json took R.json (an earlier result of its own) as its own when it started, and wrote over
    the file a user moved there while the models were scored: the rule holds at the moment of writing."""
    out = tmp_path / 'r.json'
    models = ['--models', runs / 'ft0' / 'checkpoint.pt']
    assert run_in_process(monkeypatch, ensemble, *TINY, *models, '--out', out) is None   # its own, replaceable
    score = ensemble.score

    def a_user_moves_a_file_there(*args):
        out.write_text('{"mine": 1}\n')
        return score(*args)
    monkeypatch.setattr(ensemble, 'score', a_user_moves_a_file_there)
    msg = run_in_process(monkeypatch, ensemble, *TINY, *models, '--out', out)
    assert msg and f'cannot write {out} (File exists)' in msg, msg
    assert out.read_text() == '{"mine": 1}\n' and os.listdir(tmp_path) == ['r.json']


def test_out_naming_a_pipe_is_refused_before_it_is_opened(runs, tmp_path):
    """A FIFO as --out (opened to see whether it is an earlier result, it blocks until a writer comes, for ever):
    refused in one line naming --out, non-zero exit, the pipe left as it is, within seconds."""
    fifo = tmp_path / 'r.json'
    os.mkfifo(fifo)
    p = run_script('ensemble.py', *TINY, '--models', runs / 'ft0' / 'checkpoint.pt', '--out', fifo, timeout=60)
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1, p.stderr[-3000:]
    assert lines[0].startswith(f'error: --out {fifo} is not a regular file'), lines
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)       # not replaced by a file


def test_copy_student_refuses_another_teacher(runs, tmp_path, monkeypatch):
    """The copy student's checkpoint records its teacher's SHA-256: the teacher file replaced by another
    model of the same shape is refused (both hashes shown), unless --new-teacher true says it is meant."""
    teacher = tmp_path / 'teacher.pt'
    shutil.copy(runs / 'ft0' / 'checkpoint.pt', teacher)
    msg = run_in_process(monkeypatch, attention_copy, *TINY, '--out-dir', tmp_path / 'copy', '--teacher', teacher,
                         '--max-steps', '1')
    assert msg is None, msg
    student = str(tmp_path / 'copy' / 'checkpoint.pt')
    moved = tmp_path / 'moved.pt'
    shutil.move(teacher, moved)
    shutil.copy(runs / 'ft1' / 'checkpoint.pt', teacher)   # another teacher where the recorded one was
    old, new = digest(moved), digest(teacher)
    with pytest.raises(CheckpointError) as e:
        load_copy_model(student)
    assert old in str(e.value) and new in str(e.value)
    msg = run_in_process(monkeypatch, ensemble, *TINY, '--models', student)
    assert msg and old in msg and new in msg and '--new-teacher true' in msg, msg
    # the same teacher moved: accepted; another one on purpose: accepted
    x = torch.randn(2, 3, 32, 32)
    same, other = load_copy_model(student, str(moved)), load_copy_model(student, new_teacher=True)
    assert not torch.allclose(same(x), other(x))
    assert run_in_process(monkeypatch, ensemble, *TINY, '--models', student, '--teacher', moved) is None
    assert run_in_process(monkeypatch, ensemble, *TINY, '--models', student, '--new-teacher', 'true') is None


def without(d, key):
    return {k: v for k, v in d.items() if k != key}


@pytest.mark.parametrize('damage, says', [
    (lambda c: {**c, 'teacher': 'teacher.pt'}, 'lacks teacher .a dict.'),
    (lambda c: {**c, 'teacher': without(c['teacher'], 'source')}, 'lacks teacher.source'),
    (lambda c: {**c, 'teacher': {**c['teacher'], 'img_size': '32'}}, 'lacks teacher.img_size'),
    (lambda c: {**c, 'teacher': without(without(c['teacher'], 'layers'), 'layer_map')}, 'lacks teacher.layers'),
    (lambda c: without(c, 'arch'), 'lacks arch'),
    (lambda c: {**c, 'teacher': {**c['teacher'], 'transfer': 'qq'}}, "does not fit it or its teacher .KeyError: 'qq'"),
    (lambda c: {**c, 'teacher': {**c['teacher'], 'layer_map': {0: 7}}}, 'does not fit it or its teacher .IndexError'),
    (lambda c: {**c, 'model': 3}, 'holds no state dict'),
    (lambda c: without(c, 'teacher'), 'is an attention-copy student: .* runs only with its teacher'),
], ids=['record-not-dict', 'no-source', 'img-size-str', 'no-layers', 'no-arch', 'transfer', 'layer-out-of-range',
        'model-not-dict', 'no-record'])
def test_a_malformed_record_is_one_line_naming_the_file(runs, tmp_path, monkeypatch, damage, says):
    """A checkpoint that loads (weights only) but holds a malformed record: refused when the models are loaded,
    naming the file (it used to end in a traceback, some only part-way through the test set)."""
    ckpt = torch.load(runs / 'copy' / 'checkpoint.pt', weights_only=True)
    bad = tmp_path / 'bad.pt'
    torch.save(damage(ckpt), bad)
    with pytest.raises(CheckpointError, match=says) as e:
        load_models([str(runs / 'ft0' / 'checkpoint.pt'), str(bad)])
    assert str(bad) in str(e.value).split(' ')[0], e.value
    msg = run_in_process(monkeypatch, ensemble, *TINY, '--models', runs / 'ft0' / 'checkpoint.pt', bad)
    assert msg and str(bad) in msg.split(' ')[1] and re.search(says, msg), msg


def test_a_record_made_before_the_layer_map_loads_the_same_model(runs, tmp_path):
    """A copy student's record names its layers as 'layer_map' ({student: teacher}); records made before the map
    named the same layers of both models as 'layers'. Such a record rebuilds the model the map does."""
    ckpt = torch.load(runs / 'copy' / 'checkpoint.pt', weights_only=True)
    layer_map = ckpt['teacher']['layer_map']
    assert 'layers' not in ckpt['teacher'] and all(s == t for s, t in layer_map.items())
    old = {**without(ckpt['teacher'], 'layer_map'), 'layers': sorted(layer_map.values())}
    torch.save({**ckpt, 'teacher': old}, tmp_path / 'old.pt')
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_copy_model(str(tmp_path / 'old.pt'))(x),
                                   load_copy_model(str(runs / 'copy' / 'checkpoint.pt'))(x))


def test_ensemble_piped_to_head_writes_its_results_and_no_traceback(runs, tmp_path):
    """`python ensemble.py ... | head`: the pipe closes before the table is printed; the --out file is written all
    the same, and nothing but that is lost (no traceback)."""
    paths = [str(runs / r / 'checkpoint.pt') for r in ('ft0', 'ft1')]
    p = subprocess.Popen([sys.executable, 'ensemble.py', *TINY, '--models', *paths, '--out', str(tmp_path / 'r.json')],
                         cwd=ROOT, env=sub_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.close()   # as `| head` does once it has its lines
    err = p.communicate(timeout=240)[1]
    assert p.returncode == 0 and 'Traceback' not in err, err[-3000:]
    assert len(json.loads((tmp_path / 'r.json').read_text())['models']) == 2


def test_ensemble_weights_too_large_to_sum_are_weights_still():
    assert ensemble.normalise_weights([1e308, 1e308], 2) == [0.5, 0.5]
    assert ensemble.normalise_weights([3e307, 1e308], 2) == pytest.approx([3 / 13, 10 / 13])
    with pytest.raises(ConfigError, match=r'--weights 0.0 0.0: must be'):
        ensemble.normalise_weights([0.0, 0.0], 2)
