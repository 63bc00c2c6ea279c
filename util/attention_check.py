"""
The fused attention's start-up check. Before a run trains or evaluates on sdpa, each kind of fused attention call it
makes is run once on a batch of the run's images (its batch size: a kernel's grid grows with it), shapes, strides,
device and autocast, fused and written out, forward and (for a run that trains) backward: the output of the first
(transferred) layer and the gradients of its q, k and v, with the incoming gradient in the layout the model hands it,
and where a method adds a fused call of its own (distillation's map-free loss), that call's. A kernel that raises or
computes something else stops --attn-implementation sdpa in one line and sends auto to eager, before anything has run
on sdpa (every model is on eager until the verdict).

    attn, record = start_up_check(plan, 'fine-tuning', [model], lambda: model.forward_tokens(x, depth=1),
                                  {'layer 0': model.blocks[0].attn})

A training script calls it through settle_attention, which returns the verdict the run then holds (its processes on
one kernel).
"""
import contextlib
import copy
import math
import time
from functools import partial

import torch
import torch.distributed as dist

from util.errors import ConfigError
from vit import scores, set_attn_implementation

# sdpa passes where each tensor's error against the definition, eager in fp32 (in units of its largest entry there, or
# of its natural scale), is at most FACTOR times eager's own error in the run's dtype on the same inputs, and at least
# SDPA_FLOOR (fp32: eager's is 0; a broken kernel is off by a few percent or more)
FACTOR = 2
SDPA_FLOOR = 1e-3
# the checked layers' queries are scaled up until their logits have at least this standard deviation: a near-uniform
# map (a student at initialisation) would hide a softmax computed wrong; more peaked, eager's own rounding in bf16
# (its logits' at this size) would hide an error of 5%
PEAK = 2.0


def start_up_check(plan, what, models, forward, layers, backward=True, losses=None, compiled=False):
    """(implementation, record): the check of the attention layers `layers` ({name: vit.Attention}) as forward() runs
    them, and of the method's own fused calls, losses ({name: (loss, units)}: loss_part's) of the first layer's q, k,
    v; models (a teacher among them) are on eager until the verdict, then on it. backward: the run trains (gradients
    checked too); compiled: it compiles its training step (--compile: the teacher's forward, the student's and the
    loss), whose layers and loss are checked compiled. plan: the run's (device, dtype, attn, cfg.attn_implementation,
    log). The models are as built, on eager (vit.Attention): nothing runs on sdpa before the verdict, which its
    caller tells them (settle_attention, util/launch.on_device)."""
    training = [m.training for m in models]
    for m in models:
        m.eval()   # no drop-path draws from the run's RNG
    implementation, record = plan.attn, None
    if plan.attn == 'sdpa':
        # the layers' inputs in fp32: under fp16 an eager map can overflow where sdpa's fp32 sums do not
        handed = layer_inputs(forward, layers)
        parts = {name: layer_part(attn, *handed[name], backward, compiled)
                 for name, attn in layers.items()}
        first = next(iter(layers))
        for name, loss in (losses or {}).items():
            parts[name] = loss_part(layers[first], handed[first][0], *loss, compiled)
        implementation, record = check_sdpa(plan, what, parts)
    for m, was in zip(models, training):
        m.train(was)
    return implementation, record


def settle_attention(plan, what, models, *check, **kw):
    """(implementation, record): resolve's attention implementation (plan.attn) settled by the start-up check of the
    built models (start_up_check(plan, what, models, *check, **kw), the trained one's layers compiled where --compile is
    on): the run's verdict from then on, decided here once and told to the models here, once. Under DDP rank 0 checks
    and its verdict, a refusal included, is every rank's at once (ranks on one kernel; none left waiting for a peer that
    stopped). record: rank 0's."""
    verdict = [plan.attn, None, None]                   # implementation, record, refusal
    if plan.main:
        try:
            verdict[:2] = start_up_check(plan, what, models, *check, compiled=plan.compiled, **kw)
        except ConfigError as e:
            verdict[2] = str(e)
    if plan.world > 1:
        dist.broadcast_object_list(verdict, src=0)
    attn, record, refusal = verdict
    if refusal:
        raise ConfigError(refusal)
    for m in models:
        set_attn_implementation(m, attn)
    return attn, record


def layer_inputs(forward, layers):
    """{name: (x, given)}: what each attention layer of `layers` is handed when forward() runs (no gradient): its input
    tokens (B, N, D), in fp32, and the tensors given in place of its own (a copy's q, k)."""
    handed = {}

    def keep(name, layer, args, kwargs):   # the first call's
        handed.setdefault(name, (args[0].float(), {n: t for n, t in kwargs.items() if n != 'keep'}))
    hooks = [layer.register_forward_pre_hook(partial(keep, name), with_kwargs=True)
             for name, layer in layers.items()]
    try:
        with torch.no_grad():
            forward()
    finally:
        for hook in hooks:
            hook.remove()
    return handed


