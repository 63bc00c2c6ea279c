"""
What benchmark.py times: one step of each method on each path, built from shared models.

`eager` and `sdpa` are the scripts' two attention implementations (--attn-implementation, vit.attend), run as the
scripts run them: the autocast dtype --amp auto picks, the teacher's matmul weights stored in it, the teacher
stopped inside its last transferred layer. eager writes every (B, H, N, N) map out (distillation: the fused
cross-entropy of the two maps' logits); sdpa never stores one (copy: one fused call on the teacher's q and k;
distillation: MapFreeCrossEntropy on both models' q and k). `auto` is whichever of the two --attn-implementation
auto picks on the device (util/launch.AUTO_ATTN), and `compile` that one as `--compile true` trains it: the loss
function compiled whole (the teacher's forward, the student's and the loss one graph; on one GPU captured as CUDA
graphs), the optimizer's step eager as a run's. The naive path (below) is this repository's code run the way the
authors' release runs: fp32 (its autocast is commented out), every attention explicit, the teacher run through all
its blocks and its head with drop-path masks, every layer's maps kept for a loss that autograd differentiates, copy
students that compute their own q, k and softmax before the teacher's map replaces it, AdamW with torch's defaults
(a for-loop on CPUs, foreach kernels on GPUs). `naive-bf16` is that path under bf16 autocast.

And how much memory they need: one case's peak, built alone (CPU: the RSS of a fresh process; CUDA:
max_memory_allocated), and on a GPU the largest batch at which all of a model's cases fit in a share of its memory.
"""
import gc
import multiprocessing
import weakref
from argparse import Namespace
from concurrent.futures import ProcessPoolExecutor
from functools import cached_property, partial

import torch
from einops import rearrange

from attention_copy import CopyConfig, CopyModel, copy_loss
from attention_distill import DistillConfig, attention_cross_entropy, cuda_lse, distill_loss_fn
from finetune import classification_loss
from teacher import build_teacher
from util.config import TrainConfig
from util.attention_check import sdpa_backend
from util.engine import autocast, build_optimizer, soft_cross_entropy, step_mode
from util.launch import amp_dtype, attn_implementation
from vit import VisionTransformer, model_arch, set_attn_implementation

TRAINED = ('train', 'copy', 'distill')   # train: scratch or fine-tuning
# evaluation: the distilled student alone, the copy student with its teacher
METHODS = (*TRAINED, 'eval-distill', 'eval-copy')
PATHS = {'eager': 'explicit (B, H, N, N) maps (--attn-implementation eager)',
         'sdpa': 'fused attention, no (N, N) map stored (--attn-implementation sdpa)',
         'naive': "the authors' release: fp32, explicit attention, full-depth teacher with "
                  "drop-path, all maps kept, autograd loss, q/k computed in copy students, "
                  "AdamW with torch's defaults",
         'naive-bf16': 'naive under bf16 autocast',
         'compile': "--attn-implementation auto's pick, the step compiled as --compile true compiles it"}


def cases(cfg):
    """[(method, path)] in the order they are timed: --methods on --paths (evaluation: no naive-bf16), then
    --compile's."""
    timed = [(m, p) for m in METHODS for p in PATHS if m in cfg.methods and p in cfg.paths
             and (m in TRAINED or p != 'naive-bf16')]
    return timed + [(m, 'compile') for m in TRAINED if m in cfg.methods and cfg.compile]


def autocast_dtype(path, auto):
    """A path's autocast dtype (None: fp32): off on naive, bf16 on naive-bf16, else `auto`
    (--amp auto's)."""
    if path == 'naive':
        return None
    if path == 'naive-bf16':
        return torch.bfloat16
    return auto

# -----------------------------------------------------------------------------
# The naive path: this repository's models run the way the authors' release runs them (the reference the scripts'
# paths are timed against, and the tests' oracle of the fast paths: tests/test_fast_paths.py): fp32, every
# attention explicit (eager), the teacher run through all its blocks and its head in train mode with drop-path
# masks, every layer's maps kept for a loss autograd differentiates, and copy students that compute their own q, k
# and softmax before the teacher's map replaces it.

