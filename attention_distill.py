"""
Attention distillation (Li et al. 2024, sec. 3.2): the student computes its own attention and is
pulled toward the teacher's by a loss; afterwards it is an ordinary ViT that needs no teacher.

    loss = CE(student(x), y) + w * sum over layers l of  H(softmax(t_l), softmax(s_l))
    H(p, q) = -(p * log q).sum(-1), averaged over batch, heads and query tokens (class token included),
    with t_l, s_l the pre-softmax attention logits of layer l (B, H, N, N), and w = 3.
    The Q / K / V variants use the mean squared error between teacher's and student's q, k or v.
    --average-maps batch | queries: the target is the teacher's map averaged over a batch's images or an image's
    queries (the paper's test of whether a map's worth is in its image and its query).
    --maps uniform | local: controls with no teacher in the target: every token attending to all alike, or a fixed
    locality prior (control_logits). Whether a gain comes from the teacher's maps or from any pull on attention.

    python finetune.py --data fashion-mnist --out-dir runs/teacher            # make a teacher
    python attention_distill.py --data fashion-mnist --teacher runs/teacher/checkpoint.pt
    python attention_distill.py ... --attn-implementation sdpa   # the loss without maps (the default on CUDA)
    python attention_distill.py --data imagenet --model vit_small --num-heads 8   # ViT-L's maps into a ViT-S
    torchrun --nproc_per_node 8 attention_distill.py --data imagenet --data-dir /datasets/imagenet
    # many nodes: torchrun --nnodes 8 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $HEAD:29500 ...

`--data imagenet` is the authors' recipe: MAE ViT-L/16 teacher, the first 18 of 24 layers distilled (what the release's
command asks for with --end_layer -6; its code ignores that flag and distils layers 0-20: RECIPES.md, "Which
layers"), 200 epochs. The saved checkpoint is a plain ViT:
`util.checkpoints.build_from_checkpoint('runs/distill/checkpoint.pt')`.
"""
import math
import signal
import sys
from dataclasses import dataclass

# Ctrl-C while torch loads: exit 130 quietly (run_main takes over from there)
if __name__ == '__main__':
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
import torch
import torch.nn.functional as F
from einops import rearrange

from data import batch_mixer, build_data
from teacher import NAMES, TransferConfig, build_pair, student_presets, teacher_outputs
from util.attention_check import settle_attention
from util.checkpoints import teacher_record
from util.config import SMALL_PRESETS, at_least, option
from util.engine import autocast, evaluate, soft_cross_entropy, train_one_epoch
from util.launch import resolve, run_main
from util.run import Run
from vit import ContiguousGrad, attend, scores

# -----------------------------------------------------------------------------
# The method: the loss as defined, on explicit maps ('eager')


def attention_cross_entropy(teacher_logits, student_logits):
    """-(softmax(t) * log_softmax(s)).sum(-1), mean over batch, heads, queries. (B, H, N, N) each.
    Equals the teacher's entropy when s == t (KL = 0); only the student gets a gradient."""
    wide = torch.promote_types(student_logits.dtype, torch.float32)          # fp32 at least
    p = teacher_logits.to(wide).softmax(-1)
    return -(p * student_logits.to(wide).log_softmax(-1)).sum(-1).mean()


def layer_loss(own, target, transfer, heads=None, implementation='eager'):
    """Attention loss of one layer: the cross-entropy of the teacher's map and the student's (eager: from their logits;
    sdpa: from their q and k, never a map: map_free_cross_entropy), or the MSE of q / k / v. A student with fewer heads
    than the teacher learns each group's mean map (to_student_heads)."""
    if transfer != 'attn':
        return F.mse_loss(pick(own[transfer], heads).float(), pick(target[transfer], heads).float())
    if implementation == 'sdpa':                                             # (B, H, N, d) each
        return map_free_cross_entropy(pick(target['q'], heads), pick(target['k'], heads),
                                      pick(own['q'], heads), pick(own['k'], heads))
    teacher = to_student_heads(target['logits'], own['logits'].shape[1])    # (B, H, N, N)
    return FusedAttentionCrossEntropy.apply(pick(teacher, heads), pick(own['logits'], heads))


