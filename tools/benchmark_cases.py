"""
What benchmark.py times: one step of each method on each path, built from shared models.

The default path is what the scripts run. The naive path (naive.py) is this repository's code run the
way the authors' release runs: fp32 (its autocast is commented out), every attention explicit (no fused
kernel), the teacher run through all its blocks and its head with drop-path masks, every layer's maps
kept for a loss that autograd differentiates, copy students that compute their own q, k and softmax
before the teacher's map replaces it, AdamW with torch's defaults (a for-loop on CPUs, foreach kernels
on GPUs). `naive-bf16` is that path under bf16 autocast. The paths in between leave out one
optimisation each, to show what it is worth.
"""
from functools import cached_property

import torch

from attention_copy import CopyConfig, CopyModel, copy_loss
from attention_distill import DistillConfig, FusedAttentionCrossEntropy, attention_cross_entropy, distill_loss_fn
from teacher import cast_matmul_weights
from tools.naive import (DROP_PATH, SMOOTHING, fast_teacher, maps_first_distill_loss, naive_copy_forward,
                         naive_copy_loss, naive_distill_loss, qk_copy_loss, sdpa_devices, set_drop_path)
from util.config import TrainConfig
from util.engine import build_optimizer, soft_cross_entropy
from util.launch import amp_dtype, autocast
from vit import SDPA_DEVICES, VisionTransformer, model_arch

METHODS = {   # paths between default and naive drop one optimisation each, to show what it is worth
    'train': ('default', 'naive', 'naive-bf16'),           # a plain ViT step: scratch or fine-tuning
    'copy': ('default', 'qk-computed', 'uncast-teacher', 'naive', 'naive-bf16'),
    'distill': ('default', 'all-maps-first', 'autograd-loss', 'uncast-teacher', 'naive', 'naive-bf16'),
    'eval-distill': ('default', 'naive'),                  # the distilled student alone
    'eval-copy': ('default', 'naive')}                     # the copy student with its teacher
PATHS = {'default': 'what the scripts run',
         'naive': "the authors' release: fp32, explicit attention, full-depth teacher with drop-path, all maps "
                  "kept, autograd loss, q/k computed in copy students, AdamW with torch's defaults",
         'naive-bf16': 'naive under bf16 autocast',
         'qk-computed': 'default, but the copy student computes q, k and its own softmax, then overwrites them',
         'uncast-teacher': "default, but the teacher's weights stay fp32 (autocast re-casts them every step)",
         'all-maps-first': "default, but all the teacher's maps first, then the student's (not layer by layer)",
         'autograd-loss': 'all-maps-first, and the attention loss differentiated by autograd (not fused)',
         'compile': 'default under torch.compile'}
TRAINED = ('train', 'copy', 'distill')


def cases(methods, compile=False):
    """[(method, path)] in the order they are timed."""
    out = [(m, p) for m, paths in METHODS.items() for p in paths if m in methods]
    return out + ([(m, 'compile') for m in TRAINED if m in methods] if compile else [])

# -----------------------------------------------------------------------------
# One model size: its models and optimisers, built once and shared by its cases