# the recipes' stochastic depth (fine-tuning, copy, distillation) and label smoothing
DROP_PATH = {'train': 0.1, 'copy': 0.0, 'distill': 0.2}
SMOOTHING = 0.1


def eager_maps(model, x, layers):
    """(model(x), {layer: its attention logits}): model run eager,
    the map of each of `layers` written out and kept."""
    out, kept = set_attn_implementation(model, 'eager')(x, keep={i: ('logits',) for i in layers})
    return out, {i: kept[i]['logits'] for i in layers}


def teacher_maps(teacher, x, layers, drop_path):
    """All blocks and the head in train mode with drop-path masks, every requested map kept."""
    with torch.no_grad():
        return eager_maps(set_drop_path(teacher.train(), drop_path), x, layers)[1]


def naive_distill_loss(teacher, layers, weight=3.0, drop_path=DROP_PATH['distill']):
    """All the teacher's maps, then all the student's (kept),
    compared by autograd's cross-entropy."""
    def loss_fn(net, x, y):
        target = teacher_maps(teacher, x, layers, drop_path)
        logits, maps = eager_maps(net, x, layers)
        attn = sum(attention_cross_entropy(target[i], maps[i]) for i in layers)
        ce_cls = soft_cross_entropy(logits, y, SMOOTHING)
        return ce_cls + weight * attn, {'ce': ce_cls.detach(), 'attn': attn.detach()}
    return loss_fn


def naive_copy_forward(teacher, student, x, layers):
    """Listing every head makes the student compute its own q, k and softmax,
    then overwrite them."""
    heads = list(range(student.num_heads))
    maps = teacher_maps(teacher, x, layers, DROP_PATH['copy'])
    return set_attn_implementation(student, 'eager')(
        x, inject={i: {'attn': m.softmax(-1), 'heads': heads} for i, m in maps.items()})


def naive_copy_loss(teacher, layers):
    def loss_fn(net, x, y):
        loss = soft_cross_entropy(naive_copy_forward(teacher, net, x, layers), y, SMOOTHING)
        return loss, {'ce': loss.detach()}
    return loss_fn


def set_drop_path(model, rate):
    for i, block in enumerate(model.blocks):   # linear in depth, as VisionTransformer sets it
        block.drop_path = rate * i / max(model.depth - 1, 1)
    return model

# -----------------------------------------------------------------------------
# One model size: its models and optimisers, built once and shared by its cases