def pick(t, heads):
    """t (B, H, ...) at the transferred heads: all of them where heads is None."""
    if heads is None:
        return t
    return t[:, heads]


def to_student_heads(logits, num_heads):
    """Teacher attention logits (B, H, N, N) at the student's head count h (H a multiple of h), still as logits:
    student head j stands for the g = H / h teacher heads j*g .. j*g+g-1, whose *probabilities* are averaged (the
    log returned: softmax gives the mean back). The mean of g maps is a map that routes the values as the g heads
    do on average, and the cross-entropy is linear in its target: distilled toward the mean, a student head is
    distilled toward each of its g heads, averaged. A mean of logits would be a sharper map no teacher head makes."""
    if logits.shape[1] == num_heads:
        return logits
    p = logits.softmax(-1, dtype=torch.promote_types(logits.dtype, torch.float32))   # (B, H, N, N)
    p = rearrange(p, 'b (h g) n m -> b h g n m', h=num_heads).mean(2)         # (B, h, N, N)
    return p.log().to(logits.dtype)


def control_logits(kind, grid, prefix):
    """The target of a control (--maps), as logits (N, N) for N = prefix + grid**2 tokens (class token and registers
    first, then the patches row by row): 'uniform', every query attending to every token alike (all logits 0);
    'local', a fixed locality prior: a patch attends to the patch j at distance d (in patches) by exp(-d**2 / 2), so
    mostly to itself and its 8 neighbours, and to each prefix token as to itself; a prefix token's query attends to
    all alike. Neither holds anything an image or a teacher could teach."""
    n = prefix + grid ** 2
    logits = torch.zeros(n, n)
    if kind == 'local':
        rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing='ij')
        at = torch.stack([rows.flatten(), cols.flatten()], 1).float()        # (grid**2, 2)
        logits[prefix:, prefix:] = -torch.cdist(at, at) ** 2 / 2
    return logits


def distill_loss_fn(cfg, teacher, layers, heads, implementation='eager', control=None):
    """loss_fn(net, images, targets) for engine.train_one_epoch: the teacher's logits (eager) or q and k (sdpa) of
    every distilled layer, then the student's own (kept), then CE + weight x the sum of the layers' losses. control:
    a control's target logits (H, N, N) (--maps: control_logits), every layer's in place of the teacher's."""
    assert cfg.average_maps == 'none' or implementation == 'eager', 'an average is made of maps (teacher.written_out)'
    assert control is None or (implementation == 'eager' and cfg.transfer == 'attn'), 'a control is a map'
    if cfg.transfer == 'attn' and implementation == 'eager':
        names = ('logits',)
    else:
        names = NAMES[cfg.transfer]
    dim = 0 if cfg.average_maps == 'batch' else 2                     # over images, or over queries

    def loss_fn(net, x, y):
        if control is not None:   # the same map for every image, layer and head: no teacher asked
            given = control.expand(len(x), *control.shape)   # (B, H, N, N)
            targets = {i: {'logits': given} for i in layers}
        else:
            targets = teacher_outputs(teacher, x, layers, names)   # {student layer: {name: tensor}}
        # the maps' mean p, as logits log(p): their softmax gives p back (eager)
        if cfg.average_maps != 'none':
            for t in targets.values():                               # (B, H, N, N), fp32
                mean = t['logits'].float().softmax(-1).mean(dim, True)
                t['logits'] = mean.expand_as(t['logits']).log()
        logits, kept = net(x, keep={i: names for i in layers})       # the student's own, kept
        # pop: a layer's teacher tensors go once its loss has them
        attn = sum(layer_loss(kept[i], targets.pop(i), cfg.transfer, heads, implementation)
                   for i in layers)
        ce = soft_cross_entropy(logits, y, cfg.smoothing)
        return ce + cfg.weight * attn, {'ce': ce.detach(), 'attn': attn.detach()}
    return loss_fn