class Parts:
    def __init__(self, cfg, size, device):
        self.cfg, self.device, self.dtype = cfg, device, amp_dtype('auto', device)
        self.arch = model_arch(size, img_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=1000,
                               global_pool=True, depth=cfg.depth or None)
        self.depth = self.arch['depth']
        self.copied = list(range(self.depth))
        self.distilled = list(range(max(1, round(cfg.distill_frac * self.depth))))
        self.recipe = TrainConfig(blr=1e-4, weight_decay=0.05, layer_decay=0.75, beta2=0.999)
        self.batches = {}

    def model(self, **kw):
        torch.manual_seed(0)
        with self.device:     # initialised where it runs (a ViT-L takes seconds on a CPU)
            return VisionTransformer(**{**self.arch, **kw})

    def frozen(self, model):
        return model.requires_grad_(False).eval()

    @cached_property
    def teacher(self):            # fp32, explicit attention, as the naive path has it
        return self.frozen(self.model(num_classes=0))

    @cached_property
    def fast_teacher(self):       # as load_teacher gives it: matmul weights stored in the autocast dtype
        t = self.frozen(self.model(num_classes=0))
        return cast_matmul_weights(t, self.dtype) if self.dtype else t

    @cached_property
    def uncast_teacher(self):     # fp32 weights, eval mode
        return self.frozen(self.model(num_classes=0))

    @cached_property
    def student(self):
        return self.model()

    @cached_property
    def copy_student(self):       # as attention_copy.py builds it: no q/k in copied layers
        return self.model(no_qk_layers=self.copied)

    def optimizer(self, model, naive):
        opt = build_optimizer(self.recipe, model, lr=1e-4)
        if naive:   # the same groups, AdamW as torch makes it by default
            opt = torch.optim.AdamW(opt.param_groups)
        return opt

    @cached_property
    def opt_fused(self):
        return self.optimizer(self.student, False)

    @cached_property
    def opt_naive(self):
        return self.optimizer(self.student, True)

    @cached_property
    def opt_copy(self):
        return self.optimizer(self.copy_student, False)

    def inputs(self, batch):
        """Images (B, 3, H, W) and labels (B,), one pair per batch size, shared by the cases."""
        if batch not in self.batches:
            self.batches[batch] = (torch.randn(batch, 3, self.cfg.img_size, self.cfg.img_size, device=self.device),
                                   torch.randint(0, 1000, (batch,), device=self.device))
        return self.batches[batch]

    def step(self, method, path, batch=None):
        """() -> None running one step of `method` on `path`, with its own fixed batch (default cfg's)."""
        dtype = None if path == 'naive' else torch.bfloat16 if path == 'naive-bf16' else self.dtype
        env = type('Env', (), {'device': self.device, 'dtype': dtype})
        naive = path.startswith('naive')
        x, y = self.inputs(batch or self.cfg.batch_size)
        if method.startswith('eval'):
            student = self.student if naive or method == 'eval-distill' else self.copy_student
            teacher = self.teacher if naive else self.fast_teacher
            if method == 'eval-distill':
                forward = student
            elif naive:
                forward = lambda x: naive_copy_forward(teacher, student, x, self.copied)   # noqa: E731
            else:
                forward = CopyModel(teacher, student, self.copied)
            grad_mode = torch.no_grad if naive else torch.inference_mode

            def run():
                student.eval()
                with grad_mode(), autocast(env), sdpa_devices(() if naive else SDPA_DEVICES):
                    forward(x)
            return run
        student = self.copy_student if method == 'copy' and path != 'qk-computed' and not naive else self.student
        opt = self.opt_copy if student is self.copy_student else self.opt_naive if naive else self.opt_fused
        teacher = self.teacher if naive else self.uncast_teacher if path == 'uncast-teacher' else self.fast_teacher
        layers = self.copied if method == 'copy' else self.distilled
        if method == 'train':
            def loss_fn(net, x, y):
                return soft_cross_entropy(net(x), y, SMOOTHING), {}
        elif method == 'copy':
            loss_fn = naive_copy_loss(teacher, layers) if naive else \
                qk_copy_loss(fast_teacher(teacher, layers)) if path == 'qk-computed' else \
                copy_loss(CopyConfig(smoothing=SMOOTHING), teacher, layers, None)
        elif naive:
            loss_fn = naive_distill_loss(teacher, layers)
        elif path in ('all-maps-first', 'autograd-loss'):
            ce = FusedAttentionCrossEntropy.apply if path == 'all-maps-first' else attention_cross_entropy
            loss_fn = maps_first_distill_loss(fast_teacher(teacher, layers), ce)
        else:
            loss_fn = distill_loss_fn(DistillConfig(smoothing=SMOOTHING), teacher, layers, None)
        net = torch.compile(student) if path == 'compile' else student

        def run():
            set_drop_path(student.train(), DROP_PATH[method])
            with autocast(env), sdpa_devices(() if naive else SDPA_DEVICES):
                loss, _ = loss_fn(net, x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run
