"""evaluate.py --data D --shift S: each shifted test image is the clean one changed as the shift's name says (in
[0, 1], before the normalisation), every label is the clean one, and the models are scored on those images."""
import json
from types import SimpleNamespace

import pytest
import torch
from torchvision.transforms import v2

from conftest import run_in_process
from data import SHIFTS, build_eval_set
from util.datafiles import DATASETS
import evaluate
from vit import VisionTransformer


MEAN, STD = (torch.tensor(s)[:, None, None] for s in DATASETS['fake'].stats)


def shifted_set(shift, val_size=0):
    cfg = SimpleNamespace(data='fake', data_dir='./data', img_size=32, val_size=val_size, fake_size=512)
    return build_eval_set(cfg, shift)[0]


def pixels(dataset, n=8):
    """The first n images in [0, 1] (the normalisation undone) and their labels."""
    xs, ys = zip(*(dataset[i] for i in range(n)))
    return torch.stack(xs) * STD + MEAN, torch.tensor(ys)                     # (n, 3, H, W), (n,)


@pytest.mark.parametrize('val_size', [0, 16])
def test_each_shift_is_what_it_names_and_labels_stay(val_size):
    clean, labels = pixels(shifted_set('none', val_size))
    shifted = {s: pixels(shifted_set(s, val_size)) for s in SHIFTS if s != 'none'}
    for s, (x, y) in shifted.items():
        assert torch.equal(y, labels), s
        assert x.min() >= -1e-6 and x.max() <= 1 + 1e-6, s                  # still an image in [0, 1]
        assert not torch.allclose(x, clean, atol=0.01), s
    atol = 1e-5
    assert torch.allclose(shifted['invert'][0], 1 - clean, atol=atol)
    x = shifted['translate'][0]                                              # 2 px right and down, black fill
    assert torch.allclose(x[..., 2:, 2:], clean[..., :-2, :-2], atol=atol) and x[..., :2, :].abs().max() < atol
    assert torch.allclose(shifted['rotate'][0], v2.functional.rotate(clean, 20.0), atol=atol)
    assert torch.allclose(shifted['blur'][0], v2.functional.gaussian_blur(clean, [5, 5], [1.0, 1.0]), atol=atol)
    noise = (shifted['noise'][0] - clean)[(clean > 0.3) & (clean < 0.7)]    # away from the clipped ends
    assert abs(noise.mean()) < 0.02 and 0.17 < noise.std() < 0.23             # sigma 0.2


def test_evaluate_scores_each_shift_of_the_test_split(monkeypatch, tmp_path):
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10).eval()
    torch.save({'model': model.state_dict(), 'arch': model.arch}, tmp_path / 'm.pt')
    shifts = ['none', 'invert', 'rotate']
    assert run_in_process(monkeypatch, evaluate, '--data', 'fake', '--models', tmp_path / 'm.pt', tmp_path / 'm.pt',
                          '--ensembles', '0,1', '--shift', *shifts, '--amp', 'off', '--num-workers', '0',
                          '--out', tmp_path / 'r') is None
    r = json.loads((tmp_path / 'r' / 'robustness.json').read_text())
    assert list(r['sets']) == shifts and r['rows'][-1]['members'] == [str(tmp_path / 'm.pt')] * 2   # the ensemble
    preds, seen = {}, {}
    for shift in shifts:                                                     # every test image, by hand
        x, y = pixels(shifted_set(shift), r['sets'][shift]['images'])
        seen[shift] = x
        with torch.no_grad():
            preds[shift] = model((x - MEAN) / STD).argmax(-1)
        expected = 100 * (preds[shift] == y).float().mean().item()
        assert all(row['top1'][shift] == pytest.approx(expected, abs=1e-4) for row in r['rows']), shift
    assert not seen['none'].equal(seen['invert']) and not seen['none'].equal(seen['rotate'])   # each shift scored


def test_a_shift_needs_a_test_split_of_its_own(monkeypatch, tmp_path):
    msg = run_in_process(monkeypatch, evaluate, '--models', 'm.pt', '--imagenet', 'val', '--data', 'fake',
                         '--out', tmp_path / 'r')
    assert msg == 'error: --data fake: or the folders: not both', msg


@pytest.mark.parametrize('workers', [0, 1])
def test_a_shifts_noise_is_the_same_whatever_the_loader(workers):
    """The noise of --shift noise is drawn per image from (--seed, its index), as training's augmentation: the same
    with or without loader workers, run after run (without workers it came from the process's unseeded RNG)."""
    from util.datafiles import build_loader
    cfg = SimpleNamespace(batch_size=16, num_workers=workers, seed=3)
    noisy = shifted_set('noise')

    def first_batch():
        return next(iter(build_loader(cfg, noisy, train=False)))[0]
    torch.manual_seed(workers)                        # whatever the process's RNG holds
    a = first_batch()
    torch.manual_seed(100 + workers)
    assert torch.equal(a, first_batch())
    reference = next(iter(build_loader(SimpleNamespace(**{**vars(cfg), "num_workers": 0}), noisy, train=False)))[0]
    assert torch.equal(a, reference)