# floats per row chunk of FusedAttentionCrossEntropy on a CPU (256 KB in fp32)
CPU_CHUNK = 2 ** 16


class FusedAttentionCrossEntropy(torch.autograd.Function):
    """attention_cross_entropy(t, s) with its gradient made in the forward pass: what eager runs.

    d/ds of the mean cross-entropy is (softmax(s) - softmax(t)) / (B * H * N), so the forward keeps just softmax(s) -
    softmax(t), one (B, H, N, N) tensor in the student's dtype, where autograd would keep two fp32 ones (softmax(t)
    and log_softmax(s)) and redo the arithmetic in the backward pass. On a CPU the rows go a few hundred at a time,
    so that their fp32 softmaxes stay in cache: the loss is bound by memory traffic, and this cuts it from ~38 to ~6
    bytes a map entry. On CPUs with bf16, eager with this loss measured faster than sdpa at every size benchmarked
    (results/benchmark).
    """

    @staticmethod
    def forward(ctx, teacher_logits, student_logits):
        n = student_logits.shape[-1]
        t = teacher_logits.reshape(-1, n)                                        # (rows, N)
        s = student_logits.reshape(-1, n)
        rows = len(s) if s.is_cuda else max(1, CPU_CHUNK // n)
        wide = torch.promote_types(s.dtype, torch.float32)                       # fp32 at least
        diff = torch.empty_like(s)
        total = s.new_zeros((), dtype=wide)
        for a in range(0, len(s), rows):
            p = torch.softmax(t[a:a + rows], -1, dtype=wide)
            log_q = torch.log_softmax(s[a:a + rows], -1, dtype=wide)
            torch.sub(log_q.exp(), p, out=diff[a:a + rows])
            total += torch.dot(p.flatten(), log_q.flatten())
        ctx.save_for_backward(diff.view_as(student_logits))
        ctx.count = len(s)                            # B * H * N rows averaged over
        return -total / ctx.count

    @staticmethod
    def backward(ctx, grad_loss):
        diff, = ctx.saved_tensors
        # applied in fp32: fp16 could not hold diff / count, nor a GradScaler's scale. No .item(): on CUDA it would
        # wait for the GPU, and torch.compile could not trace it.
        scale = grad_loss / ctx.count
        if diff.is_cuda:     # a CUDA kernel would round the fp32 scale to diff's dtype first
            return None, (diff.float() * scale).to(diff.dtype)
        return None, diff * scale     # a 0-dim CPU tensor multiplies as an fp32 scalar, in one pass

# -----------------------------------------------------------------------------
# The same computation without a map ('sdpa')


def map_free_cross_entropy(q_t, k_t, q, k, implementation='sdpa'):
    """attention_cross_entropy(scores(q_t, k_t), scores(q, k)), without writing either map.

    One row i of one head: the student's logits are s_ij = c q_i . k_j (c = 1 / sqrt(d)), its map S = softmax(s), the
    teacher's map is P, and K and Q stack the student's keys k_j and queries q_i as rows. Because P's rows sum to 1,
        CE_i = -sum_j P_ij log S_ij = -sum_j P_ij (s_ij - lse_i)            lse_i = log sum_j exp s_ij
             = lse_i - c q_i . sum_j P_ij k_j = lse_i - c q_i . (P K)_i
    and P K is attention with the student's keys as values: attend(q_t, k_t, K), never a map. Its gradient: d CE_i /
    d s_ij = S_ij - P_ij, so for the mean L over the R = B H N rows
        dL/dq_i = c ((S K) - (P K))_i / R,      dL/dk_j = c ((S^T Q) - (P^T Q))_j / R,
    where S^T Q and P^T Q are what a fused attention's backward gives its values for the incoming gradient Q. So two
    fused calls with K as their values, each run forward and backward at once, give all of it: S K with lse_i
    (attention_with_lse), P K, S^T Q and P^T Q. MapFreeCrossEntropy keeps only the two gradients (the teacher's q and
    k are free once its forward has them), which its backward scales. A teacher with g times the student's heads gives
    each student head the mean map of its group: attend averages P_g K over the group, and the loss is linear in P.
    implementation: its attention calls' (eager: written out; what the start-up check holds the fused ones to).
    Compiled (--compile), the loss is its formula, lse_i - c q_i . (P K)_i, differentiated by autograd
    (traced_cross_entropy): the compiler cannot trace the gradients this function takes inside its forward.
    """
    if torch.compiler.is_compiling():
        return traced_cross_entropy(q_t, k_t, q, k, implementation)
    return MapFreeCrossEntropy.apply(q_t, k_t, q, k, implementation)


class MapFreeCrossEntropy(torch.autograd.Function):
    """map_free_cross_entropy: the loss and its gradients made in the forward pass, in the inputs' dtype (fp32 for the
    sums): 5 elementwise passes over (B, H, N, d) tensors, and 2 in the backward (results/benchmark/ATTENTION.md)."""

    @staticmethod
    def forward(ctx, q_t, k_t, q, k, implementation):
        c = q.shape[-1] ** -0.5
        q = q.detach()
        k = k.detach()
        with torch.enable_grad():
            keys = k.detach().requires_grad_()                           # K: both calls' values
            # S K (B, H, N, d), lse (B, H, N)
            own, lse = attention_with_lse(q, k, keys, implementation)
            # P K (B, H, N, d)
            target = attend(q_t.to(q.dtype), k_t.to(q.dtype), keys, implementation)
            queries = q.contiguous()   # Q: both calls' incoming gradient
            grad_k, = torch.autograd.grad(own, keys, queries)            # S^T Q
            grad_k -= torch.autograd.grad(target, keys, queries)[0]      # S^T Q - P^T Q
        wide = torch.promote_types(q.dtype, torch.float32)
        dot = (queries * target).sum(-1, dtype=wide)                     # q_i . (P K)_i
        ctx.save_for_backward(own - target, grad_k)
        ctx.scale = c / dot.numel()
        return lse.mean() - c * dot.mean()

    @staticmethod
    def backward(ctx, grad_loss):
        diff, grad_k = ctx.saved_tensors
        # an fp32 0-dim tensor (no .item(): no wait for the GPU, nothing torch.compile cannot trace); a CUDA kernel
        # rounds it to the gradients' dtype: bf16 keeps it to 2^-8, fp16 holds neither c / R nor a GradScaler's scale
        scale = grad_loss * ctx.scale
        if diff.dtype == torch.float16:
            return None, None, (diff.float() * scale).half(), (grad_k.float() * scale).half(), None
        return None, None, diff * scale, grad_k * scale, None


# CUDA's entry points that return the lse, fastest first (an H200, q (104, 16, 197, 64) in bf16, forward and backward:
# cuDNN 0.43 ms, flash 0.67, efficient 1.06; results/benchmark-h200/cudnn-lse.txt); cuDNN's and flash's take fp16 and
# bf16 only (their entry points are asked in half precision alone), and cuDNN's backward is handed one gradient
# layout (vit.ContiguousGrad)
CUDA_LSE = {
    'cudnn': lambda q, k, v: torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True),
    'flash': lambda q, k, v: torch.ops.aten._scaled_dot_product_flash_attention(q, k, v),
    'efficient': lambda q, k, v: torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, None, True),
}

