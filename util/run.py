"""
A run in progress: what it trains with and how far it has got (util/engine.py's train_one_epoch moves it on),
continued from its checkpoint where --resume true says so, and what it writes in its run directory (util/rundir.py).

    config.json     written when the run starts (RunDir.begin), updated by every resume
    metrics.jsonl   one record per evaluation (Run.evaluate)
    checkpoint.pt   everything a resume needs, each value finite, written whole (Run.save)
"""
import copy
import math
import os
import signal
import time
import unicodedata
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from util import stop
from util.datafiles import fingerprint
from util.engine import build_optimizer, final_lr, step_mode
from util.errors import CheckpointError, ConfigError


def check_data(plan, loader, splits):
    """What needs the data built (splits: data.build_data's splits and classes): a full batch in the training split; for
    a resume, the data's classes, its two splits (their fingerprints, unless --new-data true) and epoch length the run
    had, and a step left to train (or an evaluation of its last one to report). Returns (steps an epoch, the run's last
    step, the whole schedule's steps, the splits' fingerprints)."""
    cfg = plan.cfg
    resumed = plan.resumed
    steps = len(loader) // cfg.accum_steps
    if steps == 0:
        raise ConfigError(f'{len(loader.dataset)} training images give no full batch of '
                          f'{cfg.batch_size * cfg.accum_steps * plan.world}')
    full = cfg.epochs * steps
    total = min(full, cfg.max_steps) if cfg.max_steps else full
    classes = splits.classes
    # read once, by the main process (a folder's images are stat'ed one by one), and given to the others
    data = shared(plan, lambda: {'train': fingerprint(loader.dataset), 'eval': fingerprint(splits.eval)})
    if resumed:
        path = plan.run_dir.checkpoint
        other = class_mismatch(resumed.get('classes'), classes)
        if other:
            raise ConfigError(f'--resume: {path} was trained on other classes than the data here '
                              f'has ({other}): resume it on its own data (--data-dir)')
        # a folder fixed or re-split between two jobs: half a run on one data set, half on another
        changed = data_changes(resumed.get('data_fingerprint'), data)
        if changed and not cfg.new_data:
            raise ConfigError(f'--resume: {path} was trained on other data than the data here ({changed} '
                              f'differ): resume it on its own data (--data-dir), or pass --new-data true to go on '
                              f'with this one')
        if resumed.get('steps_per_epoch', steps) != steps:
            raise ConfigError(f"--resume: an epoch has {steps} steps here and had "
                              f"{resumed['steps_per_epoch']}: the data or the global batch differ "
                              f"from the saved run")
        step = resumed['step']
        # a checkpoint not evaluated at its step, at the end: nothing to report
        if step > total or step == total and not resumed.get('evaluation'):
            raise ConfigError(f'--resume: {path} is at step {step}, not below --max-steps '
                              f'{cfg.max_steps}, and was not evaluated there: give --max-steps '
                              f'above {step} (0: the whole schedule)')
    return steps, total, full, data


def shared(plan, compute):
    """compute()'s value, computed by the main process alone and given to every process of a group."""
    value = [compute() if plan.main else None]
    if dist.is_initialized():
        dist.broadcast_object_list(value, src=0)
    return value[0]


SPLITS = {'train': 'the training split', 'eval': 'the evaluation split'}
PARTS = {'files': "its images' paths, labels or sizes", 'content': "its images' content"}


def data_changes(saved, here):
    """What differs between the data a checkpoint recorded and the data here, in words ('the training split (its
    images' content)'), or ''. A record of an earlier form (a training split's digest of modification times) is not
    compared."""
    if not isinstance(saved, dict):
        return ''
    out = []
    for split, what in SPLITS.items():
        a, b = saved.get(split), here.get(split)
        if a is None or b is None or a == b:
            continue
        parts = [PARTS[k] for k in PARTS if a.get(k) != b.get(k)] if a.keys() == b.keys() else ['what it is']
        out.append(f"{what} ({', '.join(parts)})")
    return '; '.join(out)


