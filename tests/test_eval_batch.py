"""Evaluation at its own batch (--eval-batch-size; auto: 1,000 on a GPU, or the training batch if larger; on a CPU the
training batch): a run evaluates at it, its metrics (accuracy, loss; MAE's held-out MSE) the same at any batch to float
rounding, and its start-up check still runs at the training batch."""
from types import SimpleNamespace

import pytest
import torch

from conftest import TINY, read_metrics, run_in_process
import data
import finetune
import mae_pretrain
from util.datafiles import build_loader
from util.engine import evaluate
from vit import VisionTransformer


def held_test_split(n=64):
    """The fake set's test split, held in memory (TensorBatches), n images of 32 px."""
    cfg = SimpleNamespace(data='fake', data_dir='./data', img_size=32, val_size=0, fake_size=n, batch_size=16,
                          num_workers=0, seed=0)
    return cfg, data.build_eval_set(cfg)[0]


def test_auto_is_a_thousand_on_a_gpu_and_the_training_batch_on_a_cpu():
    cuda, cpu = torch.device('cuda', 0), torch.device('cpu')
    cfg = finetune.FinetuneConfig(batch_size=128)
    assert (data.eval_batch_size(cfg, cuda), data.eval_batch_size(cfg, cpu)) == (1000, 128)
    big = finetune.FinetuneConfig(batch_size=2048)
    assert data.eval_batch_size(big, cuda) == 2048                      # never below the training batch
    given = finetune.FinetuneConfig(batch_size=128, eval_batch_size=512)
    assert (data.eval_batch_size(given, cuda), data.eval_batch_size(given, cpu)) == (512, 512)


def test_the_metrics_are_the_same_at_any_batch():
    """util/engine.evaluate of one model on one split at batches of 7 (a last one of 1), 16 and 64: the same top-1 and
    top-5, the same loss to float rounding."""
    cfg, split = held_test_split()
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, num_classes=10, embed_dim=32, depth=2, num_heads=2).eval()
    plan = SimpleNamespace(device=torch.device('cpu'), dtype=None, world=1)
    got = [evaluate(model, build_loader(cfg, split, False, batch_size=b), plan) for b in (7, 16, 64)]
    for m in got[1:]:
        assert (m['top1'], m['top5']) == (got[0]['top1'], got[0]['top5'])
        assert m['loss'] == pytest.approx(got[0]['loss'], rel=1e-6)


def test_mae_s_held_out_mse_is_the_same_at_any_batch():
    """mae_pretrain.evaluate_mse at batches of 7 (a last one of 1) and 64: each image's masks and weight the same."""
    cfg, split = held_test_split()
    mae = mae_pretrain.MAEConfig(data='fake', img_size=32, patch_size=8, depth=2, num_heads=2, embed_dim=32,
                                 decoder_dim=16, decoder_depth=1, decoder_heads=2)
    torch.manual_seed(0)
    model = mae_pretrain.build_mae(mae)
    plan = SimpleNamespace(device=torch.device('cpu'), dtype=None, world=1, rank=0, cfg=mae)
    got = [mae_pretrain.evaluate_mse(model, build_loader(cfg, split, False, batch_size=b), plan)['mse']
           for b in (7, 64)]
    assert got[1] == pytest.approx(got[0], rel=1e-6)


def test_a_run_evaluates_at_its_own_batch(monkeypatch, tmp_path):
    """finetune.py --eval-batch-size 64 at a training batch of 32: its evaluation goes in batches of 64, its start-up
    check (on sdpa) at 32, and it reports what a run evaluating at 32 (auto on a CPU) reports."""
    seen = []

    def recorded(model, loader, plan, evaluate=finetune.evaluate):
        seen.append(loader.batch_size)
        return evaluate(model, loader, plan)
    monkeypatch.setattr(finetune, 'evaluate', recorded)
    checked = []
    settle = finetune.settle_attention

    def check(plan, what, models, forward, *args, **kwargs):
        hook = models[0].patch_embed.register_forward_pre_hook(lambda m, args: checked.append(len(args[0])))
        try:
            return settle(plan, what, models, forward, *args, **kwargs)
        finally:
            hook.remove()
    monkeypatch.setattr(finetune, 'settle_attention', check)
    for batch in ('64', '0'):
        msg = run_in_process(monkeypatch, finetune, *TINY, '--out-dir', tmp_path / batch, '--max-steps', '2',
                             '--amp', 'off', '--attn-implementation', 'sdpa', '--eval-batch-size', batch)
        assert msg is None, msg
    assert seen == [64, 32] and checked == [32, 32]
    got = [read_metrics(tmp_path / b)[-1] for b in ('64', '0')]
    assert (got[0]['top1'], got[0]['top5']) == (got[1]['top1'], got[1]['top5'])
    assert got[0]['loss'] == pytest.approx(got[1]['loss'], rel=1e-6)
