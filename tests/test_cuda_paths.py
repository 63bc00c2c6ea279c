"""The branches the code takes on CUDA only, run on CUDA (`python -m pytest -m gpu tests`) and, where the
logic allows, on the CPU too: the fused attention loss, the map-free loss, eager and sdpa, attention maps
kept in the autocast dtype, the teacher's cast weights, the autocast dtype, TF32, pinned-memory loading."""
import argparse
import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from attention_copy import CopyConfig, copied, copy_loss
from attention_distill import DistillConfig, FusedAttentionCrossEntropy, attention_cross_entropy, distill_loss_fn
from conftest import relative_distance
from data import build_dataset
from standin_cuda import FLOOR
from util.datafiles import build_loader
from teacher import cast_matmul_weights
from util import engine, launch
from util.config import TrainConfig
from vit import VisionTransformer, set_attn_implementation

ARCH = dict(img_size=32, patch_size=8, num_classes=5, embed_dim=64, depth=3, num_heads=4, global_pool=True)
DEVICES = ['cpu', pytest.param('cuda', marks=pytest.mark.gpu)]
gpu = pytest.mark.gpu


def model(seed, device='cpu', **kw):
    torch.manual_seed(seed)
    return VisionTransformer(**{**ARCH, **kw}).to(device)

# -----------------------------------------------------------------------------
# The fused attention cross-entropy: the CPU's chunked rows and CUDA's single pass


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16], ids=['fp32', 'bf16', 'fp16'])
def test_fused_attention_cross_entropy_against_autograd(device, dtype):
    """Forward and gradient against autograd on fp32 copies (B*H*N = 2080 rows: three chunks on a CPU)."""
    g = torch.Generator().manual_seed(0)
    t, s = ((3 * torch.randn(4, 8, 65, 65, generator=g)).to(device, dtype) for _ in range(2))
    s_ref, s_fused = s.float().clone().requires_grad_(), s.clone().requires_grad_()
    ref, fused = attention_cross_entropy(t, s_ref), FusedAttentionCrossEntropy.apply(t, s_fused)
    (2.5 * ref).backward()
    (2.5 * fused).backward()
    assert fused.dtype == torch.float32 and s_fused.grad.dtype == dtype
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)
    # one rounding of the fp32 gradient (autograd) against a rounded softmax(s) - softmax(t), then scaled
    want = s_ref.grad.to(dtype).float()
    rtol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(s_fused.grad.float(), want, rtol=rtol, atol=rtol * want.abs().max().item())


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('grad_scale', [2.0 ** 16, 2.0 ** 10], ids=['scale-2^16', 'scale-2^10'])
def test_fused_loss_keeps_tiny_fp16_gradients_under_a_grad_scaler(device, grad_scale):
    """fp16 maps of a student close to its teacher (softmax differences ~4e-6), 2 * 16 * 197 rows averaged
    over, a GradScaler's scale: (softmax(s) - softmax(t)) / count underflows fp16, and the scaler's first
    scale, 2**16, is above fp16's largest number (65504). So the scale is formed in fp32, then applied;
    the gradient equals autograd's on fp32 copies, rounded to fp16 once."""
    g = torch.Generator().manual_seed(0)
    t = 2 * torch.randn(2, 16, 197, 197, generator=g)
    s = (t + 1e-2 * torch.randn(t.shape, generator=g)).to(device, torch.float16)
    t = t.to(device, torch.float16)
    s_ref, s_fused = s.float().clone().requires_grad_(), s.clone().requires_grad_()
    (grad_scale * attention_cross_entropy(t, s_ref)).backward()
    (grad_scale * FusedAttentionCrossEntropy.apply(t, s_fused)).backward()
    want, got = s_ref.grad.to(torch.float16), s_fused.grad
    diff = s.float().softmax(-1) - t.float().softmax(-1)
    assert (diff.half() / (s.numel() // s.shape[-1]) == 0).float().mean() > 0.5   # the case bites: underflow
    assert got.isfinite().all() and (got != 0).float().mean() > 0.9
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-3, atol=2e-3 * want.abs().max().item())

# -----------------------------------------------------------------------------
# SDPA: the same numbers as explicit attention, on a fused kernel, in exactly the layers needing no map


@gpu
@pytest.mark.parametrize('dtype', [None, torch.bfloat16], ids=['fp32', 'bf16'])
def test_sdpa_matches_explicit_attention_on_cuda(dtype, exact_fp32):
    m, x = model(0, 'cuda'), torch.randn(4, 3, 32, 32, device='cuda')
    env = argparse.Namespace(device=torch.device('cuda'), dtype=dtype)
    outs, grads = [], []
    for implementation in ('sdpa', 'eager'):
        m.zero_grad()
        # the fused run may use flash, memory-efficient or cuDNN attention, never the unfused math fallback
        only_fused = sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                  SDPBackend.CUDNN_ATTENTION]) if implementation == 'sdpa' else contextlib.nullcontext()
        with only_fused, engine.autocast(env):
            y = set_attn_implementation(m, implementation)(x).float()
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    tol = 1e-4 if dtype is None else 3e-2
    assert relative_distance(outs[0], outs[1]) < tol and relative_distance(grads[0], grads[1]) < tol