class Parts:
    """The cases' models, optimisers and batches, each built when a case first needs it."""

    def __init__(self, cfg, size, device):
        self.cfg = cfg
        self.device = device
        self.dtype = amp_dtype('auto', device)
        # the implementation auto picks on this device
        self.auto = attn_implementation('auto', device)[0]
        sizes = 'img_size patch_size num_classes depth embed_dim num_heads'.split()
        # 0: the size's own
        self.arch = model_arch(size, global_pool=True,
                               **{k: getattr(cfg, k) or None for k in sizes})
        self.copied = self.first_layers(cfg.copy_frac)
        self.distilled = self.first_layers(cfg.distill_frac)
        self.batches = {}
        self.optimizers = {}

    def first_layers(self, frac):
        """The first frac of the layers, at least one."""
        return list(range(max(1, round(frac * self.arch['depth']))))

    def model(self, **kw):
        torch.manual_seed(0)
        with self.device:     # initialised where it runs (a ViT-L takes seconds on a CPU)
            return VisionTransformer(**{**self.arch, **kw})

    @cached_property
    def teacher(self):            # fp32, as the naive path has it
        return build_teacher(self.model(num_classes=0), self.device)

    @cached_property
    # as the scripts build it: matmul weights stored in the autocast dtype
    def fast_teacher(self):
        return build_teacher(self.model(num_classes=0), self.device, self.dtype)

    @cached_property
    def student(self):
        return self.model()

    @cached_property
    def copy_student(self):       # as attention_copy.py builds it: no q/k in copied layers
        return self.model(no_qk_layers=self.copied)

    def inputs(self, batch):
        """Images (B, 3, H, W) and labels (B,), one pair per batch size, shared by the cases."""
        if batch not in self.batches:
            with self.device:
                self.batches[batch] = (torch.randn(batch, 3, self.cfg.img_size, self.cfg.img_size),
                                       torch.randint(0, self.cfg.num_classes, (batch,)))
        return self.batches[batch]

    @torch.no_grad()
    def kernels(self, batch):
        """The kernels the sdpa path's fused calls get for the student's strided q, k, v at this batch: the one
        F.scaled_dot_product_attention picks, and the log-sum-exp entry point of the map-free loss's S K (on CUDA the
        entry point attention_distill.cuda_lse takes)."""
        tokens = (self.arch['img_size'] // self.arch['patch_size']) ** 2 + 1
        with self.device:
            qkv = torch.randn(batch, tokens, 3 * self.arch['embed_dim'],
                              dtype=self.dtype or torch.float32)
        q, k, v = rearrange(qkv, 'b n (three h d) -> three b h n d', three=3,
                            h=self.arch['num_heads'])
        lse = cuda_lse(q, k, v)[0] if q.is_cuda else "the CPU's flash"
        return {'sdpa': sdpa_backend(q, k, v), 'lse': lse}

    def forward(self, method, path, batch):
        """(() -> output, student): one forward pass of `method` on `path` on its own fixed batch,
        the shared models first set to the path's attention implementation and to the method's
        mode: a training step's loss (train mode, the method's drop-path), or an evaluation's
        logits (eval mode, no autograd)."""
        naive = path.startswith('naive')
        training = method in TRAINED
        copy = method.endswith('copy')
        student = self.copy_student if copy and not naive else self.student
        teacher = self.teacher if naive else self.fast_teacher
        env = Namespace(device=self.device, dtype=autocast_dtype(path, self.dtype))
        if naive:
            impl = 'eager'
        elif path == 'compile':
            impl = self.auto
        else:
            impl = path
        layers = self.copied if copy else self.distilled
        x, y = self.inputs(batch)
        if method == 'eval-distill':
            output = partial(student, x)
        elif method == 'eval-copy' and naive:
            output = partial(naive_copy_forward, teacher, student, x, layers)
        elif method == 'eval-copy':
            output = partial(CopyModel(teacher, student, layers, implementation=impl), x)
        else:
            if method == 'train':
                loss_fn = classification_loss(Namespace(smoothing=SMOOTHING))
            elif naive and copy:
                loss_fn = naive_copy_loss(teacher, layers)
            elif naive:
                loss_fn = naive_distill_loss(teacher, layers)
            elif copy:
                loss_fn = copy_loss(CopyConfig(smoothing=SMOOTHING), teacher, layers, None, impl)
            else:
                loss_fn = distill_loss_fn(DistillConfig(smoothing=SMOOTHING), teacher, layers, None,
                                          impl)
            if path == 'compile':   # as --compile true trains: the loss function whole, the teacher's forward in it
                loss_fn = torch.compile(loss_fn, mode=step_mode(self.device))
            output = lambda: loss_fn(student, x, y)[0]   # noqa: E731
        if training:
            grad_mode = torch.enable_grad
        elif naive:
            grad_mode = torch.no_grad
        else:
            grad_mode = torch.inference_mode

        def run():
            set_attn_implementation(teacher, impl)
            set_attn_implementation(student, impl).train(training)
            if training:
                set_drop_path(student, DROP_PATH[method])
            with grad_mode(), autocast(env):
                return output()
        return run, student

    def step(self, method, path, batch):
        """A callable that runs one step of `method` on `path` (evaluation: one forward pass)."""
        forward, student = self.forward(method, path, batch)
        if method not in TRAINED:
            return forward
        # the scripts' AdamW (layer decay 0.75; TrainConfig's weight decay 0.05 and beta2 0.999), built once a
        # student (a compiled run's too); naive: the same parameter groups in torch's AdamW with its defaults
        key = student, path.startswith('naive')
        if key not in self.optimizers:
            opt = build_optimizer(TrainConfig(layer_decay=0.75), student, lr=1e-4)
            self.optimizers[key] = torch.optim.AdamW(opt.param_groups) if key[1] else opt
        opt = self.optimizers[key]

        def run():
            forward().backward()
            opt.step()
            opt.zero_grad()
        return run

    def saved_for_backward(self, method, path, batch):
        """(bytes, shapes) autograd keeps for the backward pass of one training step: its forward pass under
        saved_tensors_hooks, each storage counted once (q, k and v are views of one qkv output, and a saved view
        keeps all of it), the student's parameters left out (they exist without the step; their autocast copies
        count), and what a step's forward saves only for a backward it runs itself (the map-free loss's fused calls)
        left out too: held once the forward is done. Device-independent: the tensors, not an allocator's view."""
        forward, student = self.forward(method, path, batch)
        params = {p.untyped_storage().data_ptr() for p in student.parameters()}
        packed = []

        def pack(t):
            # detached, as returning an output itself would tie it to its own grad_fn: a cycle that outlives the
            # loss (on a GPU, every case's activations stayed allocated); weakly referenced: gone, not held
            held = t.detach()
            storage = t.untyped_storage()
            packed.append((weakref.ref(held), storage.data_ptr(), storage.nbytes(), tuple(t.shape)))
            return held
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = forward()
        kept = [(ptr, nbytes, shape) for ref, ptr, nbytes, shape in packed if ref() is not None]
        del loss   # the loss and its graph go
        storages = {ptr: nbytes for ptr, nbytes, _ in kept if ptr not in params}   # each once
        return sum(storages.values()), [shape for *_, shape in kept]

# -----------------------------------------------------------------------------
# Memory: one case's peak, alone; the batch that fills a GPU


def proc_mb(field):
    """VmRSS (now) or VmHWM (peak) of this process;
    getrusage's ru_maxrss would count the parent's."""
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 2 ** 10


def peak_memory(cfg, size, method, path, batch, device):
    """{peak_mb, step_mb} of one case built alone and run for two steps: its peak, and what
    the steps add to what its models and optimiser hold before them. On a CPU the RSS of a
    fresh process; on CUDA max_memory_allocated, counted from before its models exist."""
    if device.type == 'cpu':
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn')) as pool:
            peak, before = pool.submit(rss_peak, cfg, size, method, path, batch).result()
    else:
        torch.cuda.empty_cache()
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run = Parts(cfg, size, device).step(method, path, batch)
        before = (torch.cuda.memory_allocated(device) - start) / 2 ** 20
        run()
        run()
        peak = (torch.cuda.max_memory_allocated(device) - start) / 2 ** 20
        del run
        gc.collect()         # the case's models and optimiser go before the next case is built
        torch.cuda.empty_cache()
    return {'peak_mb': peak, 'step_mb': peak - before}


def rss_peak(cfg, size, method, path, batch):
    """peak_memory() on a CPU, in its fresh process: (peak RSS, RSS before the first step), MB."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = Parts(cfg, size, torch.device('cpu')).step(method, path, batch)
    before = proc_mb('VmRSS')
    run()
    run()
    return proc_mb('VmHWM'), before


MAX_BATCH = 1024      # a small model would otherwise fill 80 GB with a batch timed for minutes


def largest_batch(peak_at, budget, step=8):
    """The largest multiple of `step` (up to MAX_BATCH) whose measured peak stays within `budget` (`step` itself
    when even it does not fit), by bisection between the largest batch that fitted and the smallest that did not:
    8 measurements. peak_at(batch) -> bytes at that batch (inf: out of memory)."""
    fits = step                  # the largest batch that fitted
    over = MAX_BATCH + step      # the smallest that did not
    if peak_at(step) > budget:
        return step
    while over - fits > step:
        batch = (fits + over) // 2 // step * step
        if peak_at(batch) <= budget:
            fits = batch
        else:
            over = batch
    return fits


def fill_batch(parts, todo, fill, device):
    """largest_batch() of the GPU's memory, `fill` of it, over the fullest case's max_memory_allocated with all of
    the model's cases resident at that batch, as they are timed (after a first step has made its optimiser state)."""
    def peak_at(batch):
        runs = [parts.step(*c, batch) for c in todo]
        try:
            for run in runs:
                run()
            # the second steps' peak: the fullest case's
            torch.cuda.reset_peak_memory_stats(device)
            for run in runs:
                run()
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device)
        except torch.OutOfMemoryError:
            return float('inf')
        finally:
            del runs
            parts.batches.clear()
            gc.collect()
            torch.cuda.empty_cache()
    return largest_batch(peak_at, fill * torch.cuda.get_device_properties(device).total_memory)
