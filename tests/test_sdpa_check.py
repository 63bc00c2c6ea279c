"""The fused attention's start-up check (util/attention_check.py) in every script that runs sdpa, against kernels
patched on the CPU to be wrong in one way each (the output 5% off, the gradient of q, k or v 5% off, raising):
--attn-implementation sdpa stops in one line before anything has run on them, auto goes on with eager and trains, and
the real kernels pass. Then its parts: the peaked inputs, the real kernels at ViT shapes in fp32 and bf16, the incoming
gradient the kernels get, CUDA's log-sum-exp entry points tried in turn."""
import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import attention_copy
import attention_distill
import ensemble
import evaluate
import finetune
import mae_pretrain
import util.attention_check as check
from conftest import ROOT, TINY, read_metrics, run_in_process
from util import launch
from util.config import ConfigError
from vit import VisionTransformer, set_attn_implementation

FAULTS = ('output', 'q grad', 'k grad', 'v grad', 'raises')


class Wrong(torch.autograd.Function):
    """kernel(q, k, v) with one fault: its output, or the gradient it hands q, k or v, `by` times its own (1.05: 5%
    off)."""

    @staticmethod
    def forward(ctx, fault, by, kernel, q, k, v):
        with torch.enable_grad():
            ctx.inputs = [t.detach().requires_grad_(t.requires_grad) for t in (q, k, v)]
            ctx.out = kernel(*ctx.inputs)
        ctx.fault, ctx.by = fault, by
        return ctx.out.detach() * (by if fault == 'output' else 1.0)

    @staticmethod
    def backward(ctx, grad):
        got = iter(torch.autograd.grad(ctx.out, [t for t in ctx.inputs if t.requires_grad], grad))
        return None, None, None, *(next(got) * (ctx.by if ctx.fault == f'{n} grad' else 1.0) if t.requires_grad
                                   else None for n, t in zip('qkv', ctx.inputs))


def wrong_kernels(monkeypatch, fault, sdpa=True, lse=True, by=1.05):
    """F.scaled_dot_product_attention and (lse) the CPU's log-sum-exp entry point, the map-free loss's, with fault
    (the tensor `by` times its own)."""
    def refuse():
        if fault == 'raises':
            raise RuntimeError('No available kernel. Aborting execution.')
    real_sdpa, real_lse = F.scaled_dot_product_attention, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    def wrong_sdpa(q, k, v, **kwargs):
        refuse()
        return Wrong.apply(fault, by, lambda *qkv: real_sdpa(*qkv, **kwargs), q, k, v)

    def wrong_lse(q, k, v, *args, **kwargs):
        refuse()
        lse = real_lse(q.detach(), k.detach(), v.detach(), *args, **kwargs)[1]
        return Wrong.apply(fault, by, lambda *qkv: real_lse(*qkv, *args, **kwargs)[0], q, k, v), lse
    if sdpa:
        monkeypatch.setattr(F, 'scaled_dot_product_attention', wrong_sdpa)
    if lse:
        monkeypatch.setattr(torch.ops.aten, '_scaled_dot_product_flash_attention_for_cpu', wrong_lse)

# -----------------------------------------------------------------------------
# Every script that trains on sdpa: one step of 8 images, fp32 (the tolerance in bf16: below)


TEACHER = ['--teacher', os.path.join(ROOT, 'teachers', 'fashion-mnist-mae.pt'), '--img-size', '28', '--layers', '0-4']
RUNS = {'finetune': (finetune, []),
        'mae': (mae_pretrain, []),
        'copy': (attention_copy, TEACHER),                          # layer 5 attends with its own q, k
        'copy-v': (attention_copy, [*TEACHER, '--transfer', 'v']),
        'distill': (attention_distill, TEACHER),
        **{f'distill-{n}': (attention_distill, [*TEACHER, '--transfer', n]) for n in 'qkv'}}
SMALL = [*TINY, '--fake-size', '64', '--val-size', '8', '--batch-size', '8', '--max-steps', '1', '--amp', 'off']


