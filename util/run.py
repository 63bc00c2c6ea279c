"""
A run in progress: its state (util/engine.py's train_one_epoch moves it on), and what it writes in its run
directory (util/rundir.py claims and checks that directory; util/resume.py says what a resume may change).

    config.json     written when the run starts (write_provenance), updated by every resume
    metrics.jsonl   one record per evaluation (Run.evaluate)
    checkpoint.pt   everything a resume needs, each value finite, written whole (Run.save)
"""
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from util.config import ConfigError
from util.engine import build_optimizer, final_lr, log
from util.files import append_text, replacing, write_text
from util.resume import record_divergence, restore, resume_command
from util.rundir import git_commit, read_json, read_lines
from vit import set_attn_implementation

# -----------------------------------------------------------------------------
# The run's state


class Run:
    """A training run: what it trains with (the optimizer, its GradScaler, the EMA, the model as DDP sees it), how
    far it has got (step, metrics, seconds trained), resumed from its checkpoint where --resume true says so."""

    def __init__(self, cfg, env, model, train_loader, classes, extra=None):
        """model: the raw module (what is saved); classes: the data's class names (a resume checks them); extra: a
        dict stored in every checkpoint (e.g. which teacher a student needs)."""
        self.cfg, self.env, self.classes, self.extra = cfg, env, classes, extra
        self.model = model = set_attn_implementation(model.to(env.device), env.attn)   # the EMA copy takes it too
        self.eff_batch = cfg.batch_size * cfg.accum_steps * env.world
        self.lr = cfg.blr * self.eff_batch / 256
        self.opt = build_optimizer(cfg, model, self.lr)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=env.dtype == torch.float16)
        self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True) \
            if cfg.ema else None
        self.steps_per_epoch = len(train_loader) // cfg.accum_steps
        if self.steps_per_epoch == 0:
            raise ConfigError(f'{len(train_loader.dataset)} training images give no full batch of {self.eff_batch}')
        full = cfg.epochs * self.steps_per_epoch
        self.total_steps = min(full, cfg.max_steps) if cfg.max_steps else full
        resumed = env.resumed
        self.step, self.metrics, self.trained_s = (0, {}, 0.0) if not resumed else \
            restore(resumed, env, model, self.opt, self.scaler, self.ema, self.steps_per_epoch, classes)
        self.saved_step = self.step if resumed else None   # the step of the checkpoint on disk, if any
        if resumed and (self.step > self.total_steps or self.step == self.total_steps and 'top1' not in self.metrics):
            # nothing left to train, and no evaluation of this step to report (a mid-epoch checkpoint)
            where = 'past' if self.step > self.total_steps else 'at'
            raise ConfigError(f'--resume: {env.ckpt_path} is at step {self.step}, {where} --max-steps {cfg.max_steps}, '
                              f'and was not evaluated there: give --max-steps above {self.step} (0: the whole schedule)')
        write_provenance(cfg, env, extra)   # only now: a resume refused above has written nothing
        env.resumed = None
        log(env, cfg, f'lr {self.lr:.3g} = blr {cfg.blr:g} x effective batch {self.eff_batch} / 256 at its peak, '
                      f'{final_lr(cfg, self.lr):.3g} at the end | '
                      f'{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trainable params'
                      f' | {env.world} process(es) on {env.device}'
                      + (f' ({dist.get_backend()})' if dist.is_initialized() else '') + f' | autocast {env.dtype}')
        cut = f'; this run stops at step {self.total_steps} (--max-steps: the lr follows the {full}-step schedule)' \
            if self.total_steps < full else ''
        log(env, cfg, f'schedule: {self.steps_per_epoch} steps an epoch x {cfg.epochs} epoch(s) = {full} steps, '
                      f'warm-up {cfg.warmup_epochs:g} epoch(s){cut}')
        if resumed:
            log(env, cfg, f'resumed from {env.ckpt_path} at step {self.step}')
        self.ddp = DDP(model, device_ids=[env.device.index] if env.device.type == 'cuda' else None) \
            if dist.is_initialized() else None
        self.net = torch.compile(self.ddp or model) if cfg.compile else self.ddp or model
        self.t_start, self.steps_done, self.running, self.since_log = time.time(), 0, {}, 0
        model.train()

    def evaluate(self, evaluate_fn):
        """evaluate_fn(model) -> {name: value} of the model (and of its EMA: ema_name), added to metrics.jsonl."""
        model, ema, env = self.model, self.ema, self.env
        model.eval()
        self.metrics.update(evaluate_fn(model))
        if ema is not None:
            ema.eval()
            self.metrics.update({f'ema_{k}': v for k, v in evaluate_fn(ema.module).items()})
        model.train()
        record = {'epoch': self.step / self.steps_per_epoch, 'step': self.step, 'time': self.seconds(),
                  **self.metrics}
        for k in [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]:   # kept if finite
            self.diverged(record[k], f'evaluation {k}')
        log(env, self.cfg, 'eval | ' + ' '.join(f'{k} {v:.3f}' for k, v in record.items() if isinstance(v, float)))
        if env.main:
            append_record(os.path.join(self.cfg.out_dir, 'metrics.jsonl'), record)

    def save(self):
        """checkpoint.pt: everything a resume needs, written whole (save_checkpoint); never a value that is not finite
        (in the model, its EMA or the optimizer's state): the checkpoint kept is always one to go on from."""
        state = {'model': self.model.state_dict(), 'ema': self.ema.state_dict() if self.ema else {},
                 'optimizer': self.opt.state_dict()['state']}
        tensors = [(f'{part} {k}', v) for part, d in state.items() for k, v in flat(d) if v.is_floating_point()]
        finite = torch.stack([v.isfinite().all() for _, v in tensors]).tolist()   # one host sync
        if not all(finite):
            name, v = next(t for t, ok in zip(tensors, finite) if not ok)
            self.diverged(v[~v.isfinite()].flatten()[0].item(), name)
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

    def diverged(self, value, what):
        """Stop a run whose `what` is not finite (value): it diverged. Its config.json records where, so that a
        resume from the checkpoint kept, every value of which is finite (save), may lower the lr."""
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