@pytest.mark.parametrize('device', DEVICES)
def test_each_implementation_takes_its_kernel(device, monkeypatch):
    """sdpa: every layer of a plain model, a copy student and a map-free distillation step call
    F.scaled_dot_product_attention; eager: none does."""
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, 'scaled_dot_product_attention', lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    x, y = torch.randn(2, 3, 32, 32, device=device), torch.tensor([0, 1], device=device)
    for implementation in ('eager', 'sdpa'):
        def vit(seed, **kw):
            return set_attn_implementation(model(seed, device, **kw), implementation)
        teacher = vit(0, num_classes=0).requires_grad_(False).eval()
        distill = distill_loss_fn(DistillConfig(), teacher, [0, 1], None, implementation)
        copy = copy_loss(CopyConfig(), teacher, [0, 1, 2], None, implementation)
        counted = {}
        for name, run in {'plain': lambda: vit(1)(x), 'copy': lambda: copy(vit(1, no_qk_layers=[0, 1, 2]), x, y),
                          'distill': lambda: distill(vit(1), x, y)[0].backward()}.items():
            calls.clear()
            run()
            counted[name] = len(calls)
        if implementation == 'eager':
            assert counted == {'plain': 0, 'copy': 0, 'distill': 0}
        else:   # the teacher's blocks before its last transferred one, the student's 3; distillation: 2 layers x P K
            # (S K and its lse come from the kernel's aten entry point; the backward is the kernels' own)
            assert counted == {'plain': 3, 'copy': 2 + 3, 'distill': 1 + 3 + 2}, counted


@gpu
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_map_free_cross_entropy_on_cuda(dtype):
    """The row log-sum-exp from CUDA's memory-efficient kernel and the backward's attention calls: the loss and
    gradients of the float64 definition (on the CPU) within each dtype's rounding."""
    from attention_distill import map_free_cross_entropy, to_student_heads
    from vit import scores
    torch.manual_seed(0)
    q_t, k_t = (2 * torch.randn(2, 4, 17, 64) for _ in range(2))
    q, k = (2 * torch.randn(2, 2, 17, 64) for _ in range(2))                    # groups of 2 teacher heads
    ref_q, ref_k = (t.to(dtype).double().requires_grad_() for t in (q, k))
    p = to_student_heads(scores(q_t.to(dtype).double(), k_t.to(dtype).double()), 2).softmax(-1)
    ref = -(p * scores(ref_q, ref_k).log_softmax(-1)).sum(-1).mean()
    ref.backward()
    qs, ks = (t.to(dtype).cuda().requires_grad_() for t in (q, k))
    ours = map_free_cross_entropy(q_t.to(dtype).cuda(), k_t.to(dtype).cuda(), qs, ks)
    ours.backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert abs(ours.item() - ref.item()) <= tol * abs(ref.item())
    for g, r in ((qs.grad, ref_q.grad), (ks.grad, ref_k.grad)):
        assert (g.double().cpu() - r).abs().max() <= tol * r.abs().max()