# {(dtype, shape, strides) of q, k, v: the CUDA_LSE entry point that took them}
LSE_RAN = {}


def attention_with_lse(q, k, v, implementation='sdpa'):
    """(softmax(q k^T / sqrt(d)) v, lse) with lse_i = log sum_j exp(q_i . k_j / sqrt(d)), (B, H, N) in fp32: the
    normaliser every fused attention kernel keeps for its own backward. F.scaled_dot_product_attention does not return
    it, so it is asked of torch's kernels through their (private) aten entry points: on a CPU its flash kernel, on CUDA
    cuda_lse's; elsewhere (or eager) written out. The output is differentiable, its backward handed a contiguous
    incoming gradient (vit.ContiguousGrad: why). A torch whose entry points are missing or refuse the shapes fails
    the start-up check (util/attention_check.py), not a step."""
    if implementation == 'eager' or q.device.type not in ('cpu', 'cuda'):
        return attend(q, k, v, implementation), torch.logsumexp(scores(q, k).float(), -1)
    if q.device.type == 'cpu':
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False)[:2]
    else:
        out, lse = cuda_lse(q, k, v)[1][:2]
    # cuDNN's lse is (B, H, N, 1); the efficient kernel pads N to 32s
    return ContiguousGrad.apply(out), lse.flatten(2)[..., :q.shape[-2]]


