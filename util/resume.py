"""
How `--resume true` continues a run: the checkpoint checked against the command line, loaded into the run's
objects, continued with a lower learning rate after the run diverged, and the command that continues a run stopped
by Ctrl-C, a lost process or a divergence.

A resume continues only the run that was saved, with the script that saved it: its config must be the saved one
except for the fields in the config's RESUMABLE (where and how the run goes, never what it computes), with the same
global batch (batch size x accumulation steps x processes), the same class names, and for a transfer run the same
teacher file (teacher.TransferConfig). From the checkpoint kept when the run diverged, the learning rate may change
once (AFTER_DIVERGENCE): config.json records the divergence, and the resume that used it.
"""
import json
import os
import shlex
import sys

import torch

from util.checkpoints import CheckpointError, arch_mismatch, read_checkpoint
from util.config import ConfigError, flag, show
from util.files import write_text
from util.rundir import SAVED, current_run_dir, read_json, read_lines

# -----------------------------------------------------------------------------
# The checkpoint to continue, checked and loaded


def open_resumed(cfg, path, world):
    """The checkpoint to continue, read safely (no pickled code) and checked against the command line:
    ConfigError names every field that differs (old -> new) and may not."""
    ck = read_checkpoint(path)
    bad = [k for k, kind in SAVED.items() if not isinstance(ck.get(k), kind)] if isinstance(ck, dict) else []
    if isinstance(ck, dict) and not bad:   # the parts a resume reads before it loads any tensor
        bad = [k for k, ok in (('arch', isinstance(ck.get('arch') or {}, dict)),
                               ('rng', all(torch.is_tensor(s) for s in ck['rng']))) if not ok]
    if not isinstance(ck, dict) or bad:
        why = f" ({', '.join(bad)}: missing or of another kind)" if bad else ''
        raise CheckpointError(f'{path} is not a training checkpoint of these scripts{why}: nothing to resume')
    if cfg.SCRIPT and made_by(ck) != cfg.SCRIPT:
        raise ConfigError(f'--resume: {path} was saved by {made_by(ck)}, not {cfg.SCRIPT}: continue it with '
                          f'{made_by(ck)} (its flags and --resume true), or start a new run in another --out-dir')
    after = diverged_from(cfg.out_dir, ck)   # a run that diverged: its kept checkpoint may go on with a lower lr
    conflicts = cfg.resume_conflicts(ck, world, free=AFTER_DIVERGENCE if after else ())
    if conflicts:
        may = ', '.join(map(flag, cfg.RESUMABLE + (AFTER_DIVERGENCE if after else ())))
        raise ConfigError(f"--resume: {path} was saved with other settings: {'; '.join(conflicts)}. Resume with "
                          f"the saved ones (only {may} may change) or start a new run in another --out-dir")
    higher = [f'{flag(k)} {show(ck["config"][k])} -> {show(getattr(cfg, k))}' for k in ('blr', 'min_lr', 'min_lr_ratio')
              if after and getattr(cfg, k, None) is not None and getattr(cfg, k) > ck['config'].get(k, getattr(cfg, k))]
    if higher:   # the lr that diverged, or a higher one, diverges again (README: it may be lowered)
        raise ConfigError(f"--resume: the run diverged after {path}: {'; '.join(higher)} is higher; go on with a "
                          f"lower learning rate, or start a new run in another --out-dir")
    return ck


# what a resume from the checkpoint kept when its run diverged may change besides RESUMABLE: the learning rate
AFTER_DIVERGENCE = ('blr', 'min_lr', 'min_lr_ratio', 'clip_grad', 'amp')


def diverged_from(out_dir, ck):
    """The divergence config.json records for the run in out_dir, if it stopped after checkpoint `ck` was written
    (engine's check_finite), else None."""
    record = read_json(os.path.join(out_dir, 'config.json')) or {}
    diverged = record.get('diverged')
    return diverged if isinstance(diverged, dict) and diverged.get('checkpoint') == ck['step'] else None


def record_divergence(cfg, env, what):
    """Add to config.json where the run diverged (its step, what was not finite, the step of the checkpoint kept)."""
    path = os.path.join(cfg.out_dir, 'config.json')
    record = read_json(path) if env.main else None
    if record is not None:
        write_text(path, json.dumps({**record, 'diverged': what}, indent=2))