@contextlib.contextmanager
def projected_as(projection, out):
    """Inside, an attention layer's projection (qkv, or v alone in a layer without q / k) hands back `out` instead of
    its result: the layer's project() splits it into q, k, v, strided as it splits its own."""
    hook = projection.register_forward_hook(lambda module, args, result: out)
    try:
        yield
    finally:
        hook.remove()


def layer_part(attn, x, given, backward, compiled):
    """(compute, inputs, units) for check_sdpa: compute(implementation, dtype) -> {'output': (B, N, D), and with
    backward the gradients of its projection's q, k, v thirds} of one attention layer run as the model runs it, on
    input tokens x and the tensors it is given: q, k, v split from its projection's output, its attention, its output
    projection, and an incoming gradient handed back through them. Its queries are scaled to PEAK. inputs: the fused
    call's q, k, v; units: none of its own (each tensor against its largest entry). compiled: sdpa's layer runs
    compiled, as torch.compile (its backend) runs it in the model: the compiler hands its kernels their layouts."""
    # a copy in fp32 (a teacher's weights are stored in the run's dtype: autocast rounds them back to the same numbers)
    attn = copy.deepcopy(attn).float()
    names = 'v' if attn.no_qk else 'qkv'   # its projection (v alone in a layer without q / k), what it makes
    projection = getattr(attn, names)
    with torch.no_grad():
        # (B, N, 3D), or (B, N, D) in a layer without q / k: split into heads
        made = projection(x)
        with projected_as(projection, made):
            own = attn.project(x)                                           # views of made
        q, k, v = handed_qkv(own, given)
        scale = max(1.0, PEAK / scores(q[:1].float(), k[:1].float()).std().item())
        if own[0] is not None:
            own[0].mul_(scale)                                          # made's q third, in place
        if 'q' in given:   # given: layer_inputs' own dict, for this layer alone
            given['q'] = given['q'] * scale
    incoming = torch.randn(x.shape, device=x.device,
                           generator=torch.Generator(x.device).manual_seed(0))

    def compute(implementation, dtype):
        leaf = made.to(dtype).requires_grad_(backward)
        handed = {n: t.to(dtype) if torch.is_tensor(t) else t for n, t in given.items()}
        attn.implementation = implementation
        layer = attn
        if compiled and implementation == 'sdpa':
            # static shapes, as the model's first compilation
            layer = torch.compile(attn, dynamic=False)
        with projected_as(projection, leaf), torch.set_grad_enabled(backward), \
                torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = layer(x, **handed)[0]                                     # (B, N, D)
        if not backward:
            return {'output': out}
        grad, = torch.autograd.grad(out, leaf, incoming.to(out.dtype))   # (B, N, 3D): dq, dk, dv
        return {'output': out,
                **{f'{n} grad': g for n, g in zip(names, grad.chunk(len(names), -1))}}
    return compute, handed_qkv(own, given), {}


def loss_part(attn, x, loss, units, compiled=False):
    """(compute, inputs, units) for check_sdpa: compute(implementation, dtype) -> {'loss', and the gradients of its
    projection's q, k, v thirds} of loss(q, k, v, implementation, dtype), with q, k, v as attention layer attn makes
    them of its input tokens x (fp32; strided views). loss: the definition for eager in fp32, else the method's
    computation on that implementation's kernels (on eager, the error the fused ones are held to). units(q, k, v) ->
    {tensor name: its natural scale}: a loss's gradient can be far smaller than the products it is the difference of.
    compiled: sdpa's loss runs compiled, as the compiled step runs it (what the compiler traces, not eager's)."""
    with torch.no_grad():
        made = attn.qkv(x)                                                  # (B, N, 3D)
        with projected_as(attn.qkv, made):
            scale = units(*attn.project(x))

    def compute(implementation, dtype):
        leaf = made.to(dtype).requires_grad_()
        with projected_as(attn.qkv, leaf):
            q, k, v = attn.project(x)
        run = loss
        if compiled and implementation == 'sdpa':
            run = torch.compile(loss, dynamic=False)   # static shapes, as the step's first compilation
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            value = run(q, k, v, implementation, dtype)
        grads = torch.autograd.grad(value, leaf)[0].chunk(3, -1)            # (B, N, D) each
        return {'loss': value, **{f'{n} grad': g for n, g in zip('qkv', grads)}}
    return compute, None, scale


def handed_qkv(own, given):
    """The q, k, v of the layer's fused call: a given one (for all heads, or where the layer has none)
    for its own."""
    whole = 'heads' not in given
    return [given[n] if n in given and (whole or t is None) else t for n, t in zip('qkv', own)]