# -----------------------------------------------------------------------------
# What it writes


def write_provenance(cfg, env, extra=None):
    """config.json: every field, the script (and teacher file) that made the run, the git commit, world size, torch
    version, command. A new run starts afresh (deleting what --overwrite true allowed); a resume updates the
    fields and appends what it changed, rebuilds a missing or damaged config.json from the checkpoint, and keeps
    the metrics up to the checkpoint's step (an evaluation written after it is made again). Then log.txt gets the
    lines printed so far (engine.log holds them until the run has written its config.json: a command refused
    before it trains leaves the folder as it was)."""
    if not env.main:
        return
    path, now = os.path.join(cfg.out_dir, 'config.json'), {**asdict(cfg), **made_with(cfg, extra)}
    launch = {'git_commit': git_commit(), 'world_size': env.world, 'torch': torch.__version__, 'argv': sys.argv}
    if cfg.resume:
        step = env.resumed['step']
        old = read_json(path) or {**env.resumed['config'], 'rebuilt': f'config.json was missing or unreadable at '
                                                                      f'step {step}: rebuilt from the checkpoint'}
        diverged = old.pop('diverged', None)   # a lower lr was allowed once, after it: recorded with this resume
        saved = {**old, **env.resumed['config']}   # the checkpoint's config is what ran: config.json may be edited
        changed = {k: [saved.get(k), v] for k, v in now.items() if saved.get(k) != v and k != 'attention_check'}
        resume = {'step': step, **launch, 'changed': changed, **({'after_divergence': diverged} if diverged else {})}
        record = {**old, **now, 'world_size': env.world, 'resumes': old.get('resumes', []) + [resume]}
        keep_metrics(os.path.join(cfg.out_dir, 'metrics.jsonl'), step)
    else:
        record = {**now, **launch}
        for name in ('metrics.jsonl', 'checkpoint.pt', 'done.json', 'reconstruction.png'):   # an earlier attempt
            with contextlib.suppress(FileNotFoundError):                                     # or --overwrite true
                os.remove(os.path.join(cfg.out_dir, name))
    write_text(path, json.dumps(record, indent=2))
    log = os.path.join(cfg.out_dir, 'log.txt')   # what the run printed before it claimed the directory
    (append_text if cfg.resume else write_text)(log, ''.join(line + '\n' for line in env.pending))
    env.pending, env.claimed = [], True


def made_with(cfg, extra):
    """What made the run: the script, for a transfer run its teacher file's SHA-256 (from the record its checkpoints
    keep, teacher.teacher_record), and the start-up check of its fused attention where one ran (teacher.check_sdpa)."""
    extra = extra or {}
    record = next((v for v in extra.values() if isinstance(v, dict) and 'sha256' in v), None)
    return {'script': cfg.SCRIPT, **({'teacher_sha256': record['sha256']} if record else {}),
            **({'attention_check': extra['attention_check']} if extra.get('attention_check') else {})}


def keep_metrics(path, step):
    """Keep metrics.jsonl's records up to `step` (the checkpoint a resume starts from): a record written after
    it, by a run stopped before its next checkpoint, is made again; a line that is not a record is dropped."""
    def kept(line):
        try:
            return json.loads(line).get('step', 0) <= step
        except (ValueError, AttributeError):
            return False
    lines = read_lines(path)
    if lines and not all(map(kept, lines)):
        write_text(path, ''.join(line + '\n' for line in lines if kept(line)))


def append_record(path, record):
    """Add one line to a JSON-lines file, the whole file written anew (it has one line per evaluation)."""
    write_text(path, ''.join(line + '\n' for line in read_lines(path)) + json.dumps(record) + '\n')


def rng_states(env):
    """Every rank's torch RNG state (all randomness here is torch's), for exact mid-epoch resume."""
    states = [torch.get_rng_state()] * env.world
    if env.world > 1:
        dist.all_gather_object(states, states[0])
    return states


def save_checkpoint(path, state):
    """To a temporary file, then renamed: a crash never leaves half a checkpoint."""
    with replacing(path) as tmp, open(tmp, 'wb') as f:   # a file object: a failed write raises OSError
        torch.save(state, f)
