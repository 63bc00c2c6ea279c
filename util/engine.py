"""
The step every script shares, its schedule and the evaluation: what runs between two optimizer steps.

Each script's main() holds its own epoch loop, as MAE's main_finetune.py does:

    run = Run(plan, model, train_loader, data)          # util/run.py: optimizer, EMA, resume
    while run.step < run.total_steps:
        if train_one_epoch(run, train_loader, loss_fn, mixer):   # here: to the epoch's end (or --max-steps)
            run.evaluate(lambda m: evaluate(m, eval_loader, plan))
            run.save()

loss_fn(net, images, targets) -> (loss, {name: detached scalar}) is the method's, in its script. The batches come
from util/datafiles.py's build_loader, able to start an epoch part-way (loader.sampler.start).
"""
import contextlib
import inspect
import math
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# The step


def train_one_epoch(run, loader, loss_fn, mixer=None):
    """Optimizer steps from run.step to the end of its epoch (or the run's last step); True once there, False if
    the loader ran out first. Every step: its batch, the lr of the step, then train_step (replayed as one CUDA graph
    where the plan says so: GraphedStep, below); a line of progress every --log-every steps, a checkpoint every
    --save-every."""
    cfg = run.cfg
    plan = run.plan
    epoch, skip = divmod(run.step, run.steps_per_epoch)
    if skip == 0:
        seed_all(cfg.seed, plan.rank, epoch)
    loader.sampler.set_epoch(epoch)
    loader.sampler.start = skip * cfg.accum_steps * cfg.batch_size    # a resume mid-epoch
    forward = run.forward(loss_fn)                                    # compiled where the step is
    step = graphed(run, forward) if plan.graphed else train_step      # one GPU, one micro-batch, no GradScaler
    for i, (x, y) in enumerate(loader):
        x = x.to(plan.device, non_blocking=True)                      # (B, 3, H, W)
        y = y.to(plan.device, non_blocking=True)                      # (B,)
        if mixer is not None:
            x, y = mixer(x, y)                                        # MixUp / CutMix: y (B, C)
        last_micro = (i + 1) % cfg.accum_steps == 0                   # gradients all-reduced then
        for g in run.opt.param_groups:                                # warm-up + cosine, per step
            g['lr'] = lr_at(cfg, run.lr, run.step / run.steps_per_epoch) * g['lr_scale']
        step(run, forward, x, y, last_micro)
        if not last_micro:
            continue
        run.step += 1
        run.steps_done += 1
        run.since_log += 1
        # a launch's 1st and 10th steps are logged too: a run is seen training, and at what speed,
        # within seconds
        logged = run.step % cfg.log_every == 0 or run.step == run.total_steps
        if logged or run.steps_done in (1, 10):
            log_progress(run)
        if run.step % run.steps_per_epoch == 0 or run.step == run.total_steps:
            return True
        if cfg.save_every and run.step % cfg.save_every == 0:
            run.save()
        asked = run.stop.agreed()                                     # SIGUSR1, SIGTERM: util/stop.py
        if asked:
            run.save_and_stop(asked)
    return False


def train_step(run, forward, x, y, last_micro=True):
    """One micro-batch (x, y) on the device: autocast, the method's loss (forward), backward (scaled under fp16), the
    losses summed into run.running; on a step's last micro-batch, clipping, AdamW at the lr its groups hold, the
    EMA."""
    cfg = run.cfg
    no_sync = run.ddp.no_sync() if run.ddp and not last_micro else contextlib.nullcontext()
    with no_sync, autocast(run.plan):
        loss, parts = forward(run.net, x, y)
        run.scaler.scale(loss / cfg.accum_steps).backward()
    for k, v in parts.items():                                        # on the device: no sync
        if k not in run.running:
            run.running[k] = torch.zeros((), device=v.device)
        run.running[k] += v.float() / cfg.accum_steps                 # in place: a CUDA graph adds to it too
    if not last_micro:
        return
    if cfg.clip_grad:
        run.scaler.unscale_(run.opt)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.clip_grad)
    run.scaler.step(run.opt)
    run.scaler.update()
    run.opt.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update_parameters(run.model)


