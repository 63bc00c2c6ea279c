"""The map-free path at the shapes it runs at, how many fused attention calls a distillation step makes, and the
start-up check that compares it with the definition before a run trains (util/attention_check.py)."""
import collections
import json

import pytest
import torch
from einops import rearrange
from torch.utils._python_dispatch import TorchDispatchMode

from attention_distill import DistillConfig, FusedAttentionCrossEntropy, distill_loss_fn, map_free_cross_entropy
from conftest import run_script
from vit import VisionTransformer, scores, set_attn_implementation

DEVICES = ['cpu', pytest.param('cuda', marks=pytest.mark.gpu)]
# (heads, head width, tokens): ViT-B/16 and ViT-L/16 at 224 px, ViT-L/16 at 448 px, a head width that is no
# multiple of 8 (fused kernels want one in bf16 / fp16)
SHAPES = {'vit_b-224': (12, 64, 197), 'vit_l-224': (16, 64, 197), 'vit_l-448': (16, 64, 785), 'width-12': (4, 12, 197)}


def strided_qk(heads, d, n, b=2, seed=0):
    """q and k as a ViT layer makes them: strided views of one (B, N, 3 * H * d) qkv output, in bf16."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, n, 3 * heads * d, generator=g).to(torch.bfloat16)
    q, k, _ = rearrange(qkv, 'b n (three h d) -> three b h n d', three=3, h=heads).unbind(0)
    return q, k


def errors(q_t, k_t, q, k, implementation):
    """The loss's error and its q, k gradients' largest errors (relative to their largest entries), computed under
    bf16 autocast from these bf16 inputs, against the definition in float64 of the same inputs."""
    qd, kd = (t.detach().double().requires_grad_() for t in (q, k))
    ref = -(scores(q_t.double(), k_t.double()).softmax(-1) * scores(qd, kd).log_softmax(-1)).sum(-1).mean()
    ref_grads = torch.autograd.grad(ref, (qd, kd))
    qs, ks = (t.detach().clone().requires_grad_() for t in (q, k))
    with torch.autocast(q.device.type, dtype=torch.bfloat16):
        loss = map_free_cross_entropy(q_t, k_t, qs, ks) if implementation == 'sdpa' else \
            FusedAttentionCrossEntropy.apply(scores(q_t, k_t), scores(qs, ks))
    grads = torch.autograd.grad(loss, (qs, ks))
    return [abs(loss.item() - ref.item()) / ref.item()] + \
        [((g.double() - r).abs().max() / r.abs().max()).item() for g, r in zip(grads, ref_grads)]


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('shape', SHAPES.values(), ids=SHAPES.keys())
def test_map_free_at_production_shapes_under_bf16(shape, device):
    """Loss and gradients of the map-free loss, bf16 autocast, strided q and k, against float64: no worse than
    twice the eager path's own error (or 1% of the largest gradient entry, 0.1% of the loss). CUDA's fused kernel
    refuses a head width that is no multiple of 8 in bf16 (torch 2.11, an H200) with a RuntimeError, which the
    start-up check meets by sending auto to eager (test_a_private_entry_point_that_refuses_is_met_at_the_start)."""
    q_t, k_t = (t.to(device) for t in strided_qk(*shape, seed=0))
    q, k = (t.to(device) for t in strided_qk(*shape, seed=1))
    assert not q.is_contiguous()
    try:
        ours = errors(q_t, k_t, q, k, 'sdpa')
    except RuntimeError:                       # refused: only CUDA's kernel, only at such a width
        assert device == 'cuda' and shape[1] % 8
        return
    eager = errors(q_t, k_t, q, k, 'eager')
    assert ours[0] <= max(2 * eager[0], 1e-3), (ours, eager)
    assert all(e <= max(2 * r, 1e-2) for e, r in zip(ours[1:], eager[1:])), (ours, eager)

# -----------------------------------------------------------------------------
# Fused attention calls in one step


class AttentionCalls(TorchDispatchMode):
    """Counts the fused attention kernels an aten op dispatch runs, forward and backward."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if 'scaled_dot_product' in name or 'flash_attention' in name or 'efficient_attention' in name:
            self.calls['backward' if 'backward' in name else 'forward'] += 1
        return func(*args, **(kwargs or {}))


