"""Every path computes what the definition and the naive path (tools/benchmark_cases.py: the authors' way) compute: eager
(explicit maps, the fused cross-entropy) and sdpa (no map: map_free_cross_entropy) against each other and float64."""

import pytest
import torch

from attention_copy import CopyConfig, CopyModel, copy_loss
from torch.utils._python_dispatch import TorchDispatchMode

from attention_distill import (DistillConfig, FusedAttentionCrossEntropy, attention_cross_entropy, distill_loss_fn,
                               map_free_cross_entropy, to_student_heads)
from teacher import cast_matmul_weights
from tools.benchmark_cases import naive_copy_forward, naive_copy_loss, naive_distill_loss
from vit import IMPLEMENTATIONS, VisionTransformer, scores, set_attn_implementation

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


@pytest.mark.parametrize('implementation', IMPLEMENTATIONS)
def test_distill_step_equals_the_naive_step(implementation):
    """Teacher stopped at its last distilled layer, fused or map-free loss: the naive step's loss and gradients."""
    teacher = model(0, num_classes=0).requires_grad_(False).eval()
    students = [model(1), model(1)]
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 3, 4])
    fast = distill_loss_fn(DistillConfig(smoothing=0.1), teacher, [0, 1], None, implementation)
    naive = naive_distill_loss(teacher, [0, 1], weight=3.0, drop_path=0.0)
    losses = []
    for student, loss_fn in zip(students, (fast, naive)):
        loss, parts = loss_fn(set_attn_implementation(student, implementation), x, y)
        loss.backward()
        losses.append((loss, parts['attn']))
    assert torch.allclose(losses[0][0], losses[1][0], rtol=1e-6) and losses[0][1] > 0
    g0, g1 = grads(students[0]), grads(students[1])
    assert g0.keys() == g1.keys() and 'blocks.1.attn.qkv.weight' in g0
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-4, atol=1e-7), n

# -----------------------------------------------------------------------------
# eager (explicit maps) and sdpa (no map): the same loss and gradients


CASES = [dict(layers=[0, 1]),
         dict(layers=[0, 2], heads=[1, 3]),                                   # some heads of some layers
         dict(layers={0: 0, 1: 2}, student=dict(depth=2, num_heads=2)),       # fewer layers and heads
         dict(layers={0: 0, 1: 2}, student=dict(depth=2, num_heads=2, embed_dim=48)),   # another head width too
         dict(layers=[1], transfer='q')]
IDS = ['maps', 'heads', 'smaller', 'wider-heads', 'q']


def step(method, case, implementation, dtype=torch.float64, x=None, y=None):
    """(loss, grads) of one step of copy or distillation on one implementation, in dtype, no autocast."""
    teacher = set_attn_implementation(model(0, num_classes=0), implementation).to(dtype).requires_grad_(False).eval()
    layers, heads = case['layers'], case.get('heads')
    no_qk = method == 'copy' and heads is None and case.get('transfer', 'attn') == 'attn'
    student = model(1, **case.get('student', {}), no_qk_layers=list(layers) if no_qk else ())
    set_attn_implementation(student, implementation).to(dtype)
    cfg = (CopyConfig if method == 'copy' else DistillConfig)(smoothing=0.1, transfer=case.get('transfer', 'attn'))
    loss_fn = copy_loss(cfg, teacher, layers, heads, implementation) if method == 'copy' else \
        distill_loss_fn(cfg, teacher, layers, heads, implementation)
    loss, parts = loss_fn(student, x.to(dtype), y)
    loss.backward()
    return loss.detach(), parts, grads(student)


@pytest.mark.parametrize('method', ['copy', 'distill'])
@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_eager_and_sdpa_agree_in_float64(method, case):
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 3, 4])
    (l0, p0, g0), (l1, p1, g1) = (step(method, case, i, torch.float64, x, y) for i in ('eager', 'sdpa'))
    assert abs(l0 - l1) <= 1e-10 and g0.keys() == g1.keys() and len(g0) > 5
    if method == 'distill':
        assert p0['attn'] > 0 and abs(p0['attn'] - p1['attn']) <= 1e-10
    for n in g0:
        assert (g0[n] - g1[n]).abs().max() <= 1e-10, n


def reference(q_t, k_t, q, k):
    """The cross-entropy of the two maps and its gradients, written out in float64."""
    q, k = (t.detach().double().clone().requires_grad_() for t in (q, k))
    g = q_t.shape[1] // q.shape[1]
    p = (q_t.double() * q_t.shape[-1] ** -0.5 @ k_t.double().transpose(-2, -1)).softmax(-1)
    p = p.unflatten(1, (-1, g)).mean(2)                                     # a group's mean map
    loss = -(p * (q * q.shape[-1] ** -0.5 @ k.transpose(-2, -1)).log_softmax(-1)).sum(-1).mean()
    return (loss, *torch.autograd.grad(loss, (q, k)))


def qk(heads, d, n=17, b=2, scale=2.0):
    return [scale * torch.randn(b, heads, n, d) for _ in range(2)]