def log_progress(run):
    """The training losses since the last line (averaged over ranks), lr, speed (since the last line, and since the
    start), time left."""
    vals = {k: all_mean(v, run.plan).item() / run.since_log for k, v in run.running.items()}
    for v in run.running.values():   # zeroed where they are: a CUDA graph adds to these tensors
        v.zero_()
    run.since_log = 0
    for k, v in vals.items():
        if not math.isfinite(v):
            run.diverged(v, f'training loss {k}')
    now = time.time()
    elapsed = now - run.t_start
    step = run.step
    if run.steps_done == 1:    # one step, its batch's loading included, makes no estimate of speed
        speed = f'first step {elapsed:.1f} s after the model was ready (its batch loaded)'
    else:
        # as timm's line: the speed since the previous line (the steps between the two, exactly), then the mean
        # since the model was ready
        recent = (run.steps_done - run.done_at_log) * run.eff_batch / (now - run.t_log)
        minutes = (run.total_steps - step) * elapsed / run.steps_done / 60
        speed = f'{recent:.0f} img/s ({run.steps_done * run.eff_batch / elapsed:.0f} since the start) | ' \
                f'ETA {minutes:.1f} min'
    run.t_log, run.done_at_log = now, run.steps_done
    losses = ' '.join(f'{k} {v:.4f}' for k, v in vals.items())
    lr = lr_at(run.cfg, run.lr, (step - 1) / run.steps_per_epoch)
    run.plan.run_dir.log(f'epoch {step / run.steps_per_epoch:6.2f} step {step}/{run.total_steps} | '
                         f'{losses} | lr {lr:.2e} | {speed}')
    run.metrics['train'] = vals

# -----------------------------------------------------------------------------
# The step captured as one CUDA graph: the same train_step, launched as one graph instead of hundreds of kernels


def graphed(run, forward):
    """run's GraphedStep of forward, kept over its epochs; at the start of each one after the first (an evaluation
    and a save came in between), captured again if a tensor it reads or writes has moved, which the log says."""
    step = run.graphs.get(forward)
    if step is None:
        step = run.graphs[forward] = GraphedStep()
    moved = step.moved(run, forward) if step.graph is not None else ''
    if moved:
        run.plan.log(f'the step captured again at step {run.step}: {moved} moved since its capture')
        step.graph = None
    return step


class GraphedStep:
    """train_step, captured once as a CUDA graph and then replayed: one launch for its hundreds of kernels (forward,
    backward, the fused AdamW, the EMA, the running losses), where eager launches each from Python and a small model's
    GPU waits for it (on one H200, Fashion-MNIST's preset step: 2.15 ms of kernels in a 12.7-16.4 ms eager step,
    results/benchmark-h200/round7; replayed, 2.27 ms: round8). As torch's notes on CUDA graphs do it: WARM_UP eager
    steps on a side stream (the optimizer's state, the EMA's first copy, cuBLAS's handles made outside the graph), then
    the capture, which runs nothing, then a replay per step. A replay reads and writes the same memory as the capture
    did: the batch is copied into the graph's static buffers (x, y); what changes from step to step reaches it as a
    tensor it reads where it is: each parameter group's lr (a device tensor, filled before each replay from the lr the
    group holds; the capturable fused AdamW reads it), the EMA's weight and count (util/run.EMA), the running losses
    (summed in place), drop-path's random numbers (torch's CUDA generator, which a replay advances as an eager step
    would). Where a run allows it (one process on a GPU, --accum-steps 1, bf16 or fp32): util/launch.cuda_graph."""
    WARM_UP = 3   # eager steps before the capture (torch's example takes 3)

    def __init__(self):
        self.graph = None
        self.eager_steps = 0
        self.x = self.y = None    # the static batch the graph reads
        self.lrs = []             # each parameter group's lr, where the graph reads it
        self.held = {}            # what the graph reads and writes: {name: address at the capture}

    def __call__(self, run, forward, x, y, last_micro=True):
        assert last_micro, 'a step of one micro-batch'
        if self.graph is None and self.eager_steps < self.WARM_UP:
            self.eager_steps += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                train_step(run, forward, x, y)
            torch.cuda.current_stream().wait_stream(side)
            return
        if self.graph is None:
            self.capture(run, forward, x, y)
        self.x.copy_(x)
        self.y.copy_(y)
        for lr, g in zip(self.lrs, run.opt.param_groups):
            lr.fill_(g['lr'])
        self.graph.replay()

    def capture(self, run, forward, x, y):
        """The graph of train_step on static copies of this batch, each group's lr a device tensor while it is
        captured; nothing runs yet (the replay that follows trains on the batch)."""
        start = time.time()
        self.x, self.y = x.clone(), y.clone()
        groups = run.opt.param_groups
        self.lrs = [torch.full((), g['lr'], device=x.device) for g in groups]
        numbers = [g['lr'] for g in groups]
        for g, lr in zip(groups, self.lrs):
            g['lr'] = lr
            g['capturable'] = True   # AdamW refuses a capture without it (its fused step is the same either way)
        run.opt.zero_grad(set_to_none=True)   # the gradients made in the graph's own memory pool
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                train_step(run, forward, self.x, self.y)
        finally:
            for g, lr in zip(groups, numbers):
                g['lr'] = lr
        self.held = self.addresses(run, forward)
        run.plan.log(f'the step captured as one CUDA graph at step {run.step}, after {self.eager_steps} eager steps, '
                     f'in {time.time() - start:.1f} s')

    def addresses(self, run, forward):
        """{name: address} of every tensor the graph reads or writes that outlives a step: its batch and lrs, the
        running losses, the optimizer's state, and the parameters and buffers of every module the step runs: the run's
        model (an MAE's decoder in it), the EMA's copy, and each module the loss function holds (a transfer's frozen
        teacher: step_modules)."""
        tensors = {'x': self.x, 'y': self.y, **{f'lr {i}': t for i, t in enumerate(self.lrs)},
                   **{f'running {k}': t for k, t in run.running.items()}}
        for i, state in enumerate(run.opt.state.values()):
            tensors.update({f'optimizer {i} {k}': t for k, t in state.items() if torch.is_tensor(t)})
        if run.ema is not None:
            tensors.update({'ema weight': run.ema.weight, 'ema count': run.ema.count})
        for owner, module in step_modules(run, forward).items():
            tensors.update({f'{owner} {k}': t for k, t in (*module.named_parameters(), *module.named_buffers())})
        return {name: t.data_ptr() for name, t in tensors.items()}

    def moved(self, run, forward):
        """The first tensor the graph reads or writes that is no longer where it was captured ('' if none is)."""
        now = self.addresses(run, forward)
        return next((name for name, at in self.held.items() if now.get(name) != at), '')