def cuda_lse(q, k, v):
    """(name, output) of the CUDA_LSE entry point for q, k, v: in half precision the first that takes them, in fp32
    the efficient kernel's (cuDNN's and flash's are half-precision kernels: torch 2.11's cuDNN entry point took fp32
    and gave NaN). The one that took inputs of these dtypes, shapes and strides before is asked alone: those it
    passed over are not tried again on every call."""
    key = tuple((t.dtype, t.shape, t.stride()) for t in (q, k, v))
    kernels = CUDA_LSE if q.dtype in (torch.float16, torch.bfloat16) else {'efficient': CUDA_LSE['efficient']}
    if key in LSE_RAN:
        kernels = {LSE_RAN[key]: CUDA_LSE[LSE_RAN[key]]}
    LSE_RAN[key], ran = first_that_runs(kernels, q, k, v)
    return LSE_RAN[key], ran


def first_that_runs(kernels, *args):
    """(name, output) of the first of kernels ({name: function}) that takes args;
    the last one's error if none does."""
    *tried, last = kernels
    for name in tried:
        try:
            return name, kernels[name](*args)
        # refused (dtype, head width, GPU), or not in this torch
        except (RuntimeError, AttributeError):
            pass
    return last, kernels[last](*args)


# -----------------------------------------------------------------------------
# The same computation as the compiler traces it (--compile)


def traced_cross_entropy(q_t, k_t, q, k, implementation='sdpa'):
    """map_free_cross_entropy as its formula, mean_i lse_i - c q_i . (P K)_i, left to autograd: the term q_i . (P K)_i
    through one fused call with the student's keys as values, lse_i through log_sum_exp, whose own formula gives the
    rest of the gradient (c S K and c S^T Q, one fused call forward and backward). Its gradients are
    MapFreeCrossEntropy's; the compiler makes its forward and backward one graph each, where MapFreeCrossEntropy's
    forward, which takes gradients inside it, would stop the graph. implementation: its attention calls'."""
    c = q.shape[-1] ** -0.5
    if implementation == 'sdpa':
        lse = log_sum_exp(q, k)                                             # (B, H, N) fp32
    else:
        lse = torch.logsumexp(scores(q, k).float(), -1)
    target = attend(q_t.to(q.dtype), k_t.to(q.dtype), k, implementation)   # P K (B, H, N, d)
    dot = (q * target).sum(-1, dtype=torch.promote_types(q.dtype, torch.float32))   # q_i . (P K)_i
    return lse.mean() - c * dot.mean()