def measure(plan, parts, dtype):
    """({'part tensor': (sdpa's error, eager's error, tolerance)}, why a kernel raised or ''): check_sdpa's
    measurements, each part computed on the definition, on eager as the run runs it, and on sdpa."""
    errors = {}
    why = ''
    # eager as the run runs it differs from the definition in the run's dtype, or in fp32 on CUDA (TF32: processes())
    again = dtype != torch.float32 or plan.device.type == 'cuda'
    # the definition without TF32 (10 mantissa bits, which processes() turns on for a run on CUDA): a TF32 definition
    # is itself up to 1e-3 off (cuDNN's TF32 flag is for convolutions: a checked computation has none)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    for part, (compute, _, units) in parts.items():
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            definition = compute('eager', torch.float32)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        eager = compute('eager', dtype) if again else definition
        if not all(t.isfinite().all() for t in eager.values()):
            # fp16 maps can overflow where the fused kernels keep their sums in fp32: eager's error in bf16
            # (fp32's range, fewer bits than fp16) stands in for it
            eager = compute('eager', torch.bfloat16)
        try:
            fused = compute('sdpa', dtype)
        # any error a kernel raises (no kernel, none for this shape or these strides): a verdict, not a traceback
        except Exception as e:
            fused = {}
            why = f" ({' '.join(str(e).split())[:150]})"
        for name, d in definition.items():
            ours = error(fused[name], d, units.get(name)) if name in fused else math.inf
            eager_error = error(eager[name], d, units.get(name))
            errors[f'{part} {name}'] = (ours, eager_error, max(FACTOR * eager_error, SDPA_FLOOR))
    return errors, why


def check_sdpa(plan, what, parts):
    """(implementation, record): each part's compute (parts: {name: (compute, inputs, units)}, compute(implementation,
    dtype) -> {tensor name: tensor}) on sdpa in the run's dtype against the definition, eager in fp32, each tensor's
    error in its units (default: its largest entry in the definition, computed without TF32); its tolerance is FACTOR x
    eager's own error in the run's dtype (in fp32: with TF32 where the run has it), at least SDPA_FLOOR. A kernel that
    raises fails. Otherwise auto goes on with eager, and sdpa stops here in one line. inputs: the first part's fused
    call's (q, k, v), for the log: the kernel torch picks."""
    dtype = plan.dtype or torch.float32
    start = time.time()
    first = next(iter(parts.values()))[1]
    shape = tuple(first[0].shape)
    errors, why = measure(plan, parts, dtype)
    # the kernel the step runs: for a run that trains, on inputs that need a gradient (torch may pick another)
    training = any('grad' in n for n in errors)
    backend = sdpa_backend(*(t.detach().to(dtype).requires_grad_(training) for t in first))
    # each tensor's error in units of its tolerance (a nan, a kernel's: infinitely far): the farthest is named
    far = {n: math.inf if math.isnan(e / t) else e / t for n, (e, _, t) in errors.items()}
    worst = max(far, key=far.get)
    fused_error, eager_error, tolerance = errors[worst]
    holds = far[worst] <= 1
    record = {'what': what, 'error': fused_error, 'eager_error': eager_error,
              'tolerance': tolerance, 'worst': worst, 'errors': errors, 'dtype': str(dtype),
              'device': str(plan.device), 'backend': backend, 'shape': shape,
              'seconds': round(time.time() - start, 3),
              'implementation': 'sdpa' if holds else 'eager'}
    said = (f"{what} on sdpa ({backend} kernel, {plan.device}, {dtype}, q {shape}), forward"
            f"{' and backward' if training else ''}, "
            f"against the definition (eager, fp32): {len(errors)} tensors, the farthest {worst} at "
            f"{fused_error:.2g}{why} (eager in {dtype}: {eager_error:.2g}; tolerance "
            f"{tolerance:.2g}); checked in {record['seconds']:.2f} s")
    if not holds and plan.cfg.attn_implementation == 'sdpa':
        raise ConfigError(f'start-up check: {said}: sdpa does not compute the {what}; use '
                          f'--attn-implementation eager')
    plan.log(f'start-up check: {said}: '
             f"{'sdpa holds' if holds else 'falling back to eager (--attn-implementation auto)'}")
    return record['implementation'], record


def error(ours, definition, unit):
    """The largest |ours - definition| in units of `unit`, where it is None the definition's largest |entry| (where
    all are 0: not divided)."""
    diff = (ours.double() - definition.double()).abs().max().item()
    unit = unit or definition.double().abs().max().item()
    return diff / unit if unit > 0 else diff


def sdpa_backend(q, k, v):
    """The kernel F.scaled_dot_product_attention picks for these inputs (flash, efficient, cudnn, math), for the
    log: asked of torch's private dispatcher, 'unknown' where it has none."""
    try:
        name = torch.nn.attention.SDPBackend(torch._fused_sdp_choice(q, k, v)).name
        return name.lower().replace('_attention', '')
    except Exception:   # not in this torch, or no kernel for these inputs
        return 'unknown'