def train(monkeypatch, out, run, *flags):
    module, args = RUNS[run]
    return run_in_process(monkeypatch, module, *SMALL, *args, '--out-dir', out, *flags)


@pytest.mark.parametrize('fault', FAULTS)
@pytest.mark.parametrize('run', RUNS)
def test_sdpa_stops_at_a_wrong_kernel_before_it_runs(monkeypatch, tmp_path, run, fault):
    """One line naming the tensor that is off (or what the kernel said), exit non-zero, nothing left behind; a kernel
    that raises fails the check, not a traceback from a model run on it before."""
    wrong_kernels(monkeypatch, fault)
    msg = train(monkeypatch, tmp_path / 'r', run, '--attn-implementation', 'sdpa')
    assert msg and msg.startswith('error: start-up check: ') and msg.endswith('use --attn-implementation eager'), msg
    assert ('No available kernel' in msg) == (fault == 'raises'), msg
    assert not (tmp_path / 'r').exists()


def test_the_loss_s_own_fused_call_is_checked(monkeypatch, tmp_path):
    """A fault in the log-sum-exp entry point alone (the map-free loss's S K, not the model's attention) stops
    distillation on sdpa: the loss's gradients are compared too."""
    for fault in ('output', 'v grad', 'raises'):
        with monkeypatch.context() as m:
            wrong_kernels(m, fault, sdpa=False)
            msg = train(m, tmp_path / fault, 'distill', '--attn-implementation', 'sdpa')
        assert msg and 'start-up check' in msg and 'map-free loss' in msg, (fault, msg)


@pytest.mark.parametrize('run', RUNS)
def test_auto_goes_on_with_eager_and_trains(monkeypatch, tmp_path, run):
    """A kernel that raises under auto: the run trains on eager, and never calls it again (the teacher neither)."""
    monkeypatch.setitem(launch.AUTO_ATTN, 'cpu', ('sdpa', 'as on CUDA'))
    wrong_kernels(monkeypatch, 'raises')
    assert train(monkeypatch, tmp_path / 'r', run) is None
    record = json.load(open(tmp_path / 'r' / 'config.json'))['attention_check']
    assert record['implementation'] == 'eager' and record['error'] == float('inf')
    assert read_metrics(tmp_path / 'r')[-1]['step'] == 1


def test_auto_goes_on_with_eager_where_only_a_gradient_is_wrong(monkeypatch, tmp_path):
    monkeypatch.setitem(launch.AUTO_ATTN, 'cpu', ('sdpa', 'as on CUDA'))
    wrong_kernels(monkeypatch, 'k grad')
    assert train(monkeypatch, tmp_path / 'r', 'distill') is None
    record = json.load(open(tmp_path / 'r' / 'config.json'))['attention_check']
    assert record['implementation'] == 'eager' and record['worst'].endswith('k grad')
    assert record['tolerance'] < record['error'] < 0.1


@pytest.mark.parametrize('run', RUNS)
def test_the_real_kernels_pass(monkeypatch, tmp_path, run):
    assert train(monkeypatch, tmp_path / 'r', run, '--attn-implementation', 'sdpa') is None
    record = json.load(open(tmp_path / 'r' / 'config.json'))['attention_check']
    assert record['implementation'] == 'sdpa' and record['backend'] == 'flash'
    assert all(error <= tolerance for error, _, tolerance in record['errors'].values())
    assert any(name.endswith('v grad') for name in record['errors'])      # backward compared too

# -----------------------------------------------------------------------------
# Evaluation: forward only


@pytest.fixture(scope='module')
def classifier(tmp_path_factory):
    """A fresh ViT of the fake preset's shape (10 classes, 32 px, patch 8), as a checkpoint."""
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)
    path = tmp_path_factory.mktemp('vit') / 'vit.pt'
    torch.save({'model': vit.state_dict(), 'arch': vit.arch}, path)
    return path


