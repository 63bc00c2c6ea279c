"""Every fast path computes what the plain definition (attention_distill.plain_loss_fn) and the naive path
(tools/naive.py: the authors' way) compute."""
import json
import os

import pytest
import torch

from attention_copy import CopyConfig, CopyModel, copy_loss
from attention_distill import (DistillConfig, FusedAttentionCrossEntropy, attention_cross_entropy,
                               distill_loss_fn, plain_loss_fn)
from conftest import run_script
from teacher import cast_matmul_weights
from tools.naive import naive_copy_forward, naive_copy_loss, naive_distill_loss
from vit import VisionTransformer

ARCH = dict(img_size=32, patch_size=8, num_classes=5, embed_dim=32, depth=3, num_heads=4, global_pool=True)


def model(seed, **kw):
    torch.manual_seed(seed)
    return VisionTransformer(**{**ARCH, **kw})


def grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_fused_attention_cross_entropy_matches_autograd(dtype):
    torch.manual_seed(0)
    t = (3 * torch.randn(2, 4, 17, 17)).to(dtype)
    s = (3 * torch.randn(2, 4, 17, 17)).to(dtype)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    ref, fused = attention_cross_entropy(t, s1), FusedAttentionCrossEntropy.apply(t, s2)
    (2.5 * ref).backward()
    (2.5 * fused).backward()
    assert fused.dtype == torch.float32 and s2.grad.dtype == dtype
    assert torch.allclose(fused, ref, rtol=1e-6, atol=1e-6)
    # bf16: autograd rounds its fp32 gradient once, the fused path rounds softmax(s) - softmax(t) first
    tol = dict(rtol=1e-5, atol=1e-9) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-7)
    assert torch.allclose(s2.grad.float(), s1.grad.float(), **tol)
    assert s1.grad.abs().max() > 1e-4      # the comparison is not of zeros


def test_fused_attention_cross_entropy_keeps_one_tensor_of_the_students_dtype():
    t = torch.randn(2, 4, 17, 17, dtype=torch.bfloat16)
    s = torch.randn(2, 4, 17, 17, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        FusedAttentionCrossEntropy.apply(t, s)
    assert [(x.shape, x.dtype) for x in saved] == [(s.shape, torch.bfloat16)]
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        attention_cross_entropy(t, s)
    assert sum(x.numel() * x.element_size() for x in saved) >= 4 * s.numel() * s.element_size()


def test_distill_step_equals_the_naive_step():
    """Teacher stopped at its last distilled layer, fused loss: the same loss and gradients (fp32)."""
    teacher = model(0, num_classes=0).requires_grad_(False).eval()
    students = [model(1), model(1)]
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 3, 4])
    fast = distill_loss_fn(DistillConfig(smoothing=0.1), teacher, [0, 1], None)
    naive = naive_distill_loss(teacher, [0, 1], weight=3.0, drop_path=0.0)
    losses = []
    for student, loss_fn in zip(students, (fast, naive)):
        loss, parts = loss_fn(student, x, y)
        loss.backward()
        losses.append((loss, parts['attn']))
    assert torch.allclose(losses[0][0], losses[1][0], rtol=1e-6) and losses[0][1] > 0
    g0, g1 = grads(students[0]), grads(students[1])
    assert g0.keys() == g1.keys() and 'blocks.1.attn.qkv.weight' in g0
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-4, atol=1e-7), n


@pytest.mark.parametrize('case', [
    dict(layers=[0, 1]),
    dict(layers=[0, 2], heads=[1, 3]),                      # some heads of some layers
    dict(layers={0: 0, 1: 2}, student=dict(depth=2, num_heads=2)),    # a smaller student: mapped layers, heads
    dict(layers=[1], transfer='q')], ids=['maps', 'heads', 'smaller', 'q'])
def test_fast_step_equals_the_plain_definition(case):
    """What the script runs (distill_loss_fn) and the step as the method defines it (plain_loss_fn): the same
    loss and gradients, fp32."""
    teacher = model(0, num_classes=0).requires_grad_(False).eval()
    cfg = DistillConfig(smoothing=0.1, transfer=case.get('transfer', 'attn'))
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 3, 4])
    students, results = [model(1, **case.get('student', {})) for _ in range(2)], []
    for student, make in zip(students, (distill_loss_fn, plain_loss_fn)):
        loss, parts = make(cfg, teacher, case['layers'], case.get('heads'))(student, x, y)
        loss.backward()
        results.append((loss, parts['attn'], grads(student)))
    (l0, a0, g0), (l1, a1, g1) = results
    assert a0 > 0 and torch.allclose(l0, l1, rtol=1e-6) and torch.allclose(a0, a1, rtol=1e-6)
    assert g0.keys() == g1.keys()
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-4, atol=1e-7), n


