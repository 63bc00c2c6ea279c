"""
The training loop every script shares: AdamW with layer-wise lr decay, warm-up + cosine schedule, EMA,
the epoch loop with gradient accumulation and AMP, evaluation, checkpoints (the run directory: util/rundir.py; its
resume rules: util/resume.py). A script starts with launch.start (config, processes, device, data), builds its
model and (optionally) its loss, then calls `fit`.
"""
import contextlib
import math
import os
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from data import batch_mixer, build_loader
from util.config import ConfigError
from util.launch import all_mean, autocast, log, seed_all
from util.resume import record_divergence, restore, resume_command
from util.rundir import append_record, rng_states, save_checkpoint, write_provenance
from vit import set_attn_implementation

# -----------------------------------------------------------------------------
# Optimiser and schedule


def build_optimizer(cfg, model, lr):
    """AdamW; no weight decay on norms, biases, tokens, position embeddings; layer-wise lr decay: layer l
    (0 the embedding, i + 1 block i, the rest the head) trains at lr x layer_decay ** (L - l), with
    L = depth + 1 in MAE's util/lr_decay.py, L = depth in the release's (its copy student; the head and
    the last block then share the full lr): cfg.layer_decay_offset picks."""
    groups, layers = {}, getattr(model, 'depth', 0) + cfg.layer_decay_offset
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = p.ndim <= 1 or name.endswith(('cls_token', 'pos_embed', 'mask_token', 'reg_token'))
        lid = min(model.layer_id(name), layers) if hasattr(model, 'layer_id') else layers
        scale = cfg.layer_decay ** (layers - lid)
        if scale == 0:   # a teacher-sized student's depth is known only now (util/config.py checks the rest)
            raise ConfigError(f'--layer-decay-offset {cfg.layer_decay_offset}: layer {lid} gets an lr scale of '
                              f'{cfg.layer_decay} ** {layers - lid}, which is 0 in floating point: use 0 or 1')
        g = groups.setdefault((scale, no_wd), {'params': [], 'lr_scale': scale,
                                               'weight_decay': 0.0 if no_wd else cfg.weight_decay})
        g['params'].append(p)
    return torch.optim.AdamW(list(groups.values()), lr=lr, betas=(0.9, cfg.beta2), fused=True)