def misfit_state(opt, saved):
    """'' if every tensor of a saved optimizer state has its parameter's shape and dtype (a scalar step aside),
    else the first that does not: load_state_dict takes any, and the fused AdamW step reads and writes by the
    parameter's size (memory corrupted, or a state one float short trained on)."""
    params = [p for g in opt.param_groups for p in g['params']]
    for i, state in saved['state'].items():
        for k, v in state.items():
            fits = isinstance(i, int) and i < len(params) and v.shape == params[i].shape
            if torch.is_tensor(v) and v.dim() and not (fits and v.dtype == params[i].dtype):
                return f'optimizer state {i} {k} of {tuple(v.shape)} {v.dtype}'
    return ''


def class_mismatch(saved, here):
    """'' if two lists of class names agree (saved: a model's, None: not recorded; here: the data's), in Unicode's
    composed form (NFC: a Mac names a folder café decomposed), else what differs, in a few words: the first class
    whose names differ, and the counts."""
    if saved is None or [nfc(n) for n in saved] == [nfc(n) for n in here]:
        return ''
    i = next((i for i, (a, b) in enumerate(zip(saved, here)) if a != b), min(len(saved), len(here)))
    theirs = repr(saved[i]) if i < len(saved) else 'none'
    ours = repr(here[i]) if i < len(here) else 'none'
    return f"other class names (its class {i} is {theirs}, the data's {ours}; {len(saved)} classes, " \
           f"the data has {len(here)})"


def nfc(name):
    return unicodedata.normalize('NFC', str(name))


def not_finite(state, prefix=''):
    """(name, value) of each value that is not finite (nan, inf) in the floating-point tensors of `state` (nested
    dicts: the model's, the EMA's and the optimizer's state), its keys joined by dots: the first of each tensor."""
    for k, v in state.items():
        if isinstance(v, dict):
            yield from not_finite(v, f'{prefix}{k}.')
        elif torch.is_tensor(v) and v.is_floating_point() and not v.isfinite().all():
            yield f'{prefix}{k}', v[~v.isfinite()][0].item()

# -----------------------------------------------------------------------------
# The EMA


class EMA:
    """An exponential moving average of a model's weights (its parameters and buffers), evaluated beside it. The first
    update copies the model; each later one moves every value 1 - decay of the way to the model's:
    w_ema <- decay * w_ema + (1 - decay) * w, torch.optim.swa_utils.get_ema_multi_avg_fn's rule (no warm-up). It is
    AveragedModel's EMA with its count of updates and the weight of the next one kept on the model's device: a step
    that updates it neither copies a number from the host (AveragedModel's count lives there) nor takes one that
    changes (a CUDA graph replays the step: engine.GraphedStep). Its state_dict is AveragedModel's too
    ('n_averaged', and the model's under 'module.'): a checkpoint from either resumes in the other."""

    def __init__(self, model, decay):
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.decay = decay
        device = next(model.parameters()).device
        self.count = torch.zeros((), dtype=torch.long, device=device)   # updates so far
        self.weight = torch.ones((), device=device)   # the model's share in the next update: 1 (a copy), then 1 - decay

    @torch.no_grad()
    def update_parameters(self, model):
        mine = [*self.module.parameters(), *self.module.buffers()]
        theirs = [t.detach() for t in (*model.parameters(), *model.buffers())]
        # w + weight * (w_model - w), in place; a weight of 1 gives w_model exactly (lerp computes it as
        # w_model - (w_model - w) * (1 - weight) from a weight of 0.5 up)
        torch._foreach_lerp_(mine, theirs, [self.weight] * len(mine))
        self.weight.fill_(1 - self.decay)
        self.count += 1

    def state_dict(self):
        weights = {f'module.{k}': v for k, v in self.module.state_dict().items()}
        return {'n_averaged': self.count.clone(), **weights}

    def load_state_dict(self, state):
        state = dict(state)
        count = int(state.pop('n_averaged'))
        self.count.fill_(count)
        self.weight.fill_(1 - self.decay if count else 1.0)
        self.module.load_state_dict({k.removeprefix('module.'): v for k, v in state.items()})