def step_modules(run, forward):
    """{name: module} of every module a training step runs: the run's model, the EMA's copy, and each module the loss
    function holds in its closure (a transfer's teacher: attention_copy.copy_loss, attention_distill.distill_loss_fn)."""
    modules = {'model': run.model}
    if run.ema is not None:
        modules['ema'] = run.ema.module
    fn = getattr(forward, '_torchdynamo_orig_callable', forward)   # a compiled loss function: the function it compiled
    held = inspect.getclosurevars(fn).nonlocals if inspect.isfunction(fn) else {}
    modules.update({name: m for name, m in held.items() if isinstance(m, torch.nn.Module)})
    return modules

# -----------------------------------------------------------------------------
# Optimiser, schedule, loss


def build_optimizer(cfg, model, lr):
    """AdamW; no weight decay on norms, biases, tokens, position embeddings; layer-wise lr decay: layer l
    (0 the embedding, i + 1 block i, the rest the head) trains at lr x layer_decay ** (L - l), with
    L = depth + 1 in MAE's util/lr_decay.py, L = depth in the release's (its copy student; the head and
    the last block then share the full lr): cfg.layer_decay_offset picks. The fused implementation (a kernel or two
    a parameter group), in a compiled run too (Run.forward compiles the loss function alone): compiled, the optimizer's
    step took a third of the step's compilation (21 of 55 s at Fashion-MNIST's preset on a 2-core EPYC) to spare the
    host 0.3 ms a step, and needed its lr as a tensor (a number is a constant of its graph); captured as a CUDA graph,
    its replay begins a new step for torch's CUDA graphs, which frees the gradients it reads (seen on an H200)."""
    groups = {}   # (lr scale, no weight decay) -> its AdamW parameter group
    layers = model.depth + cfg.layer_decay_offset
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = p.ndim <= 1 or name.endswith(('cls_token', 'pos_embed', 'mask_token', 'reg_token'))
        scale = cfg.layer_decay ** (layers - min(layer_id(name, model.depth), layers))
        g = groups.setdefault((scale, no_wd), {'params': [], 'lr_scale': scale,
                                               'weight_decay': 0.0 if no_wd else cfg.weight_decay})
        g['params'].append(p)
    return torch.optim.AdamW(list(groups.values()), lr=lr, betas=(0.9, cfg.beta2), fused=True)


def step_mode(device, world=1, accum_steps=1, graphed=False):
    """torch.compile's mode for a compiled step's loss function (its forward and backward; the optimizer runs eager,
    build_optimizer): on one GPU with one micro-batch a step, 'reduce-overhead' (CUDA graphs: a graph replayed with
    one launch where eager makes hundreds; its outputs live until the next replay, which one micro-batch a step never
    reaches while they are in use); elsewhere, and inside a step captured whole as one graph (GraphedStep), the
    default."""
    one = world == 1 and accum_steps == 1
    return 'reduce-overhead' if device.type == 'cuda' and one and not graphed else 'default'


