"""The GPU path checked on the CPU: the scripts' code run on a stand-in CUDA device (tests/standin_cuda.py, fake
tensors on `cuda:0`), where an operator mixing host and device tensors raises as on a GPU and a host sync inside a
step fails the test. Devices, dtypes and syncs are checked here, not numbers."""
from types import SimpleNamespace

import pytest
import torch

from data import build_eval_set
from ensemble import predict_all, summarise
from evaluate import top1_row
from standin_cuda import on_device, standin_cuda
from util import datafiles
from util.datafiles import build_loader
from util.engine import evaluate
from vit import VisionTransformer

ARCH = dict(img_size=32, patch_size=8, num_classes=10, embed_dim=64, depth=2, num_heads=4)


def fake_set(held, shift='none'):
    """The fake test split (64 images of 32 px): held in memory (batched where it is held), or read an image at a time
    by a DataLoader, as a folder is."""
    cfg = SimpleNamespace(data='fake', data_dir='./data', img_size=32, val_size=0, fake_size=64, batch_size=16,
                          num_workers=0, seed=0)
    if not held:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(datafiles, 'FAKE_HELD', 0)
            return cfg, build_eval_set(cfg, shift)[0]
    return cfg, build_eval_set(cfg, shift)[0]


# held and folder each in the autocast dtype test_standin_scripts.py's ensemble and evaluate runs do not give them
@pytest.mark.parametrize('held, dtype', [(True, torch.float16), (False, torch.bfloat16)],
                         ids=['held', 'folder'])
def test_ensemble_and_evaluate_score_on_the_device(held, dtype):
    """ensemble.py's and evaluate.py's scoring (--shift's sets too): the batches on the device, the models on it, no
    host sync per batch, and the accuracies taken on logits and labels on one device (the labels of a held set
    were on the device, the logits on the host: every GPU run crashed)."""
    torch.manual_seed(0)
    models = [VisionTransformer(**ARCH).eval() for _ in range(2)]
    place = SimpleNamespace(device=torch.device('cuda', 0), dtype=dtype)
    loaders = []
    for cfg, dataset in (fake_set(held), fake_set(held, 'noise')):
        loader = build_loader(cfg, dataset, False, device=place.device)
        # a DataLoader's batches are made on the host, as its workers make them: real tensors
        loaders.append(loader if held else list(loader))
    with standin_cuda() as cuda:
        models = [m.to(place.device) for m in models]
        for loader in loaders:
            logits, labels = predict_all(models, loader, place)
            summarise(['a', 'b'], [0.5, 0.5], logits, labels)   # ensemble.py
            top1_row(logits, labels, None, [[0, 1]])      # evaluate.py
            assert not any(map(on_device, [*logits, labels])) and labels.shape == (64,)
            assert all(l.shape == (64, 10) and l.dtype == torch.float32 for l in logits)
            # one copy to the host of each model's logits and of the labels, not one per batch
            with cuda.strict(allowed=len(models) + 1):
                predict_all(models, loader, place)


@pytest.mark.parametrize('held', [True, False], ids=['held', 'folder'])
def test_a_training_run_evaluates_without_a_copy_per_batch(held):
    """util/engine.evaluate (every training script's evaluation): the sums kept on the device, read once at the end
    (one tolist of four numbers), whatever the number of batches (4 here)."""
    torch.manual_seed(0)
    model = VisionTransformer(**ARCH).eval()
    plan = SimpleNamespace(device=torch.device('cuda', 0), dtype=torch.bfloat16, world=1)
    cfg, dataset = fake_set(held)
    loader = build_loader(cfg, dataset, False, device=plan.device)
    loader = loader if held else list(loader)
    with standin_cuda() as cuda:
        model = model.to(plan.device)
        with cuda.strict(allowed=4), torch.no_grad():
            evaluate(model, loader, plan)


def test_the_stand_in_puts_back_what_it_replaced_whatever_happens_inside():
    """A step that fails inside the stand-in, after a script's set-up turned TF32 on, leaves nothing behind: torch's own
    functions back (the same objects, none deleted), TF32 as it was, its precision setting too (torch >= 2.9)."""
    from conftest import REPLACEABLE, torch_settings

    def objects():
        return [getattr(owner, name) for owner, names in REPLACEABLE.values() for name in names]

    def precision():
        return getattr(torch.backends.cuda.matmul, 'fp32_precision', None)
    before, settings, kept = objects(), torch_settings(), precision()
    with pytest.raises(RuntimeError, match='a failing step'):
        with standin_cuda() as cuda:
            cuda.patch(torch.cuda, 'is_available', lambda: True)
            # what launch.processes does on a GPU
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            assert torch.cuda.is_available() and torch.save is not before[0]
            raise RuntimeError('a failing step')
    assert all(a is b for a, b in zip(objects(), before))
    assert torch_settings() == settings and precision() == kept