@gpu
@pytest.mark.parametrize('method', ['copy', 'distill'])
def test_eager_and_sdpa_steps_agree_on_cuda(method, exact_fp32):
    x, y = torch.randn(3, 3, 32, 32, device='cuda'), torch.tensor([0, 3, 4], device='cuda')
    results = []
    for implementation in ('eager', 'sdpa'):
        teacher = set_attn_implementation(model(0, 'cuda', num_classes=0), implementation).requires_grad_(False).eval()
        student = set_attn_implementation(model(1, 'cuda', no_qk_layers=[0, 1] if method == 'copy' else ()),
                                          implementation)
        loss_fn = copy_loss(CopyConfig(), teacher, [0, 1], None, implementation) if method == 'copy' else \
            distill_loss_fn(DistillConfig(), teacher, [0, 1], None, implementation)
        loss, _ = loss_fn(student, x, y)
        loss.backward()
        results.append((loss.detach(), torch.cat([p.grad.flatten() for p in student.parameters()])))
    assert relative_distance(results[0][0], results[1][0]) < 1e-4
    assert relative_distance(results[0][1], results[1][1]) < 1e-3


@pytest.mark.parametrize('method', ['copy', 'distill'])
def test_every_fused_attention_backward_is_handed_a_contiguous_gradient(method):
    """A step's fused attention calls hand their backward one incoming-gradient layout, contiguous (vit.ContiguousGrad):
    cuDNN runs a second layout at a shape as the first one it met there (results/benchmark-h100/README.md)."""
    handed = []

    class Backwards(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if 'attention' in func.__name__ and 'backward' in func.__name__:
                handed.append(args[0].is_contiguous())
            return func(*args, **(kwargs or {}))
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 3, 4])
    teacher = set_attn_implementation(model(0, num_classes=0), 'sdpa').requires_grad_(False).eval()
    student = set_attn_implementation(model(1, no_qk_layers=[0, 1] if method == 'copy' else ()), 'sdpa')
    loss_fn = copy_loss(CopyConfig(), teacher, [0, 1], None, 'sdpa') if method == 'copy' else \
        distill_loss_fn(DistillConfig(), teacher, [0, 1], None, 'sdpa')
    with Backwards():
        loss, _ = loss_fn(student, x, y)
        loss.backward()
    assert handed and all(handed), handed

# -----------------------------------------------------------------------------
# Attention maps kept in the autocast dtype (CUDA's autocast makes every softmax fp32 unless told)


