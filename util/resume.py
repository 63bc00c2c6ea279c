"""
How `--resume true` is checked, in the resolve phase, before anything is built: the checkpoint against the command
line, and after a divergence the learning rate.

A resume continues only the run that was saved, with the script that saved it: its config must be the saved one
except for the fields in the config's RESUMABLE (where and how the run goes, never what it computes), with the same
global batch (batch size x accumulation steps x processes), the same class names (checked once the data is built,
util/run.py), and for a transfer run the same teacher file (teacher.TransferConfig). From the checkpoint kept when
the run diverged, the learning rate may change once (AFTER_DIVERGENCE): config.json records the divergence, and
the resume that used it.
"""
import math
import os
import shlex
import sys

import torch

from util.checkpoints import read_checkpoint
from util.config import flag, show
from util.errors import CheckpointError, ConfigError

# what a training run saves (run.Run.save), and of which type: a file without these is no run of ours
SAVED = {'model': dict, 'config': dict, 'step': int, 'optimizer': dict, 'rng': list,
         'metrics': dict}

# what a resume from the checkpoint kept when its run diverged may change besides RESUMABLE: the lr
AFTER_DIVERGENCE = ('blr', 'min_lr', 'min_lr_ratio', 'clip_grad', 'amp')
# what the plan keeps of the checkpoint for util/run.py's checks (its tensors are read again where loaded)
KEPT = ('step', 'config', 'metrics', 'classes', 'steps_per_epoch')


def open_resumed(cfg, run_dir, world):
    """The checkpoint to continue, read safely (no pickled code) and checked against the command line: ConfigError
    names every field that differs (old -> new) and may not. Returns its record without tensors (KEPT)."""
    path = run_dir.checkpoint
    ck = read_checkpoint(path)
    if not isinstance(ck, dict):   # a tensor, a list: none of what a run saves
        ck = {}
    bad = [k for k, kind in SAVED.items() if not isinstance(ck.get(k), kind)]
    if not bad:   # what a resume reads before any tensor
        if not isinstance(ck.get('arch') or {}, dict):
            bad.append('arch')
        if not (ck['rng'] and all(is_rng_state(s) for s in ck['rng'])):
            bad.append('rng')
    if bad:
        raise CheckpointError(f"{path} is not a training checkpoint of these scripts "
                              f"({', '.join(bad)}: missing or of another kind): nothing to resume")
    damaged = out_of_range(ck)
    if damaged:   # a step of -4 trained with a negative lr; a nan weight was taken for a divergence
        raise CheckpointError(f'--resume: {path} holds {damaged}, which no run of these scripts '
                              f'saves: it was edited or is damaged (kept as it is): put back a copy of '
                              f'it, or start a new run in another --out-dir')
    script = made_by(ck)
    if cfg.SCRIPT and script != cfg.SCRIPT:
        raise ConfigError(f'--resume: {path} was saved by {script}, not {cfg.SCRIPT}: continue it '
                          f'with {script} (its flags and --resume true), or start a new run in '
                          f'another --out-dir')
    # a run that diverged after this checkpoint (config.json says so) may go on from it with a lower lr
    diverged = (run_dir.config_record() or {}).get('diverged')
    after = isinstance(diverged, dict) and diverged.get('checkpoint') == ck['step']
    free = AFTER_DIVERGENCE if after else ()   # what may change besides RESUMABLE
    conflicts = cfg.resume_conflicts(ck, world, free=free)
    if conflicts:
        may = ', '.join(map(flag, cfg.RESUMABLE + free))
        raise ConfigError(f"--resume: {path} was saved with other settings: "
                          f"{'; '.join(conflicts)}. Resume with the saved ones (only {may} may "
                          f"change) or start a new run in another --out-dir")
    if after:   # the lr that diverged, or a higher one, diverges again (README: it may be lowered)
        saved = ck['config']
        higher = [f'{flag(k)} {show(saved[k])} -> {show(getattr(cfg, k))}'
                  for k in ('blr', 'min_lr', 'min_lr_ratio')
                  if getattr(cfg, k) > saved.get(k, getattr(cfg, k))]
        if higher:
            raise ConfigError(f"--resume: the run diverged after {path}: {'; '.join(higher)} is "
                              f"higher; go on with a lower learning rate, or start a new run in another "
                              f"--out-dir")
    return {k: ck[k] for k in KEPT if k in ck}


def is_rng_state(state):
    """Whether `state` is what torch.get_rng_state() gives (a byte tensor of its size), as set_rng_state
    takes it."""
    like = torch.get_rng_state()
    return torch.is_tensor(state) and state.dtype == like.dtype and state.shape == like.shape


def out_of_range(ck):
    """The first value of a training checkpoint that no run saves ('' if none): a step, epoch or time below 0 or
    not finite, fewer than 1 step an epoch, or a tensor of the model, its EMA or the optimizer that is not finite
    (Run.save never saves one)."""
    counts = (('step', 0, int), ('steps_per_epoch', 1, int), ('epoch', 0, float),
              ('time', 0, float))
    for k, least, kind in counts:
        v = ck.get(k, least)
        if type(v) not in (int, kind) or not least <= v < math.inf:
            return f'{k} {v!r}'
    broken = not_finite({part: ck.get(part) for part in ('model', 'ema', 'optimizer')})
    if broken:
        return f'{broken[0]} with nan or inf'
    return ''


def flat(d, prefix=''):
    """(key, tensor) of every tensor in nested dicts (AdamW's state: a dict per parameter), keys joined by
    dots."""
    for k, v in d.items():
        if torch.is_tensor(v):
            yield f'{prefix}{k}', v
        elif isinstance(v, dict):
            yield from flat(v, f'{prefix}{k}.')


def not_finite(parts):
    """(name, tensor) of the first floating-point tensor with a nan or inf in parts ({part: nested dicts of
    tensors, or None}), named 'part key'; None if every one is finite. One host sync."""
    tensors = [(f'{part} {k}', v) for part, d in parts.items()
               for k, v in flat(d or {}) if v.is_floating_point()]
    if not tensors:
        return None
    finite = torch.stack([v.isfinite().all() for _, v in tensors]).tolist()
    if all(finite):
        return None
    return tensors[finite.index(False)]


def made_by(ck):
    """The script that saved a checkpoint: recorded, or for one saved before it was, told by what it
    holds."""
    if isinstance(ck.get('script'), str) and ck['script']:
        return ck['script']
    if 'teacher' in ck:
        return 'attention_copy.py'
    if 'distilled_from' in ck:
        return 'attention_distill.py'
    if any(k.startswith('decoder_') for k in ck['model']):
        return 'mae_pretrain.py'
    return 'finetune.py'


def resume_command(*replaced):
    """The command that continues this run: its own with --resume true, without the flags `replaced` (which the
    caller gives anew), or under torchrun the words to say so."""
    if under_torchrun():
        return 'your torchrun command and --resume true'
    drop = ('--resume', *replaced)
    argv = [a for before, a in zip([None, *sys.argv], sys.argv)
            if a not in drop and before not in drop]
    return f"{shlex.join(['python', *argv])} --resume true"


def under_torchrun():
    return 'TORCHELASTIC_RUN_ID' in os.environ