def lr_at(cfg, lr, epoch_float):
    """Linear warm-up to lr, then half-cosine down to min_lr, in (fractional) epochs."""
    if epoch_float < cfg.warmup_epochs:
        return lr * epoch_float / cfg.warmup_epochs
    t = (epoch_float - cfg.warmup_epochs) / max(cfg.epochs - cfg.warmup_epochs, 1e-8)
    return cfg.min_lr + (lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def soft_cross_entropy(logits, target, smoothing=0.0):
    """Cross-entropy with integer labels (B,) or soft targets (B, C) from MixUp / CutMix."""
    if target.ndim == 1:
        return F.cross_entropy(logits, target, label_smoothing=smoothing)
    target = target * (1 - smoothing) + smoothing / logits.shape[-1]
    return -(target * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


# -----------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(predict, loader, env):
    """Top-1 / top-5 (%) and loss over a loader, summed across ranks."""
    total = torch.zeros(4, device=env.device)     # correct@1, correct@5, loss sum, count
    for x, y in loader:
        x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
        with autocast(env):
            logits = predict(x).float()
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        total += torch.stack([(top5[:, 0] == y).sum(), (top5 == y[:, None]).any(-1).sum(),
                              F.cross_entropy(logits, y, reduction='sum'), torch.tensor(len(y), device=env.device)])
    if env.world > 1:
        dist.all_reduce(total)
    c1, c5, loss, n = total.tolist()
    return {'top1': 100 * c1 / n, 'top5': 100 * c5 / n, 'loss': loss / n}


# -----------------------------------------------------------------------------
# The training loop: fit() reads as its phases, each a method of Run below


def fit(cfg, env, model, data, loss_fn=None, predict=None, evaluate_fn=None, extra=None):
    """Train `model` (the raw module; it is what gets saved) and return the final metrics.
    loss_fn(net, images, targets) -> (loss, {name: detached scalar}) with net the DDP-wrapped model;
    predict(model, images) -> logits for evaluation (default: model(images));
    evaluate_fn(model, loader, env) -> {name: value} replaces the top-1 / top-5 evaluation;
    data: data.Splits (train, eval, num_classes) from start();
    extra: dict stored in every checkpoint (e.g. which teacher a student needs)."""
    run = Run(cfg, env, model, data, extra)        # optimiser, loaders, resume, provenance
    loss_fn = loss_fn or run.classification_loss
    predict = predict or (lambda m, x: m(x))
    evaluate_fn = evaluate_fn or (lambda m, loader, env: evaluate(lambda x: predict(m, x), loader, env))
    model.train()
    while run.step < run.total_steps:
        if run.train_epoch(loss_fn):               # to the epoch's end (or --max-steps), saving every --save-every
            run.evaluate(evaluate_fn)              # the eval split; a line of metrics.jsonl
            run.checkpoint()
    return run.metrics


class Run:
    """One fit(): what it trains with, and how far it has got (step, metrics, seconds trained)."""

    def __init__(self, cfg, env, model, data, extra):
        self.cfg, self.env, self.extra = cfg, env, extra
        self.model = model = set_attn_implementation(model.to(env.device), env.attn)   # the EMA copy takes it too
        self.eff_batch = cfg.batch_size * cfg.accum_steps * env.world
        self.lr = cfg.blr * self.eff_batch / 256
        self.opt = build_optimizer(cfg, model, self.lr)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=env.dtype == torch.float16)
        self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True) \
            if cfg.ema else None
        self.train_loader = build_loader(cfg, data.train, True, env.rank, env.world)
        self.eval_loader = build_loader(cfg, data.eval, False, env.rank, env.world)
        self.steps_per_epoch = len(self.train_loader) // cfg.accum_steps
        if self.steps_per_epoch == 0:
            raise ConfigError(f'{len(data.train)} training images give no full batch of {self.eff_batch}')
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        resumed, self.classes = env.resumed, data.classes
        self.step, self.metrics, self.trained_s = (0, {}, 0.0) if not resumed else \
            restore(resumed, env, model, self.opt, self.scaler, self.ema, self.steps_per_epoch, self.classes)
        self.saved_step = self.step if resumed else None   # the step of the checkpoint on disk, if any
        if resumed and (self.step > self.total_steps or self.step == self.total_steps and 'top1' not in self.metrics):
            # nothing left to train, and no evaluation of this step to report (a mid-epoch checkpoint): a KeyError
            where = 'past' if self.step > self.total_steps else 'at'
            raise ConfigError(f'--resume: {env.ckpt_path} is at step {self.step}, {where} --max-steps {cfg.max_steps}, '
                              f'and was not evaluated there: give --max-steps above {self.step} (0: the whole schedule)')
        write_provenance(cfg, env, extra)   # only now: a resume refused above has written nothing
        env.resumed = None
        log(env, cfg, f'lr {self.lr:.3g} = blr {cfg.blr:g} x effective batch {self.eff_batch} / 256 | '
                      f'{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trainable params'
                      f' | {env.world} process(es) on {env.device}'
                      + (f' ({dist.get_backend()})' if dist.is_initialized() else '') + f' | autocast {env.dtype}')
        full = cfg.epochs * self.steps_per_epoch
        cut = f'; this run stops at step {self.total_steps} (--max-steps: the lr follows the {full}-step schedule)' \
            if self.total_steps < full else ''
        log(env, cfg, f'schedule: {self.steps_per_epoch} steps an epoch x {cfg.epochs} epoch(s) = {full} steps, '
                      f'warm-up {cfg.warmup_epochs:g} epoch(s){cut}')
        if resumed:
            log(env, cfg, f'resumed from {env.ckpt_path} at step {self.step}')
        self.ddp = DDP(model, device_ids=[env.device.index] if env.device.type == 'cuda' else None) \
            if dist.is_initialized() else None
        self.net = torch.compile(self.ddp or model) if cfg.compile else self.ddp or model
        self.mixer = batch_mixer(cfg, data.num_classes)
        self.t_start, self.steps_done, self.running, self.since_log = time.time(), 0, {}, 0

    def classification_loss(self, net, x, y):
        loss = soft_cross_entropy(net(x), y, self.cfg.smoothing)
        return loss, {'ce': loss.detach()}

    def train_epoch(self, loss_fn):
        """Optimiser steps from self.step to the end of its epoch (or the last step); True once there."""
        cfg, env = self.cfg, self.env
        epoch, skip = divmod(self.step, self.steps_per_epoch)
        if skip == 0:
            seed_all(cfg.seed, env.rank, epoch)
        self.train_loader.sampler.set_epoch(epoch)
        self.train_loader.sampler.start = skip * cfg.accum_steps * cfg.batch_size   # a resume mid-epoch
        for i, (x, y) in enumerate(self.train_loader):
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            if self.mixer is not None:
                x, y = self.mixer(x, y)
            last_micro = (i + 1) % cfg.accum_steps == 0   # gradients are all-reduced on the last one only
            with (self.ddp.no_sync() if self.ddp and not last_micro else contextlib.nullcontext()), autocast(env):
                loss, parts = loss_fn(self.net, x, y)
                self.scaler.scale(loss / cfg.accum_steps).backward()
            for k, v in parts.items():   # stays on the device: no host sync per step
                self.running[k] = self.running.get(k, 0.0) + v.float() / cfg.accum_steps
            if not last_micro:
                continue
            self.optimizer_step()
            # a launch's 1st and 10th steps are logged too: a run is seen training, and at what speed, within
            # seconds, not only after --log-every steps
            if self.step % cfg.log_every == 0 or self.step == self.total_steps or self.steps_done in (1, 10):
                self.log_progress()
            if self.step % self.steps_per_epoch == 0 or self.step == self.total_steps:
                return True
            if cfg.save_every and self.step % cfg.save_every == 0:
                self.checkpoint()
        return False

    def optimizer_step(self):
        """The lr of this step, clipping, the (scaled) update, the EMA."""
        for g in self.opt.param_groups:
            g['lr'] = lr_at(self.cfg, self.lr, self.step / self.steps_per_epoch) * g['lr_scale']
        if self.cfg.clip_grad:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.step, self.steps_done, self.since_log = self.step + 1, self.steps_done + 1, self.since_log + 1

    def log_progress(self):
        """The training losses since the last line (averaged over ranks), lr, speed, time left."""
        vals = {k: all_mean(v, self.env).item() / self.since_log for k, v in self.running.items()}
        self.running, self.since_log = {}, 0
        for k, v in vals.items():
            self.check_finite(v, f'training loss {k}')
        elapsed, step = time.time() - self.t_start, self.step
        if self.steps_done == 1:    # one step, its batch's loading included, makes no estimate of speed
            speed = f'first step {elapsed:.1f} s after the model was ready (its batch loaded)'
        else:
            speed = f'{self.steps_done * self.eff_batch / elapsed:.0f} img/s | ' \
                    f'ETA {(self.total_steps - step) * elapsed / self.steps_done / 60:.1f} min'
        log(self.env, self.cfg, f'epoch {step / self.steps_per_epoch:6.2f} step {step}/{self.total_steps} | ' +
            ' '.join(f'{k} {v:.4f}' for k, v in vals.items()) +
            f' | lr {lr_at(self.cfg, self.lr, (step - 1) / self.steps_per_epoch):.2e} | {speed}')
        self.metrics['train'] = vals

    def evaluate(self, evaluate_fn):
        """The model (and its EMA) on the eval split; the record appended to metrics.jsonl."""
        model, ema, env = self.model, self.ema, self.env
        model.eval()
        self.metrics.update(evaluate_fn(model, self.eval_loader, env))
        if ema is not None:
            ema.eval()
            self.metrics.update({f'ema_{k}': v for k, v in evaluate_fn(ema.module, self.eval_loader, env).items()})
        model.train()
        record = {'epoch': self.step / self.steps_per_epoch, 'step': self.step, 'time': self.seconds(),
                  **self.metrics}
        for k in [k for k, v in record.items() if isinstance(v, float)]:   # kept only if finite
            self.check_finite(record[k], f'evaluation {k}')
        log(env, self.cfg, 'eval | ' + ' '.join(f'{k} {v:.3f}' for k, v in record.items() if isinstance(v, float)))
        if env.main:
            append_record(os.path.join(self.cfg.out_dir, 'metrics.jsonl'), record)

    def checkpoint(self):
        """Everything a resume needs, written whole (rundir.save_checkpoint); never a value that is not finite
        (in the model, its EMA or the optimizer's state): the checkpoint kept is always one to go on from."""
        state = {'model': self.model.state_dict(), 'ema': self.ema.state_dict() if self.ema else {},
                 'optimizer': self.opt.state_dict()['state']}
        tensors = [(f'{part} {k}', v) for part, d in state.items() for k, v in flat(d) if v.is_floating_point()]
        finite = torch.stack([v.isfinite().all() for _, v in tensors]).tolist()   # one host sync
        if not all(finite):
            name, v = next(t for t, ok in zip(tensors, finite) if not ok)
            self.check_finite(v[~v.isfinite()].flatten()[0].item(), name)
        states = rng_states(self.env)
        if self.env.main:
            save_checkpoint(self.env.ckpt_path, {
                'model': self.model.state_dict(), 'arch': getattr(self.model, 'arch', None),
                'config': asdict(self.cfg), 'script': self.cfg.SCRIPT, 'epoch': self.step / self.steps_per_epoch,
                'step': self.step, 'optimizer': self.opt.state_dict(), 'scaler': self.scaler.state_dict(),
                'ema': self.ema.state_dict() if self.ema else None, 'metrics': self.metrics, 'rng': states,
                'world_size': self.env.world, 'steps_per_epoch': self.steps_per_epoch, 'time': self.seconds(),
                'classes': self.classes, **(self.extra or {})})
        self.saved_step = self.step

    def seconds(self):
        """Seconds of training, over every resume."""
        return self.trained_s + time.time() - self.t_start

    def check_finite(self, value, what):
        """Stop a run whose `what` is not finite: it diverged. Its config.json records where (rundir), so that a
        resume from the checkpoint kept, every value of which is finite (checkpoint), may lower the lr."""
        if math.isfinite(value):
            return
        cfg, kept = self.cfg, self.saved_step
        record_divergence(cfg, self.env, {'step': self.step, 'what': what, 'value': str(value), 'checkpoint': kept})
        lower = f'--blr {cfg.blr / 2:g}'
        other = ' (or with --clip-grad 1' + (', or --amp bf16)' if self.env.dtype == torch.float16 else ')')
        how = (f'the last finite checkpoint (step {kept}) is kept in {self.env.ckpt_path}: continue from it with a '
               f'lower learning rate: {resume_command("--blr")} {lower}{other}') if kept is not None else \
            f'no checkpoint was written yet: start again with a lower learning rate, e.g. {lower}{other}'
        epoch = self.step / self.steps_per_epoch
        raise FloatingPointError(f'{what} is {value} at step {self.step} (epoch {epoch:.2f}): the run diverged and '
                                 f'stopped; {how}')


def flat(d, prefix=''):
    """(key, tensor) of every tensor in nested dicts and lists (an optimizer's state), keys joined by dots."""
    items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, (list, tuple)) else ()
    for k, v in items:
        if torch.is_tensor(v):
            yield f'{prefix}{k}', v
        else:
            yield from flat(v, f'{prefix}{k}.')