@contextlib.contextmanager
def cuda_autocast_rules(dtype):
    """CUDA's autocast on fake 'cuda' tensors (shapes and dtypes, no data): runs a forward pass without a GPU. Below
    the stand-in's floor, skipped, saying why."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    if torch.__version__ < FLOOR:
        pytest.skip(f'fake CUDA tensors need torch {FLOOR} or later (here {torch.__version__}: moving a module to a '
                    'fake cuda:0 starts the CUDA runtime, which fails without a GPU)')
    with FakeTensorMode(allow_non_fake_inputs=True):
        torch.set_autocast_enabled('cuda', True)
        torch.set_autocast_dtype('cuda', dtype)
        torch.autocast_increment_nesting()
        try:
            yield
        finally:
            torch.autocast_decrement_nesting()
            torch.clear_autocast_cache()
            torch.set_autocast_enabled('cuda', False)


def maps_kept(device):
    """dtypes of the (B, H, N, N) maps under bf16 autocast: those a distillation step keeps for backward, and
    those a copy student is given. device: 'cuda', or 'fake-cuda' (CUDA's autocast rules, no GPU)."""
    teacher = model(0, num_classes=0).requires_grad_(False).eval()
    cast_matmul_weights(teacher, torch.bfloat16)
    student = model(1)
    saved = []
    with torch.autocast('cuda', torch.bfloat16) if device == 'cuda' else cuda_autocast_rules(torch.bfloat16):
        teacher, student = teacher.to('cuda'), student.to('cuda')
        x, y = torch.randn(2, 3, 32, 32, device='cuda'), torch.tensor([0, 1], device='cuda')
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            distill_loss_fn(DistillConfig(), teacher, [0, 1, 2], None, 'eager')(student, x, y)   # explicit maps
        given = copied(teacher, x, [0, 1, 2], None, 'attn', implementation='sdpa')
    return {t.dtype for t in saved if t.numel() == 2 * 4 * 17 * 17}, {m['q'].dtype for m in given.values()}


@pytest.mark.parametrize('device', ['fake-cuda', pytest.param('cuda', marks=gpu)])
def test_attention_maps_are_kept_in_the_autocast_dtype(device):
    """CUDA's autocast makes every softmax fp32 unless told: kept beside its bf16 cast, that doubled the
    memory of each distilled layer's map (eager); a copy student is given the teacher's q and k in bf16."""
    saved, given = maps_kept(device)
    assert saved == {torch.bfloat16} and given == {torch.bfloat16}

# -----------------------------------------------------------------------------
# The teacher's cast weights, the autocast dtype, TF32, pinned memory


@gpu
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=['bf16', 'fp16'])
def test_teacher_with_cast_weights_gives_the_same_maps_on_cuda(dtype):
    x = torch.randn(2, 3, 32, 32, device='cuda')
    plain, cast = (model(0, 'cuda', num_classes=0).requires_grad_(False).eval() for _ in range(2))
    cast_matmul_weights(cast, dtype)
    with torch.no_grad(), torch.autocast('cuda', dtype=dtype):
        a, b = plain.attention(x, [0, 2]), cast.attention(x, [0, 2])
    for i in (0, 2):
        assert a[i].dtype == dtype and torch.equal(a[i], b[i])


def test_auto_precision_is_fp16_where_bf16_would_be_emulated(monkeypatch):
    """A T4 can make bf16 tensors (is_bf16_supported() is True by emulation) but has no bf16 units."""
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: including_emulation)
    assert launch.amp_dtype('auto', torch.device('cuda')) is torch.float16
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: True)
    assert launch.amp_dtype('auto', torch.device('cuda')) is torch.bfloat16


@gpu
def test_auto_precision_and_tf32_on_this_gpu(tmp_path, exact_fp32):
    native = torch.cuda.get_device_capability()[0] >= 8
    assert launch.amp_dtype('auto', torch.device('cuda')) is (torch.bfloat16 if native else torch.float16)
    a, b = torch.randn(2, 1024, 1024, device='cuda', dtype=torch.float64).unbind(0)
    exact = relative_distance(a.float() @ b.float(), a @ b)
    _, _, device = launch.processes(TrainConfig(out_dir=str(tmp_path / 'run')))
    assert device == torch.device('cuda', 0) and torch.cuda.current_device() == 0
    tf32 = relative_distance(a.float() @ b.float(), a @ b)
    assert exact < 1e-5 and (tf32 > 1e-4 if native else tf32 < 1e-5)    # TF32: 10 mantissa bits, Ampere on


@gpu
def test_loader_pins_memory_and_workers_give_the_same_batches(monkeypatch):
    from util import datafiles
    monkeypatch.setattr(datafiles, 'FAKE_HELD', 0)     # read per image by loader workers, as a folder is
    cfg = TrainConfig(data='fake', fake_size=64, batch_size=16, num_workers=2)
    train_set, _ = build_dataset(cfg, train=True)
    loader = build_loader(cfg, train_set, True)
    alone = build_loader(TrainConfig(**{**cfg.__dict__, 'num_workers': 0}), train_set, True)
    assert loader.pin_memory and loader.num_workers == 2
    for (x, y), (x0, y0) in zip(loader, alone):
        assert x.is_pinned() and y.is_pinned()
        x_gpu = x.to('cuda', non_blocking=True)   # asynchronous from pinned memory; the stream orders it
        assert torch.equal(x_gpu.cpu(), x0) and torch.equal(y, y0)