@torch.library.custom_op('attention_transfer::log_sum_exp', mutates_args=())
def log_sum_exp(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """lse_i = log sum_j exp(c q_i . k_j), (B, H, N), from the fused kernels' private entry points
    (attention_with_lse): a torch custom op, which the compiler keeps whole (its fake implementation gives the shape)
    and differentiates by its formula (_log_sum_exp_backward)."""
    lse = attention_with_lse(q, k, k)[1]
    return lse.to(torch.promote_types(q.dtype, torch.float32)).contiguous()


@log_sum_exp.register_fake
def _(q, k):
    return q.new_empty(q.shape[:-1], dtype=torch.promote_types(q.dtype, torch.float32))


def _log_sum_exp_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _log_sum_exp_backward(ctx, grad):
    """d lse_i / d q_i = c (S K)_i and d lse_i / d k_j = c S_ij q_i, so for incoming g (B, H, N): c g_i (S K)_i and
    c (S^T (g Q))_j. S K is attention with the keys as values, and S^T (g Q) what its backward gives those values for
    the incoming gradient g Q: one fused call, forward and backward, never a map."""
    q, k = ctx.saved_tensors
    c = q.shape[-1] ** -0.5
    with torch.enable_grad():
        keys = k.detach().requires_grad_()
        sk = attend(q.detach(), k.detach(), keys, 'sdpa')                   # S K (B, H, N, d)
        stq, = torch.autograd.grad(sk, keys, (grad[..., None] * q).to(sk.dtype))   # S^T (g Q)
    return (c * grad[..., None] * sk).to(q.dtype), (c * stq).to(k.dtype)


log_sum_exp.register_autograd(_log_sum_exp_backward, setup_context=_log_sum_exp_context)

# -----------------------------------------------------------------------------
# Config and presets, and the script


@dataclass
class DistillConfig(TransferConfig):
    weight: float = option(3.0, 'w: weight of the attention loss', at_least(0))
    maps: str = option('teacher', "the target maps: teacher | controls with no teacher in them (control_logits): "
                                  "uniform (every token attended to alike) | local (each patch attends to its "
                                  "neighbours)", choices=('teacher', 'uniform', 'local'))
    out_dir: str = 'runs/distill'

    SCRIPT = 'attention_distill.py'

    def checks(self):
        control = self.maps != 'teacher'
        return super().checks() + [
            ('maps', not control or self.transfer == 'attn', 'only with --transfer attn'),
            ('maps', not control or self.average_maps == 'none', 'only with --average-maps none')]

    @property
    def written_out(self):
        """Why the run's maps must be written out (an eager run), or '': an average, or a control's map."""
        if self.maps != 'teacher':
            return f'--maps {self.maps}: writes the maps out'
        return super().written_out


PRESETS = {**student_presets(SMALL_PRESETS),
           # all but the last of the 6 layers, as the paper leaves ViT-L's last 6 of 24: chosen on held-out training
           # images, where distilling all 6 closed less of the gap (results/fashion-mnist/VALIDATION.md#layers)
           'fashion-mnist': {**student_presets(SMALL_PRESETS)['fashion-mnist'], 'layers': '0-4'},
           # the release's distillation command (global batch 2048 = 64 GPUs x 32), with the layers its README asks
           # for and the paper used: 0-17; the release's runs distilled 0-20: --layers 0-20 (RECIPES.md)
           'imagenet': dict(teacher='mae_vit_large', img_size=224, layers='0-17', global_pool=True,
                            epochs=200, warmup_epochs=20, batch_size=32, blr=1e-4, layer_decay=1.0,
                            layer_decay_offset=0, beta2=0.95, weight_decay=0.3, drop_path=0.2,
                            ema=0.9999, randaug='rand-m9-mstd0.5-inc1', reprob=0.25, mixup=0.8,
                            cutmix=1.0, smoothing=0.1, num_workers=10, log_every=100)}


def main():
    # every refusal first: flags, teacher's file, run directory
    plan = resolve(DistillConfig, PRESETS)
    cfg = plan.cfg
    transfer = plan.method   # the teacher's shape, layers, heads, the student's
    with plan.run_dir:
        data, train_loader, eval_loader = build_data(plan)
        plan.log(f'attention distillation: {cfg.transfer} of layers '
                 f'{sorted(transfer.layers.values())} (heads {transfer.heads or "all"}) '
                 f'from {cfg.teacher}, weight {cfg.weight}')
        # the frozen teacher, the student, both settled on an implementation and checked
        attn, teacher, student, checked = build_pair(plan, data.num_classes, eval_loader,
                                                     check_fused)

        run = Run(plan, student, train_loader, data,
                  {'distilled_from': teacher_record(cfg, transfer), 'attention_check': checked})
        control = None
        if cfg.maps != 'teacher':   # a control: the teacher only gave the student its shape
            control = control_logits(cfg.maps, student.patch_embed.grid, 1 + student.arch['reg_tokens'])
            control = control.to(plan.device).expand(student.num_heads, -1, -1)   # (H, N, N)
            plan.log(f'control: toward {cfg.maps} maps, not the teacher\'s')
        loss_fn = distill_loss_fn(cfg, teacher, transfer.layers, transfer.heads, attn, control)
        mixer = batch_mixer(cfg, data.num_classes)

        while run.step < run.total_steps:
            # to the end of the epoch (or --max-steps)
            if train_one_epoch(run, train_loader, loss_fn, mixer):
                # the student alone, a plain ViT
                run.evaluate(lambda m: evaluate(m, eval_loader, plan))
                run.save()
        m = run.metrics
        line = f"final | distilled student (no teacher) top-1 {m['top1']:.2f} top-5 {m['top5']:.2f}"
        if 'ema_top1' in m:
            line += f" | EMA top-1 {m['ema_top1']:.2f}"
        plan.log(f'{line} | {cfg.out_dir}')


def check_fused(plan, teacher, student, x):
    """(implementation, record): the start-up check (util/attention_check.py) of the student's first distilled layer
    and, for --transfer attn, of its loss on the teacher's q and k (map-free); then teacher and student on the
    implementation that holds. The teacher is on eager until then."""
    # the first distilled layer: the student's, the teacher's
    s, t = next(iter(plan.method.layers.items()))
    heads = plan.method.heads
    with torch.no_grad(), autocast(plan):
        given = teacher_outputs(teacher, x, {s: t}, ('q', 'k'))[s]            # (B, H, N, d) each

    # the definition in fp32, else the map-free loss on these kernels
    def loss(q, k, v, implementation, dtype):
        q_t = given['q'].to(dtype)
        k_t = given['k'].to(dtype)
        if implementation == 'eager' and dtype == torch.float32:
            return layer_loss({'logits': scores(q, k)}, {'logits': scores(q_t, k_t)}, 'attn', heads)
        return map_free_cross_entropy(pick(q_t, heads), pick(k_t, heads), pick(q, heads),
                                      pick(k, heads), implementation)

    # the most the loss (log N) and an attention product of these q and k (its gradients) make
    def units(q, k, v):
        c = q.shape[-1] ** -0.5
        rows = q.numel() // q.shape[-1]
        return {'loss': math.log(q.shape[-2]), 'q grad': c * k.abs().max().item() / rows,
                'k grad': c * q.abs().max().item() / rows}
    losses = {'map-free loss': (loss, units)} if plan.cfg.transfer == 'attn' else {}
    layers = {f'layer {s}': student.blocks[s].attn}
    theirs, ours = teacher.blocks[0].attn, student.blocks[s].attn
    if (theirs.num_heads, theirs.proj.in_features) != (ours.num_heads, ours.proj.in_features):
        layers['teacher layer 0'] = theirs   # its own fused calls (before the layers it hands over)

    def forward():
        student.forward_tokens(x, depth=s + 1)
        with autocast(plan):
            teacher.forward_tokens(x, depth=1)
    return settle_attention(plan, 'distillation', [teacher, student], forward, layers,
                            losses=losses)


if __name__ == '__main__':
    run_main(main)