# -----------------------------------------------------------------------------
# The run's state


class Run:
    """A training run: what it trains with (the optimizer, its GradScaler, the EMA, the model as DDP sees it), how
    far it has got (step, metrics, seconds trained), resumed from its checkpoint where the plan says so."""

    def __init__(self, plan, model, loader, data, extra=None):
        """model: the raw module (what is saved), on the plan's device; data: data.build_data's splits, with the
        class names a checkpoint records; extra: a dict stored in every checkpoint (e.g. which teacher a student
        needs)."""
        cfg = plan.cfg
        self.plan = plan
        self.cfg = cfg
        self.classes = data.classes
        self.extra = extra or {}
        self.model = model
        self.steps_per_epoch, self.total_steps, full, self.data = check_data(plan, loader, data)
        self.eff_batch = cfg.batch_size * cfg.accum_steps * plan.world
        self.lr = cfg.blr * self.eff_batch / 256
        self.opt = build_optimizer(cfg, model, self.lr)
        self.scaler = torch.amp.GradScaler(plan.device.type, enabled=plan.dtype == torch.float16)
        self.ema = None
        if cfg.ema:
            self.ema = EMA(model, cfg.ema)
        self.step, self.metrics, self.trained_s = 0, {}, 0.0
        self.saved_step = None    # the step of the checkpoint on disk, if any
        if plan.resumed:
            self.step, self.metrics, self.trained_s = self.restore()
            self.saved_step = self.step
        self.record = None        # an evaluation not yet in metrics.jsonl
        self.begin(full)
        self.ddp = None
        if dist.is_initialized():
            devices = [plan.device.index] if plan.device.type == 'cuda' else None
            self.ddp = DDP(model, device_ids=devices)
        self.net = self.ddp or model
        self.compiled = {}        # each loss_fn, compiled where the step is (forward)
        self.graphs = {}          # each forward's step as one CUDA graph, where the plan says (engine.graphed)
        self.t_start = time.time()
        self.steps_done = 0       # steps this process has trained (the speed in the log)
        self.t_log = self.t_start   # when the last progress line was written, and steps_done then
        self.done_at_log = 0
        self.running = {}         # the losses summed since the last progress line, on the device
        self.since_log = 0
        self.stop = stop.Agreement(plan)   # a scheduler's signal: the step every process saves at
        model.train()

    def forward(self, loss_fn):
        """loss_fn as the step runs it: where the step is compiled (plan.compiled), compiled whole, once, on its first
        call: the teacher's forward, the student's and the loss one graph, and its backward another (AOTAutograd's);
        on one GPU each captured as a CUDA graph by torch (step_mode), unless the whole step is one
        (engine.GraphedStep). Its outputs are used before the next step's replay. The optimizer's step stays eager
        (build_optimizer)."""
        if not self.plan.compiled:
            return loss_fn
        if loss_fn not in self.compiled:
            self.compiled[loss_fn] = torch.compile(
                loss_fn, mode=step_mode(self.plan.device, self.plan.world, self.cfg.accum_steps, self.plan.graphed))
        return self.compiled[loss_fn]

    def begin(self, full):
        """config.json (what the run is and what made it: the script, for a transfer run its teacher file's
        SHA-256, from the record its checkpoints keep, util.checkpoints.teacher_record (a fine-tuning its --init
        file's), and the start-up check of its fused attention where one ran, util/attention_check.py), then the
        first lines of the log: the lr, the model, the processes, the schedule (full: its steps)."""
        cfg = self.cfg
        plan = self.plan
        extra = self.extra
        record = {**asdict(cfg), 'script': cfg.SCRIPT}
        teacher = extra.get('teacher') or extra.get('distilled_from')   # a copy's, a distillation's
        if teacher:
            record['teacher_sha256'] = teacher['sha256']
        if extra.get('init'):   # finetune.py --init's
            record['init_sha256'] = extra['init']['sha256']
        if extra.get('attention_check'):
            record['attention_check'] = extra['attention_check']
        record['world_size'] = plan.world
        plan.run_dir.begin(record, plan.resumed)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        on = f'{plan.world} process(es) on {plan.device}'
        if dist.is_initialized():
            on += f' ({dist.get_backend()})'
        plan.log(f'lr {self.lr:.3g} = blr {cfg.blr:g} x effective batch {self.eff_batch} / 256 at '
                 f'its peak, {final_lr(cfg, self.lr):.3g} at the end | '
                 f'{trainable / 1e6:.2f}M trainable params | {on} | autocast {plan.dtype}')
        cut = ''
        if self.total_steps < full:
            cut = f'; this run stops at step {self.total_steps} (--max-steps: the lr follows the ' \
                  f'{full}-step schedule)'
        plan.log(f'schedule: {self.steps_per_epoch} steps an epoch x {cfg.epochs} epoch(s) = '
                 f'{full} steps, warm-up {cfg.warmup_epochs:g} epoch(s){cut}')
        if plan.resumed:
            job = ''
            if 'SLURM_JOB_ID' in os.environ:   # the run's history across a batch script's requeues
                job = f" (SLURM job {os.environ['SLURM_JOB_ID']}, restart " \
                      f"{os.environ.get('SLURM_RESTART_COUNT', 0)})"
            plan.log(f'resumed from {plan.run_dir.checkpoint} at step {self.step}{job}')

    def restore(self):
        """Load the checkpoint the plan continues (checked in the resolve phase) into the run's objects; returns
        (step, metrics, seconds trained so far)."""
        plan = self.plan
        ck = plan.resumed   # read and checked in the resolve phase (rundir.open_resumed)
        parts = {'model': self.model, 'optimizer': self.opt, 'scaler': self.scaler, 'ema': self.ema}
        # the hyperparameters are the config's (lr scale, betas, eps, weight decay), never the file's
        own = [{k: v for k, v in g.items() if k != 'params'} for g in self.opt.param_groups]
        cuda = ck.get('cuda_rng') or []   # the CUDA generator's (drop-path, MAE's masks), if kept
        try:
            problem = misfit_state(self.opt, ck['optimizer'])
            if not problem:
                for key, obj in parts.items():
                    if obj is not None:
                        obj.load_state_dict(ck[key])
                # mid-epoch: continue each rank's streams
                if ck['step'] % self.steps_per_epoch and len(ck['rng']) == plan.world:
                    torch.set_rng_state(ck['rng'][plan.rank])
                    if plan.device.type == 'cuda' and len(cuda) == plan.world:
                        torch.cuda.set_rng_state(cuda[plan.rank], plan.device)
        except (KeyError, ValueError, RuntimeError, TypeError) as e:   # another model, a damaged file
            problem = ' '.join(str(e).split())[:300]
        for group, kept in zip(self.opt.param_groups, own):
            group.update(kept)
        if problem:
            raise CheckpointError(f'--resume: {plan.run_dir.checkpoint} does not fit the run '
                                  f'built from these settings ({problem})')
        for key in parts:   # loaded: the plan keeps the record alone
            ck.pop(key, None)
        return ck['step'], ck['metrics'], ck.get('time', 0.0)

    def evaluate(self, evaluate_fn):
        """evaluate_fn(model) -> {name: value} of the model (and of its EMA: ema_name), added to
        metrics.jsonl."""
        self.model.eval()
        self.metrics.update(evaluate_fn(self.model))
        if self.ema is not None:
            self.ema.module.eval()
            self.metrics.update({f'ema_{k}': v for k, v in evaluate_fn(self.ema.module).items()})
        self.model.train()
        record = {'epoch': self.step / self.steps_per_epoch, 'step': self.step,
                  'time': self.seconds(), **self.metrics}
        for k, v in record.items():   # kept if finite
            if isinstance(v, float) and not math.isfinite(v):
                self.diverged(v, f'evaluation {k}')
        numbers = ' '.join(f'{k} {v:.3f}' for k, v in record.items() if isinstance(v, float))
        self.plan.log(f'eval | {numbers}')
        self.record = record   # into metrics.jsonl once its checkpoint is written (save)

    def save(self):
        """checkpoint.pt: everything a resume needs, written whole; never a value that is not finite (in the model,
        its EMA or the optimizer's state): the checkpoint kept is always one to go on from."""
        plan = self.plan
        model = self.model.state_dict()
        ema = self.ema.state_dict() if self.ema else None
        opt = self.opt.state_dict()
        for name, value in not_finite({'model': model, 'ema': ema, 'optimizer': opt['state']}):
            self.diverged(value, name)   # raises: the first stops the run
        # every rank's RNG state (all randomness here is torch's), for an exact mid-epoch resume
        # and on a GPU the CUDA generator's (drop-path and MAE's masks draw from it there)
        cuda = plan.device.type == 'cuda'
        gpu = torch.cuda.get_rng_state(plan.device) if cuda else None
        states = [(torch.get_rng_state(), gpu)] * plan.world
        if plan.world > 1:
            dist.all_gather_object(states, states[0])
        plan.run_dir.save({
            'model': model, 'arch': self.model.arch, 'config': asdict(self.cfg),
            'script': self.cfg.SCRIPT, 'epoch': self.step / self.steps_per_epoch, 'step': self.step,
            'optimizer': opt, 'evaluation': self.record,   # metrics.jsonl's record of this step
            'scaler': self.scaler.state_dict(), 'ema': ema, 'metrics': self.metrics,
            'rng': [cpu for cpu, _ in states],
            'cuda_rng': [gpu for _, gpu in states] if cuda else None,
            'world_size': plan.world, 'steps_per_epoch': self.steps_per_epoch,
            'time': self.seconds(), 'classes': self.classes, 'data_fingerprint': self.data, **self.extra})
        # after its checkpoint, which holds it: a run killed in between gets it back on resume (RunDir.begin),
        # and one that could not write its first checkpoint has no evaluation to be refused as a finished run
        if self.record:
            plan.run_dir.keep_metrics(self.step, self.record)
        self.saved_step = self.step
        self.record = None

    def save_and_stop(self, signum):
        """Stop at a signal every process agreed on (util/stop.py): the checkpoint of this step (written whole, a
        second signal changing nothing), one line saying so and how the run goes on, then SavedAndStopped."""
        if self.saved_step != self.step:
            self.save()
        if dist.is_initialized():   # none ends before the checkpoint is whole: torchrun stops the others then
            dist.barrier()
        self.plan.log(f'saved at step {self.step} of {self.total_steps} and stopped '
                      f'({signal.Signals(signum).name}): {self.plan.run_dir.how_to_continue()}')
        raise stop.SavedAndStopped(self.step)

    def seconds(self):
        """Seconds of training, over every resume."""
        return self.trained_s + time.time() - self.t_start

    def diverged(self, value, what):
        """Stop a run whose `what` is not finite (value): it diverged. Its config.json records where, so that a
        resume from the checkpoint kept, every value of which is finite (save), may lower the lr
        (rundir.AFTER_DIVERGENCE)."""
        kept = self.saved_step
        self.plan.run_dir.record_divergence({'step': self.step, 'what': what, 'value': str(value),
                                             'checkpoint': kept})
        where = 'no checkpoint was written yet'
        if kept is not None:
            where = f'the last finite checkpoint (step {kept}) is {self.plan.run_dir.checkpoint}'
        raise FloatingPointError(f'{what} is {value} at step {self.step}: the run diverged and '
                                 f'stopped; {where}')