def test_a_map_free_distillation_step_makes_two_fused_calls_per_layer_each_way():
    """The Fashion-MNIST preset's shape (6 blocks, 8 heads, 50 tokens), layers 0-4 distilled: the student's own
    6 calls each way, the teacher's 4 blocks before its last distilled layer, and per distilled layer 2 forward
    (S K with the lse, P K) and 2 backward calls. (Before: 4 forward and 2 backward per layer, 30 / 16 in all.)"""
    arch = dict(img_size=28, patch_size=4, embed_dim=64, depth=6, num_heads=8, global_pool=True)
    torch.manual_seed(0)
    teacher = set_attn_implementation(VisionTransformer(**arch, num_classes=0), 'sdpa').requires_grad_(False).eval()
    student = set_attn_implementation(VisionTransformer(**arch, num_classes=10), 'sdpa')
    loss_fn = distill_loss_fn(DistillConfig(), teacher, [0, 1, 2, 3, 4], None, 'sdpa')
    x, y = torch.randn(4, 3, 28, 28), torch.tensor([0, 1, 2, 3])
    with AttentionCalls() as count, torch.autocast('cpu', dtype=torch.bfloat16):
        loss_fn(student, x, y)[0].backward()
    assert count.calls == {'forward': 6 + 4 + 2 * 5, 'backward': 6 + 2 * 5}

