"""Every method's training step under bf16 autocast and under fp16 with the GradScaler, as engine.train_one_epoch takes
it, against the same step in fp32: finite loss, gradients close to fp32's, and the scaler really scaling.
On the CPU always; on CUDA with `python -m pytest -m gpu tests`.

Tolerance: the whole gradient (every parameter, concatenated) within a relative L2 distance of fp32's of
GRAD_TOL and at a cosine above 0.999 (bf16: 8 significant bits, fp16: 11). Measured on the CPU: bf16 ~0.8%,
fp16 ~0.1%; a wrong scale, a missed unscale or a dropped loss term is off by far more.
"""
import argparse
import math

import pytest
import torch

from attention_copy import CopyConfig, copy_loss
from attention_distill import DistillConfig, distill_loss_fn
from conftest import relative_distance
from mae_pretrain import MAEConfig, MaskedAutoencoder, mae_loss_fn
from teacher import cast_matmul_weights
from util.config import TrainConfig
from util.engine import build_optimizer, soft_cross_entropy
from util.engine import autocast
from vit import VisionTransformer

ARCH = dict(img_size=32, patch_size=8, num_classes=5, embed_dim=64, depth=3, num_heads=4, global_pool=True)
GRAD_TOL = {torch.bfloat16: 0.04, torch.float16: 0.01}
DEVICES = ['cpu', pytest.param('cuda', marks=pytest.mark.gpu)]
METHODS = ['scratch', 'copy', 'distill', 'mae']


def method_parts(method, device, dtype):
    """(model, loss_fn(net, x, y)) of a method, as its script builds them, on `device`; the teacher of
    copy and distill is frozen and, under autocast, stores its matmul weights in `dtype` (load_teacher)."""
    torch.manual_seed(0)
    teacher = VisionTransformer(**{**ARCH, 'num_classes': 0}).requires_grad_(False).eval().to(device)
    if dtype is not None:
        cast_matmul_weights(teacher, dtype)
    torch.manual_seed(1)
    if method == 'scratch':
        return VisionTransformer(**ARCH).to(device), lambda net, x, y: (soft_cross_entropy(net(x), y, 0.1), {})
    if method == 'copy':
        return (VisionTransformer(**ARCH, no_qk_layers=[0, 1, 2]).to(device),
                copy_loss(CopyConfig(smoothing=0.1), teacher, [0, 1, 2], None))
    if method == 'distill':
        return (VisionTransformer(**ARCH).to(device),
                distill_loss_fn(DistillConfig(smoothing=0.1), teacher, [0, 1], None))
    arch = {**ARCH, 'global_pool': False}
    return MaskedAutoencoder(arch, decoder_dim=32, decoder_depth=1, decoder_heads=4).to(device), \
        mae_loss_fn(MAEConfig(patch_size=ARCH['patch_size']))


def batch(device):
    g = torch.Generator().manual_seed(2)
    return torch.randn(8, 3, 32, 32, generator=g).to(device), torch.randint(0, 5, (8,), generator=g).to(device)


def train_step(method, device, dtype, scaler=None):
    """engine.train_one_epoch's step: autocast, scaled backward, unscale, optimizer step. Returns the loss, the gradients
    it stepped with (unscaled), the scaler, and the model's parameters before and after."""
    model, loss_fn = method_parts(method, device, dtype)
    env = argparse.Namespace(device=torch.device(device), dtype=dtype)
    opt = build_optimizer(TrainConfig(), model, lr=1e-3)
    scaler = scaler or torch.amp.GradScaler(env.device.type, enabled=dtype == torch.float16)
    x, y = batch(device)
    before = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(3)       # the same MAE masks in every precision
    with autocast(env):
        loss, _ = loss_fn(model, x, y)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    scaler.step(opt)
    scaler.update()
    return loss.detach().float(), grads, scaler, before, list(model.parameters())


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=['bf16', 'fp16'])
@pytest.mark.parametrize('method', METHODS)
def test_amp_step_matches_fp32(method, dtype, device, exact_fp32):
    ref_loss, ref_grads, _, _, _ = train_step(method, device, None)
    loss, grads, scaler, before, after = train_step(method, device, dtype)
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(ref_loss.item(), rel=0.02)
    assert grads.isfinite().all() and ref_grads.norm() > 0 and grads.shape == ref_grads.shape
    assert relative_distance(grads, ref_grads) < GRAD_TOL[dtype], relative_distance(grads, ref_grads)
    assert torch.nn.functional.cosine_similarity(grads, ref_grads, dim=0) > 0.999
    assert scaler.is_enabled() == (dtype == torch.float16)
    if scaler.is_enabled():    # it scaled by its initial 2**16, found no overflow, and kept its scale
        assert scaler.get_scale() == 2.0 ** 16
    assert all(p.isfinite().all() for p in after) and any(not torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('method', METHODS)
def test_grad_scaler_skips_an_overflowing_step_and_backs_off(method, device):
    """A scale of 2**40 overflows fp16's gradients (max 65504): the step is skipped, the scale halves;
    a clean step at growth_interval=1 doubles it."""
    huge = torch.amp.GradScaler(device, init_scale=2.0 ** 40)
    _, grads, _, before, after = train_step(method, device, torch.float16, huge)
    assert huge.get_scale() == 2.0 ** 39
    assert all(torch.equal(a, b) for a, b in zip(before, after))          # nothing was stepped
    growing = torch.amp.GradScaler(device, init_scale=2.0 ** 8, growth_interval=1)
    _, grads, _, before, after = train_step(method, device, torch.float16, growing)
    assert growing.get_scale() == 2.0 ** 9 and grads.isfinite().all()
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
