"""evaluate.py: each test set's folder layout and class mapping, the 200-class restriction of ImageNet-R
and -A, the errors a wrong folder gets, and one run over tiny fake test sets (a plain ViT, a copy
student with its teacher, their ensemble) whose table matches a second computation."""
import hashlib
import json
import os
import sys
from types import SimpleNamespace

import numpy as np
from PIL import Image
import pytest
import torch

from conftest import run_in_process, run_script
from data import build_transform
from ensemble import load_models
import evaluate
from evaluate import SETS, WNIDS, load_set, read_classes, restrict, top1_row
from util.datafiles import DataError
from util.launch import run_main
from vit import VisionTransformer, model_arch

R, A = read_classes('imagenet-r'), read_classes('imagenet-a')


def make_folders(root, names, per_class=2, ext='jpg', seed=0):
    """root/<name>/<k>.<ext>: tiny images of random colours."""
    rng = np.random.default_rng(seed)
    for name in names:
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            pixels = rng.integers(0, 256, (40, 44, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f'{k}.{ext}')
    return root


def mapping(ds):
    """{folder name: class} as the dataset labels its images."""
    return {p.split('/')[-2]: y for p, y in ds.samples}

# -----------------------------------------------------------------------------
# Layouts and class mappings


def test_class_lists_are_the_published_ones():
    assert len(WNIDS) == 1000 and WNIDS == sorted(WNIDS) and len(set(WNIDS)) == 1000
    assert WNIDS[0] == 'n01440764' and WNIDS[999] == 'n15075141'
    for sub in (R, A):
        assert len(sub) == len(set(sub)) == 200 and set(sub) <= set(WNIDS)
    # indices of ImageNet-R's classes as its eval.py comment lists them (first and last few)
    assert [WNIDS.index(w) for w in R][:6] == [1, 2, 4, 6, 8, 9] and [WNIDS.index(w) for w in R][-3:] == [981, 983, 988]
    # ImageNet-A's: the keys of thousand_k_to_200 that map to a class (first and last few)
    assert [WNIDS.index(w) for w in A][:5] == [6, 11, 13, 15, 17] and [WNIDS.index(w) for w in A][-2:] == [987, 988]
    # the whole lists, pinned: digests of the lists as read when they were checked, wnid for wnid, against
    # all_wnids and imagenet_r_wnids of hendrycks/imagenet-r's eval.py and the classes thousand_k_to_200 of
    # hendrycks/natural-adv-examples' eval.py maps (both 200 lists in ImageNet-1k index order)
    digests = {'imagenet': '791ce0333040dd249d13133f90d28ef0263ffc01e5de0afd85b3e32048d7d456',
               'imagenet-r': '354baa0a46566aa68cee6a8093d8de471b7d45a1004b81a95c6210f757ad3740',
               'imagenet-a': 'ff8c384504d3ec59dd70537e83c7ed3dfa0debb07210febc47b58c136a443706'}
    for name, digest in digests.items():
        assert hashlib.sha256(' '.join(read_classes(name)).encode()).hexdigest() == digest, name
    assert R == sorted(R) and A == sorted(A)


def test_imagenet_v2_class_is_the_folder_number(tmp_path):
    ds, allowed = load_set('imagenet-v2', str(make_folders(tmp_path, ['0', '9', '10', '999'], ext='jpeg')), None)
    assert mapping(ds) == {'0': 0, '9': 9, '10': 10, '999': 999} and allowed is None   # not 0, 1, 2, 3
    assert len(ds) == 8


def test_sketch_and_val_classes_are_imagenet_indices(tmp_path):
    folders = ['n01440764', 'n01443537', 'n15075141']
    for name in ('imagenet-sketch', 'imagenet'):
        ds, allowed = load_set(name, str(make_folders(tmp_path / name, folders, ext='JPEG')), None)
        assert mapping(ds) == {'n01440764': 0, 'n01443537': 1, 'n15075141': 999} and allowed is None


@pytest.mark.parametrize('name, sub', [('imagenet-r', R), ('imagenet-a', A)])
def test_200_class_sets(tmp_path, name, sub):
    folders = [sub[0], sub[100], sub[-1]]
    ds, allowed = load_set(name, str(make_folders(tmp_path, folders)), None)
    assert mapping(ds) == {w: WNIDS.index(w) for w in folders}          # ImageNet-1k indices, not 0..2
    assert allowed == sorted(WNIDS.index(w) for w in sub) and len(allowed) == 200


@pytest.mark.parametrize('name, folders, match', [
    ('imagenet-v2', None, 'no folder'),
    ('imagenet-v2', ['n01440764'], 'folders n01440764: --imagenet-v2 expects .*0 .. 999'),
    ('imagenet-v2', ['1000'], 'folders 1000'),
    ('imagenet-r', ['n01440764'], 'the 200 of util/classes/imagenet-r.txt'),      # ImageNet's class 0 is not in R
    ('imagenet-a', [], 'no folders'),
    ('imagenet-sketch', ['sketch'], 'wnids'),                              # one level too high
])
def test_malformed_folders_name_the_layout(tmp_path, name, folders, match):
    root = tmp_path / 'set'
    if folders is not None:
        root.mkdir()
        make_folders(root, folders) if folders != ['sketch'] else make_folders(root / 'sketch', ['n01440764'])
    with pytest.raises(DataError, match=match):
        load_set(name, str(root), None)


def test_class_folder_without_images(tmp_path):
    (tmp_path / '3').mkdir()
    make_folders(tmp_path, ['4'])
    with pytest.raises(DataError, match=r'no image file \(.jpg, .png, ...\) in the class folder\(s\) 3: add their'):
        load_set('imagenet-v2', str(tmp_path), None)

# -----------------------------------------------------------------------------
# The 200-class restriction


def test_restriction_a_class_outside_the_subset_never_wins():
    allowed = SETS['imagenet-r'][2]
    outside = next(i for i in range(1000) if i not in allowed)             # class 0 (tench) is not in R
    labels = torch.tensor(allowed[:4])
    favour_outside = torch.zeros(4, 1000)
    favour_outside[:, outside] = 10.0                                      # the model's top guess: not in R
    favour_outside[torch.arange(4), labels] = 5.0                          # its best guess among R: right
    assert top1_row([favour_outside], labels, None, []) == [0.0]           # unrestricted: all wrong
    assert top1_row([favour_outside], labels, allowed, []) == [100.0]      # restricted: all right
    probs = restrict(favour_outside, allowed).softmax(-1)
    assert probs[:, outside].eq(0).all() and torch.allclose(probs.sum(-1), torch.ones(4))
    # an ensemble is restricted too: its members' probabilities over the 200 classes are averaged
    other = torch.zeros(4, 1000)
    other[:, outside] = 20.0
    other[torch.arange(4), labels.roll(1)] = 1.0
    assert top1_row([favour_outside, other], labels, allowed, [[0, 1]]) == [100.0, 0.0, 100.0]

# -----------------------------------------------------------------------------
# A whole run


def second_path(sources, dataset, allowed):
    """Top-1 image by image: each model on each transformed image, the softmax over the allowed columns
    only, averaged over the models, its argmax mapped back to a class."""
    models, correct = load_models(sources)[0], 0
    cols = allowed or list(range(1000))
    with torch.no_grad():
        for x, y in dataset:
            probs = sum(m(x[None])[0][cols].softmax(-1) for m in models)    # (len(cols),)
            correct += cols[int(probs.argmax())] == y
    return 100 * correct / len(dataset)


def test_a_run_over_fake_sets(tmp_path, monkeypatch):
    arch = model_arch('vit_tiny', depth=2, embed_dim=48, num_heads=3, img_size=32, patch_size=16, num_classes=1000)
    torch.manual_seed(0)
    vit = VisionTransformer(**arch)
    with torch.no_grad():     # leanings, so that the scores are not all 0: class 0 (not in R), else R's first
        vit.head.bias[[0, WNIDS.index(R[0])]] = torch.tensor([12.0, 11.0])
    torch.save({'model': vit.state_dict(), 'arch': vit.arch}, tmp_path / 'vit.pt')
    teacher = VisionTransformer(**{**arch, 'num_classes': 0})
    torch.save({'model': teacher.state_dict(), 'arch': teacher.arch}, tmp_path / 'teacher.pt')
    student = VisionTransformer(**{**arch, 'no_qk_layers': [0, 1]})
    with torch.no_grad():
        student.head.bias[[10, WNIDS.index(R[-1])]] = torch.tensor([9.0, 8.0])
    torch.save({'model': student.state_dict(), 'arch': student.arch, 'teacher': {
        'source': str(tmp_path / 'teacher.pt'), 'sha256': None, 'img_size': 32, 'layers': [0, 1], 'heads': None,
        'transfer': 'attn'}}, tmp_path / 'copy.pt')
    v2 = make_folders(tmp_path / 'v2', ['0', '9', '10', '999'], ext='jpeg')
    r = make_folders(tmp_path / 'r', R[:3] + R[-2:], seed=1)
    sketch = make_folders(tmp_path / 'sketch', [WNIDS[0], WNIDS[10], WNIDS[999]], per_class=1, ext='JPEG', seed=2)
    a = make_folders(tmp_path / 'a', [A[0], A[-1]], per_class=1, seed=3)
    roots = {'imagenet-v2': v2, 'imagenet-sketch': sketch, 'imagenet-r': r, 'imagenet-a': a}
    models = [str(tmp_path / 'vit.pt'), str(tmp_path / 'copy.pt')]
    sets = [x for name, root in roots.items() for x in (f'--{name}', root)]
    args = ['evaluate.py', '--models', *models, '--ensembles', '0,1', *sets,
            '--out', tmp_path / 'out', '--num-workers', '0', '--batch-size', '3', '--amp', 'off']
    p = run_script(*args)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads((tmp_path / 'out' / 'robustness.json').read_text())
    assert [row['model'] for row in result['rows']] == [*models, ' + '.join(models)]
    assert result['sets']['imagenet-v2']['images'] == 8 and result['sets']['imagenet-r']['classes'] == 200
    assert [(v['images'], v['classes']) for v in result['sets'].values()] == [(8, 1000), (3, 1000), (10, 200), (2, 200)]
    transform = build_transform(SimpleNamespace(data='imagenet', img_size=32), train=False)
    for name, root in roots.items():
        dataset, allowed = load_set(name, str(root), transform)
        for row, sources in zip(result['rows'], [[models[0]], [models[1]], models]):
            assert row['top1'][name] == pytest.approx(second_path(sources, dataset, allowed), abs=1e-4), (name, row)
    top1 = {name: [row['top1'][name] for row in result['rows']] for name in ('imagenet-v2', 'imagenet-r')}
    assert top1['imagenet-v2'] == pytest.approx([25.0, 25.0, 25.0])      # always class 0, 10, either
    assert top1['imagenet-r'] == pytest.approx([20.0, 20.0, 20.0])       # always R[0], R[-1], R[-1]
    table = (tmp_path / 'out' / 'robustness.md').read_text()
    assert '| model | imagenet-v2 | imagenet-sketch | imagenet-r | imagenet-a |' in table and table.count('\n| ') == 4
    before = table                                                      # never overwrites a table
    assert 'robustness.md exists and is not an earlier result' in error_line(monkeypatch, *args[1:])
    assert (tmp_path / 'out' / 'robustness.md').read_text() == before
    message = error_line(monkeypatch, '--models', *models, '--imagenet-a', tmp_path / 'nowhere',
                         '--out', tmp_path / 'o2')
    assert '--imagenet-a expects <dir>/<class folder>/<image>' in message and not (tmp_path / 'o2').exists()


def error_line(monkeypatch, *args):
    """evaluate.py's main under run_main, in this process: the one line it exits with."""
    monkeypatch.setattr(sys, 'argv', ['evaluate.py', *map(str, args)])
    with pytest.raises(SystemExit) as e:
        run_main(evaluate.main)
    assert isinstance(e.value.code, str) and '\n' not in e.value.code
    return e.value.code


def test_evaluate_out_is_checked_before_any_model_is_loaded(tmp_path, monkeypatch):
    """evaluate.py writes --out after every model has run on every set: a file, or a folder under a file, is
    refused first (the models named here do not even exist)."""
    (tmp_path / 'a_file').write_text('mine\n')
    for out in (tmp_path / 'a_file', tmp_path / 'a_file' / 'res'):
        says = f'cannot write there ({tmp_path / "a_file"}: Not a directory): choose another --out'
        msg = run_in_process(monkeypatch, evaluate, '--models', tmp_path / 'missing.pt', '--imagenet', tmp_path,
                             '--out', out)
        assert msg and msg.startswith(f'error: --out {out}') and says in msg, msg
    assert (tmp_path / 'a_file').read_text() == 'mine\n' and sorted(os.listdir(tmp_path)) == ['a_file']