EVALUATE = {'ensemble': (ensemble, lambda model, out: [*TINY, '--models', model, '--out', out / 'r.json']),
            'evaluate': (evaluate, lambda model, out: ['--models', model, '--data', 'fake', '--out', out / 'r',
                                                       '--num-workers', '0'])}


@pytest.mark.parametrize('script', EVALUATE)
def test_evaluation_checks_the_forward(monkeypatch, tmp_path, capsys, classifier, script):
    """sdpa: a wrong output or a raising kernel stops it in one line before any model runs, writing nothing; a wrong
    gradient does not matter (no backward). auto: a raising kernel sends it to eager."""
    module, args = EVALUATE[script]
    for fault in ('output', 'raises'):
        with monkeypatch.context() as m:
            wrong_kernels(m, fault)
            msg = run_in_process(m, module, *args(classifier, tmp_path), '--attn-implementation', 'sdpa')
        assert msg and msg.startswith('error: start-up check: evaluation on sdpa'), msg
        assert list(tmp_path.iterdir()) == []
    for fault in ('v grad', None):
        with monkeypatch.context() as m:
            if fault:
                wrong_kernels(m, fault)
            assert run_in_process(m, module, *args(classifier, tmp_path / str(fault)), '--attn-implementation',
                                  'sdpa') is None
        said = capsys.readouterr().out.replace('attention: ', 'attention ')
        assert 'sdpa holds' in said and 'attention sdpa (--attn-implementation sdpa)' in said
    monkeypatch.setitem(launch.AUTO_ATTN, 'cpu', ('sdpa', 'as on CUDA'))
    wrong_kernels(monkeypatch, 'raises')
    assert run_in_process(monkeypatch, module, *args(classifier, tmp_path / 'auto')) is None
    assert 'attention eager (the start-up check)' in capsys.readouterr().out.replace('attention: ', 'attention ')

# -----------------------------------------------------------------------------
# Its parts


def plan(dtype):
    """What start_up_check reads of a run's plan: device, autocast dtype, --attn-implementation, the log."""
    return SimpleNamespace(device=torch.device('cpu'), dtype=dtype, attn='sdpa', log=lambda line: None,
                           cfg=SimpleNamespace(attn_implementation='sdpa'))


def layer_check(model, dtype=None, n=4, backward=True):
    """start_up_check of model's first layer on n random images (--attn-implementation sdpa)."""
    x = torch.randn(n, 3, model.arch['img_size'], model.arch['img_size'], generator=torch.Generator().manual_seed(0))
    return check.start_up_check(plan(dtype), 'test', [model], lambda: model.forward_tokens(x, depth=1),
                                {'layer 0': model.blocks[0].attn}, backward)


def vit(heads, width, img_size, patch_size=16, seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=heads * width, depth=1,
                             num_heads=heads, num_classes=0)


def test_the_check_s_inputs_are_peaked_so_that_a_wrong_softmax_shows(monkeypatch):
    """A kernel whose softmax is 5% too sharp (its scale 1.05 times 1 / sqrt(d)), on a fresh layer (maps near
    uniform), forward only (evaluation; in training its q and k gradients are 5% off too), in bf16: refused as the
    check runs it, and passed were its queries not scaled up (PEAK 0): eager's own rounding would hide it."""
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, 'scaled_dot_product_attention',
                        lambda q, k, v, scale=None: real(q, k, v, scale=1.05 * (scale or q.shape[-1] ** -0.5)))
    with pytest.raises(ConfigError, match='start-up check'):
        layer_check(vit(4, 16, 64, 8), torch.bfloat16, backward=False)
    monkeypatch.setattr(check, 'PEAK', 0.0)
    assert layer_check(vit(4, 16, 64, 8), torch.bfloat16, backward=False)[0] == 'sdpa'


@pytest.mark.parametrize('fault', ['output', 'q grad', 'k grad', 'v grad'])
def test_a_nan_is_the_tensor_named(monkeypatch, fault):
    """A kernel that hands back a nan in one tensor (the others as the real kernel's, within their tolerance): the
    refusal names that tensor, not the farthest of the finite ones."""
    wrong_kernels(monkeypatch, fault, by=float('nan'))
    with pytest.raises(ConfigError, match=f'the farthest layer 0 {fault} at nan'):
        layer_check(vit(3, 64, 32, 8))