class Passes(TorchDispatchMode):
    """The aten ops that read or write a tensor of at least `numel` elements (a (B, H, N, d) one), views and the fused
    attention kernels left out (what happens inside those is theirs): (name, [(shape, dtype) of those tensors])."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        big = [(tuple(t.shape), t.dtype) for t in tensors if t.numel() >= self.numel]
        name = func.overloadpacket.__name__
        if big and not func.is_view and 'scaled_dot_product' not in name:
            self.ops.append((name, big))
        return out


def test_the_map_free_loss_s_passes_over_q_and_k(monkeypatch):
    """One distilled layer under bf16 autocast, the teacher's q and k as teacher_outputs hands them over (views of its
    layer's qkv, no copy): 5 elementwise passes over (B, H, N, d) tensors in its forward (Q made contiguous, S^T Q -
    P^T Q, q . P K and its sum, S K - P K) and 2 in its backward (the two gradients scaled), none in fp32; 2 fused
    calls each way (results/benchmark/ATTENTION.md: before, 8 + 7 passes and the teacher's 2 copies). It keeps two
    (B, H, N, d) tensors for its backward, in bf16, and nothing of the teacher's."""
    from teacher import teacher_outputs
    b, heads, n, d = 2, 4, 17, 8
    teacher = VisionTransformer(img_size=16, patch_size=4, embed_dim=heads * d, depth=2, num_heads=heads,
                                num_classes=0).requires_grad_(False).eval()
    qkv = torch.randn(b, n, 3 * heads * d, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        with torch.no_grad():
            given = teacher_outputs(teacher, torch.randn(b, 3, 16, 16), [1], ('q', 'k'))[1]
        q, k, _ = rearrange(qkv.bfloat16(), 'b n (three h d) -> three b h n d', three=3, h=heads).unbind(0)
        with Passes(b * heads * n * d) as forward, AttentionCalls() as calls:
            loss = map_free_cross_entropy(given['q'], given['k'], q, k)
    saved = loss.grad_fn.saved_tensors
    with Passes(b * heads * n * d) as backward:
        torch.autograd.grad(loss, (q, k))
    teachers = {t.untyped_storage().data_ptr() for t in given.values()}
    assert len(teachers) == 1 and not given['q'].is_contiguous()           # views of one qkv output, not copies
    assert [name for name, _ in forward.ops] == ['clone', 'sub_', 'mul', 'sum', 'sub']
    assert [name for name, _ in backward.ops] == ['mul', 'mul']
    assert {dtype for _, big in forward.ops + backward.ops for _, dtype in big} == {torch.bfloat16}
    assert calls.calls == {'forward': 2, 'backward': 2}
    assert [(tuple(t.shape), t.dtype) for t in saved] == [((b, heads, n, d), torch.bfloat16)] * 2
    assert not teachers & {t.untyped_storage().data_ptr() for t in saved}


# -----------------------------------------------------------------------------
# The start-up check: a fused kernel that computes something else is caught before the first step


BROKEN = ('import torch.nn.functional as F; sdpa = F.scaled_dot_product_attention\n'   # each query given another's
          'F.scaled_dot_product_attention = lambda q, k, v, **kw: sdpa(q, k, v, **kw).flip(-2)\n')
AUTO_SDPA = 'from util import launch; launch.AUTO_ATTN["cpu"] = ("sdpa", "as on CUDA")\n'
RUN = 'sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name="__main__")'
# the shipped teacher, one step of 16 images, evaluated on 256 held-out ones (an untrained teacher's maps are as even
# as the student's: its fused path would compute the same whatever rows a broken kernel swapped)
SHIPPED = ['--data', 'fashion-mnist', '--teacher', 'teachers/fashion-mnist-mae.pt', '--batch-size', '16',
           '--max-steps', '1', '--val-size', '256', '--num-workers', '0']


def launch(script, code, flags, out):
    """The script run as `python script ...`, after `code` (a patch) ran in its process."""
    return run_script('-c', 'import runpy, sys\n' + code + RUN, script, *SHIPPED, '--out-dir', out, *flags)


@pytest.mark.parametrize('script', ['attention_copy.py', 'attention_distill.py'])
def test_a_wrong_fused_kernel_stops_sdpa_before_training(script, tmp_path):
    r = launch(script, BROKEN, ['--attn-implementation', 'sdpa'], tmp_path / 'r')
    assert r.returncode != 0 and 'Traceback' not in r.stderr, r.stderr[-2000:]
    line = r.stderr.strip()
    assert '\n' not in line and 'start-up check' in line and '--attn-implementation eager' in line, line
    assert 'flash kernel, cpu' in line and 'step 1/' not in r.stdout     # it names the kernel; it never trained
    assert not (tmp_path / 'r').exists()                                 # and leaves nothing behind


@pytest.mark.parametrize('script', ['attention_copy.py', 'attention_distill.py'])
def test_under_auto_a_wrong_fused_kernel_falls_back_to_eager(script, tmp_path):
    r = launch(script, AUTO_SDPA + BROKEN, [], tmp_path / 'r')
    assert r.returncode == 0, r.stderr[-2000:]
    said = [line for line in r.stdout.splitlines() if 'start-up check' in line]
    assert len(said) == 1 and 'falling back to eager' in said[0]
    record = json.load(open(tmp_path / 'r' / 'config.json'))['attention_check']
    assert record['implementation'] == 'eager' and record['error'] > record['tolerance']


def test_with_the_real_kernel_the_check_passes_and_is_recorded(tmp_path):
    """Distillation's under auto (copy's: tests/test_transfer_scripts.py, under torchrun with sdpa asked for)."""
    r = launch('attention_distill.py', AUTO_SDPA, [], tmp_path / 'r')
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'sdpa holds' in r.stdout and 'falling back' not in r.stdout
    record = json.load(open(tmp_path / 'r' / 'config.json'))['attention_check']
    assert record['implementation'] == 'sdpa' and 0 < record['error'] <= record['tolerance']
    assert record['backend'] == 'flash' and record['seconds'] < 5


REFUSED = ('import torch\ndef refused(*args, **kwargs):\n    raise RuntimeError("No available kernel. Aborting")\n'
           'torch.ops.aten._scaled_dot_product_flash_attention_for_cpu = refused\n')


def test_a_private_entry_point_that_refuses_is_met_at_the_start(tmp_path):
    """A torch whose lse entry point is missing, has another signature or refuses the shapes: sdpa stops before
    training, naming what the kernel said; auto goes on with eager. Never a failure mid-run."""
    r = launch('attention_distill.py', REFUSED, ['--attn-implementation', 'sdpa'], tmp_path / 'a')
    assert r.returncode != 0 and 'Traceback' not in r.stderr and 'No available kernel' in r.stderr, r.stderr[-2000:]
    r = launch('attention_distill.py', AUTO_SDPA + REFUSED, [], tmp_path / 'b')
    assert r.returncode == 0 and 'falling back to eager' in r.stdout, r.stderr[-2000:]