def made_by(ck):
    """The script that saved a checkpoint: recorded, or for one saved before it was, told by what it holds."""
    if isinstance(ck.get('script'), str) and ck['script']:
        return ck['script']
    if 'teacher' in ck or 'distilled_from' in ck:
        return 'attention_copy.py' if 'teacher' in ck else 'attention_distill.py'
    return 'mae_pretrain.py' if any(k.startswith('decoder_') for k in ck['model']) else 'finetune.py'


def restore(ck, env, model, opt, scaler, ema, steps_per_epoch, classes):
    """Load a checked checkpoint into the run's objects; returns (step, metrics, seconds trained so far).
    classes: the class names of the data here, which must be the ones the run was trained on."""
    other = class_mismatch(ck.get('classes'), classes)
    if other:
        raise ConfigError(f'--resume: {env.ckpt_path} was trained on other classes than the data here has ({other}):'
                          f' resume it on its own data (--data-dir)')
    if ck.get('steps_per_epoch', steps_per_epoch) != steps_per_epoch:
        raise ConfigError(f"--resume: an epoch has {steps_per_epoch} steps here and had {ck['steps_per_epoch']}: "
                          f'the data or the global batch differ from the saved run')
    problem = ', '.join(arch_mismatch(model.arch, ck.get('arch') or model.arch, free=()))
    if not problem:
        try:
            for obj, key in ((model, 'model'), (opt, 'optimizer'), (scaler, 'scaler'), (ema, 'ema')):
                if obj is not None:
                    obj.load_state_dict(ck[key])
        except (KeyError, ValueError, RuntimeError) as e:   # another model, or a damaged file
            problem = ' '.join(str(e).split())[:300]
    if problem:
        raise CheckpointError(f'--resume: {env.ckpt_path} does not fit the model built from these settings '
                              f'({problem})')
    if ck['step'] % steps_per_epoch and len(ck['rng']) == env.world:   # mid-epoch: continue the stream
        torch.set_rng_state(ck['rng'][env.rank])
    return ck['step'], ck['metrics'], ck.get('time', 0.0)

def class_mismatch(saved, here):
    """'' if two lists of class names agree, else what differs, in a few words: the counts, or the first few
    classes whose names differ (index: saved -> here)."""
    if saved is None or list(saved) == list(here):
        return ''
    if len(saved) != len(here):
        return f'{len(saved)} classes where the data has {len(here)}'
    diff = [f"{i}: '{a}' -> '{b}'" for i, (a, b) in enumerate(zip(saved, here)) if a != b]
    return f"other class names ({', '.join(diff[:3])}{' ...' * (len(diff) > 3)}; {len(diff)} of {len(here)} differ)"

# -----------------------------------------------------------------------------
# Stopping: Ctrl-C, and the resume command


def how_to_continue():
    """Where the run's last checkpoint is and the command that continues it (or that there is none yet)."""
    out_dir = current_run_dir()
    ckpt = out_dir and os.path.join(out_dir, 'checkpoint.pt')
    if not ckpt or not os.path.exists(ckpt):   # evaluations kept without one would refuse the same command again
        evaluated = out_dir and read_lines(os.path.join(out_dir, 'metrics.jsonl'))
        return 'no checkpoint was saved yet: there is nothing to continue; run the command again' + (
            f' with --overwrite true (it deletes the {len(evaluated)} evaluation(s) made)' if evaluated else '')
    return f"{ckpt} holds the last checkpoint; continue with{'' if under_torchrun() else ':'} {resume_command()}"


def resume_command(*replaced):
    """The command that continues this run: its own with --resume true, without the flags `replaced` (which the
    caller gives anew), or under torchrun the words to say so."""
    if under_torchrun():
        return 'your torchrun command and --resume true'
    drop = ('--resume', *replaced)
    argv = [a for i, a in enumerate(sys.argv) if a not in drop and (i == 0 or sys.argv[i - 1] not in drop)]
    return f"{shlex.join(['python', *argv])} --resume true"


def under_torchrun():
    return 'TORCHELASTIC_RUN_ID' in os.environ