@pytest.mark.parametrize('dtype', [None, torch.bfloat16], ids=['fp32', 'bf16'])
@pytest.mark.parametrize('shape', [(16, 64, 224, 16), (12, 64, 224, 16), (3, 64, 32, 8), (8, 8, 28, 4)],
                         ids=['vit_l', 'vit_b', 'vit_t-32px', 'fashion'])
def test_the_real_kernels_pass_at_vit_shapes(shape, dtype):
    """The CPU's fused kernels, forward and backward, within FACTOR x eager's own error in the run's dtype (fp32:
    within SDPA_FLOOR) at the heads, head widths and tokens of ViT-L/16, ViT-B/16 (197 tokens), ViT-T and the
    Fashion-MNIST preset; and a 5% error would not be: every tolerance is below 0.05."""
    heads, width, img_size, patch_size = shape
    implementation, record = layer_check(vit(heads, width, img_size, patch_size), dtype, n=2)
    assert implementation == 'sdpa', record
    assert all(error <= tolerance < 0.05 for error, _, tolerance in record['errors'].values()), record['errors']


def test_the_fused_kernels_get_a_contiguous_incoming_gradient(monkeypatch):
    """The layer hands its attention output's gradient on in (B, N, H, d) memory order (its output projection's
    input, rearranged): cuDNN's backward got value gradients wrong from exactly that. Both fused calls, the model's and
    the map-free loss's, hand their kernels a contiguous one instead."""
    seen = []

    class Spy(torch.autograd.Function):   # the kernel's output: records the gradient handed on to the kernel
        @staticmethod
        def forward(ctx, out):
            return out.view_as(out)

        @staticmethod
        def backward(ctx, grad):
            seen.append(grad.is_contiguous())
            return grad
    sdpa, lse = F.scaled_dot_product_attention, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    monkeypatch.setattr(F, 'scaled_dot_product_attention', lambda *a, **k: Spy.apply(sdpa(*a, **k)))
    monkeypatch.setattr(torch.ops.aten, '_scaled_dot_product_flash_attention_for_cpu',
                        lambda *a, **k: (Spy.apply(lse(*a, **k)[0]), lse(*a, **k)[1]))
    model = set_attn_implementation(vit(4, 8, 32, 8), 'sdpa')
    model.forward_tokens(torch.randn(2, 3, 32, 32))[0].sum().backward()
    attn = model.blocks[0].attn
    q, k, v = attn.project(torch.randn(2, 17, 32))
    attention_distill.map_free_cross_entropy(q.detach(), k.detach(), q, k).backward()
    assert seen == [True, True, True]   # the model's layer; the loss's S K and P K

    seen.clear()   # the control: what the layer hands the kernel's output, were it not made contiguous
    out = Spy.apply(sdpa(q.detach(), k.detach(), v.detach().requires_grad_()))
    attn.proj(rearrange(out, 'b h n d -> b n (h d)')).sum().backward()
    assert seen == [False]


def test_cuda_s_log_sum_exp_entry_points_are_tried_fastest_first():
    """The first that takes the inputs runs (one that refuses them, or is not in this torch, is passed over); where
    none does, the last one's error is what the start-up check reports."""
    def refuses(*args):
        raise RuntimeError('cuDNN: not for these inputs')

    def missing(*args):
        return torch.ops.aten.no_such_entry_point(*args)
    ran = attention_distill.first_that_runs({'a': refuses, 'b': missing, 'c': lambda x: x + 1, 'd': refuses}, 1)
    assert ran == ('c', 2)
    with pytest.raises(RuntimeError, match='not for these inputs'):
        attention_distill.first_that_runs({'a': refuses, 'b': missing, 'c': refuses}, 1)
    assert list(attention_distill.CUDA_LSE) == ['cudnn', 'flash', 'efficient']