def test_distillation_runs_teacher_and_student_layer_by_layer():
    teacher, student = model(0, num_classes=0).requires_grad_(False).eval(), model(1)
    order = []
    for who, m in (('t', teacher), ('s', student)):
        for i, b in enumerate(m.blocks):
            b.norm1.register_forward_hook(lambda *a, who=who, i=i: order.append(f'{who}{i}'))
    loss, _ = distill_loss_fn(DistillConfig(), teacher, [0, 1], None)(student, torch.randn(2, 3, 32, 32),
                                                                      torch.tensor([0, 1]))
    assert order == ['s0', 't0', 's1', 't1', 's2']     # teacher layer i runs when student layer i needs it
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_copy_step_equals_the_naive_step():
    """A student without q/k in copied layers trains exactly like one whose q, k and softmax are overwritten."""
    teacher = model(0, num_classes=0).requires_grad_(False).eval()
    layers = [0, 1, 2]
    with_qk, without = model(1), model(1, no_qk_layers=layers)
    state = {k.replace('attn.qkv', 'attn.v'): v for k, v in with_qk.state_dict().items()}
    for k in [k for k in state if '.attn.v.' in k]:    # the v third of qkv
        state[k] = state[k].chunk(3)[2]
    without.load_state_dict(state)
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 3, 4])
    fast = copy_loss(CopyConfig(smoothing=0.1), teacher, layers, None)(without, x, y)[0]
    naive = naive_copy_loss(teacher, layers)(with_qk, x, y)[0]
    fast.backward()
    naive.backward()
    assert torch.allclose(fast, naive, rtol=1e-6)
    g_fast, g_naive = grads(without), grads(with_qk)
    for n, g in g_fast.items():
        ref = g_naive[n.replace('attn.v', 'attn.qkv')]
        ref = ref.chunk(3)[2] if '.attn.v.' in n else ref
        assert torch.allclose(g, ref, rtol=1e-4, atol=1e-7), n
    assert g_naive['blocks.0.attn.qkv.weight'].chunk(3)[0].abs().max() == 0   # the naive path's q: wasted work
    with torch.no_grad():    # evaluation: the copy model against the naive forward
        assert torch.allclose(CopyModel(teacher, without, layers)(x), naive_copy_forward(teacher, with_qk, x, layers),
                              rtol=1e-5, atol=1e-6)


def test_teacher_with_cast_weights_gives_the_same_maps_under_autocast():
    x = torch.randn(2, 3, 32, 32)
    plain, cast = (model(0, num_classes=0).requires_grad_(False).eval() for _ in range(2))
    cast_matmul_weights(cast, torch.bfloat16)
    assert cast.blocks[0].attn.qkv.weight.dtype == torch.bfloat16 and cast.pos_embed.dtype == torch.float32
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        a, b = plain.attention(x, [0, 2]), cast.attention(x, [0, 2])
    for i in (0, 2):
        assert a[i].dtype == torch.bfloat16 and torch.equal(a[i], b[i])


def test_benchmark_quick_writes_its_files(tmp_path):
    p = run_script('-m', 'tools.benchmark', '--quick', 'true', '--out-dir', tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.load(open(os.path.join(tmp_path, 'benchmark.json')))
    cases = {(r['method'], r['path']) for r in result['rows']}
    assert {('distill', 'default'), ('distill', 'naive'), ('copy', 'naive-bf16'), ('eval-copy', 'default')} <= cases
    assert all(r['img_s'] > 0 and r['flops'] > 0 for r in result['rows'])
    naive, fast = (next(r for r in result['rows'] if r['method'] == 'copy' and r['path'] == p) for p in ('naive', 'default'))
    assert naive['flops'] > fast['flops']        # the naive copy student computes q, k and its own maps
    assert all(r['peak_mb'] > 0 for r in result['rows'] if r['method'] == 'distill' and r['path'] in ('default', 'naive'))
    assert result['machine']['torch'] == torch.__version__ and result['targets']
    md = open(os.path.join(tmp_path, 'BENCHMARK.md')).read()
    assert '| vit_tiny | distill | default |' in md and '## Targets' in md