def layer_id(name, depth):
    """A ViT parameter's layer for lr decay: 0 the embedding, i + 1 block i, depth + 1 the rest (norm,
    head)."""
    if name.startswith(('cls_token', 'pos_embed', 'patch_embed', 'reg_token', 'norm_pre')):
        return 0
    return int(name.split('.')[1]) + 1 if name.startswith('blocks.') else depth + 1


def final_lr(cfg, lr):
    """The lr the schedule ends at: --min-lr-ratio of the peak lr, else --min-lr; 0 if the peak is 0 (--blr 0:
    the weights stay as loaded)."""
    if cfg.min_lr_ratio or lr == 0:
        return cfg.min_lr_ratio * lr
    return cfg.min_lr


def lr_at(cfg, lr, epoch_float):
    """Linear warm-up to lr, then half-cosine down to final_lr, in (fractional) epochs."""
    if epoch_float < cfg.warmup_epochs:
        return lr * epoch_float / cfg.warmup_epochs
    t = (epoch_float - cfg.warmup_epochs) / max(cfg.epochs - cfg.warmup_epochs, 1e-8)
    low = final_lr(cfg, lr)
    return low + (lr - low) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def soft_cross_entropy(logits, target, smoothing):
    """Cross-entropy with integer labels (B,) or soft targets (B, C) from MixUp / CutMix: torch's takes
    both, smoothing a soft target as target x (1 - smoothing) + smoothing / C."""
    return F.cross_entropy(logits, target, label_smoothing=smoothing)


# -----------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(predict, loader, plan):
    """Top-1 / top-5 (%) and loss over a loader, summed across ranks. predict(images) -> logits: a
    model. (A trained model scored by ensemble.py and evaluate.py: predict_all, accuracy.)"""
    total = torch.zeros(4, device=plan.device)     # correct@1, correct@5, loss sum, count
    for x, y in loader:
        x, y = x.to(plan.device, non_blocking=True), y.to(plan.device, non_blocking=True)
        with autocast(plan):
            logits = predict(x).float()
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        total[:3] += torch.stack([(top5[:, 0] == y).sum(), (top5 == y[:, None]).any(-1).sum(),
                                  F.cross_entropy(logits, y, reduction='sum')])
        total[3] += len(y)      # a number added where total is: no copy from the host per batch
    if plan.world > 1:
        dist.all_reduce(total)
    c1, c5, loss, n = total.tolist()
    return {'top1': 100 * c1 / n, 'top5': 100 * c5 / n, 'loss': loss / n}


@torch.no_grad()
def predict_all(models, loader, place):
    """Every model's logits on every image, [(N, C)] in float on the CPU, and the labels (N,) there too: gathered on
    the device (the loader's labels are where its set is held) and copied to the host once, at the end."""
    logits = [[] for _ in models]   # each model's (B, C) logits, batch after batch
    labels = []
    for x, y in loader:
        x = x.to(place.device, non_blocking=True)
        with autocast(place):
            for batches, m in zip(logits, models):
                batches.append(m(x).float())
        labels.append(y.to(place.device, non_blocking=True))    # (B,)
    return [torch.cat(batches).cpu() for batches in logits], torch.cat(labels).cpu()


def accuracy(scores, labels, k=1):
    """Top-k accuracy (%) of scores (N, C) (logits or probabilities) against labels (N,)."""
    top = scores.topk(min(k, scores.shape[-1])).indices                        # (N, k)
    return 100 * (top == labels[:, None]).any(-1).float().mean().item()


# -----------------------------------------------------------------------------
# Precision, seeds, a mean over processes


def autocast(plan):
    """The run's autocast: plan.dtype (None: fp32, autocast off) on plan.device (any object with the
    two)."""
    return torch.autocast(plan.device.type, dtype=plan.dtype, enabled=plan.dtype is not None)


def seed_all(seed, rank, epoch):
    """Each (seed, rank, epoch) gets its own stream, so resuming at an epoch boundary is exact."""
    s = int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])
    torch.manual_seed(s)
    np.random.seed(s)


def all_mean(t, plan):
    if plan.world > 1:
        t = t.clone()
        dist.all_reduce(t)
        t /= plan.world
    return t


def cast_matmul_weights(model, dtype):
    """A frozen model's linear and convolution weights stored in the autocast dtype, once (autocast would cast ViT-L's
    300M numbers every step to the same numbers); norms, tokens and positions stay fp32. Run under autocast only."""
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            m.to(dtype)