# largest error allowed, of the loss and of each gradient relative to its largest entry, unless eager is worse
FLOOR = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-6, 2e-4), torch.bfloat16: (5e-3, 2e-2),
         torch.float16: (1e-3, 5e-3)}


def errors(dtype, q_t, k_t, q, k, implementation):
    """|loss - float64 loss| and the gradients' largest errors relative to their largest entries, for inputs in
    dtype, against the definition in float64 of the same (rounded) inputs."""
    q_t, k_t, q, k = (t.to(dtype) for t in (q_t, k_t, q, k))
    loss, gq, gk = reference(q_t, k_t, q, k)
    qs, ks = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    if implementation == 'sdpa':
        ours = map_free_cross_entropy(q_t, k_t, qs, ks)
    else:
        ours = FusedAttentionCrossEntropy.apply(to_student_heads(scores(q_t, k_t), q.shape[1]), scores(qs, ks))
    ours.backward()
    assert qs.grad.dtype == dtype and gq.abs().max() > 0
    return (abs(ours.double() - loss).item(), *(((g.double() - r).abs().max() / r.abs().max()).item()
                                                for g, r in ((qs.grad, gq), (ks.grad, gk))))


@pytest.mark.parametrize('near', [False, True], ids=['random', 'nearly-equal'])
@pytest.mark.parametrize('dtype', FLOOR, ids=str)
@pytest.mark.parametrize('heads', [(4, 4), (4, 2)], ids=['same-heads', 'groups'])
def test_map_free_cross_entropy_against_float64(near, dtype, heads):
    """Loss and gradients of map_free_cross_entropy against the explicit float64 definition, on random maps and on
    maps that nearly agree (the student = the teacher + 1% noise: late in training, where the gradient is the
    small difference of two attention products, each rounded). Within FLOOR, or no worse than twice the eager
    path's error: on nearly equal maps in bf16 both are off by a large part of the tiny gradient (measured: 0.3
    of its largest entry map-free, 1.1 eager), as the maps' own rounding is as large as their difference."""
    torch.manual_seed(0)
    q_t, k_t = qk(heads[0], 8)
    g = heads[0] // heads[1]
    q, k = (t[:, ::g] + 0.01 * torch.randn_like(t[:, ::g]) for t in (q_t, k_t)) if near else qk(heads[1], 8)
    ours, eager = (errors(dtype, q_t, k_t, q, k, i) for i in ('sdpa', 'eager'))
    assert ours[0] <= max(2 * eager[0], FLOOR[dtype][0] * 10), (ours, eager)
    assert all(e <= max(2 * r, FLOOR[dtype][1]) for e, r in zip(ours[1:], eager[1:])), (ours, eager)


def test_map_free_cross_entropy_with_fp16_and_a_grad_scaler():
    """fp16 with a GradScaler's scale (2^16): finite gradients that unscale to the float64 ones."""
    torch.manual_seed(0)
    q_t, k_t = qk(4, 8)
    q, k = qk(4, 8)
    _, gq, gk = reference(q_t, k_t, q, k)
    qs, ks = q.half().requires_grad_(), k.half().requires_grad_()
    (2.0 ** 16 * map_free_cross_entropy(q_t.half(), k_t.half(), qs, ks)).backward()
    for ours_g, ref_g in ((qs.grad, gq), (ks.grad, gk)):
        assert ours_g.isfinite().all()
        assert (ours_g.double() / 2 ** 16 - ref_g).abs().max() <= 3e-3 * ref_g.abs().max()

# -----------------------------------------------------------------------------
# sdpa: no (N, N) tensor anywhere in a step


class TensorShapes(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out

    def square(self, n):
        return [s for s in self.shapes if len(s) >= 2 and s[-2:] == (n, n)]


@pytest.mark.parametrize('method', ['copy', 'distill'])
@pytest.mark.parametrize('case', CASES[:4], ids=IDS[:4])
def test_sdpa_creates_no_map_in_a_step_or_in_evaluation(method, case):
    """Every tensor created in one sdpa training step (forward and backward, teacher and student, bf16 autocast) and
    in evaluation: none is (N, N) in its last two dimensions. The same step on eager does create maps (the check
    can see them)."""
    n = (32 // 8) ** 2 + 1
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 3, 4])
    seen = {}
    for implementation in IMPLEMENTATIONS:
        with TensorShapes() as rec, torch.autocast('cpu', dtype=torch.bfloat16):
            step(method, case, implementation, torch.float32, x, y)
        seen[implementation] = rec.square(n)
    assert seen['eager'] and not seen['sdpa'], seen['sdpa'][:3]
    teacher = model(0, num_classes=0).requires_grad_(False).eval()
    student = model(1, **case.get('student', {})).eval()
    pair = set_attn_implementation(CopyModel(teacher, student, case['layers'], case.get('heads')), 'sdpa')
    with TensorShapes() as rec, torch.no_grad():
        pair(x) if method == 'copy' else student(x)
    assert not rec.square(n)


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
