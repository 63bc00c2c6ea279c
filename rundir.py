"""
A run directory, and how `--resume true` continues the run it holds.

    <out_dir>/config.json     every field, git commit, world size, torch version, command; a resume updates the
                              fields and appends what it changed under 'resumes'
    <out_dir>/log.txt         what the run printed
    <out_dir>/metrics.jsonl   one record per evaluation ('time': seconds of training, summed over resumes)
    <out_dir>/checkpoint.pt   model, optimiser, scaler, EMA, step, RNG states, time; written to a temporary
                              file, then renamed, so that a crash never leaves half a checkpoint

A new run never writes over a directory that holds a checkpoint (that needs --resume true); the log and
metrics of an earlier attempt that never saved one are started afresh. A resume continues only the run
that was saved: its config must be the saved one except for the fields in the config's RESUMABLE (where
and how the run goes, never what it computes), with the same global batch (batch size x accumulation
steps x processes), and for a transfer run the same teacher file (teacher.TransferConfig).
"""
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict

import torch
import torch.distributed as dist

from checkpoints import CheckpointError, arch_mismatch, read_checkpoint
from config import ConfigError, flag

# -----------------------------------------------------------------------------
# Starting: a new run, or the saved one checked against the command line


def prepare_run_dir(cfg):
    """Refuse to overwrite an earlier run unless resuming it, or a directory that cannot be written.
    Returns the checkpoint path."""
    ckpt = os.path.join(cfg.out_dir, 'checkpoint.pt')
    if os.path.exists(ckpt) and not cfg.resume:
        raise ConfigError(f'{cfg.out_dir} already holds a run; pass --resume true to continue it '
                          f'or choose another --out-dir')
    if cfg.resume and not os.path.exists(ckpt):
        raise ConfigError(f'--resume: no checkpoint at {ckpt}')
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise ConfigError(f'--out-dir {cfg.out_dir} is a file, not a directory: choose another --out-dir')
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f'--out-dir {cfg.out_dir}: cannot make it ({e.strerror}); choose another') from None
    return ckpt


# what engine.fit saves, and of which type: a file without these (or with others in their place) is no run of ours
SAVED = {'model': dict, 'config': dict, 'step': int, 'optimizer': dict, 'rng': list, 'metrics': dict}


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
    conflicts = cfg.resume_conflicts(ck, world)
    if conflicts:
        raise ConfigError(f"--resume: {path} was saved with other settings: {'; '.join(conflicts)}. Resume with "
                          f"the saved ones (only {', '.join(map(flag, cfg.RESUMABLE))} may change) or start a new "
                          f"run in another --out-dir")
    return ck


def restore(ck, env, model, opt, scaler, ema, steps_per_epoch):
    """Load a checked checkpoint into the run's objects; returns (step, metrics, seconds trained so far)."""
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

# -----------------------------------------------------------------------------
# Writing: provenance, checkpoints


def write_provenance(cfg, env):
    """config.json: every field, the git commit, world size, torch version, command. A new run starts
    metrics.jsonl afresh; a resume updates the fields and appends what it changed, never leaving stale values."""
    if not env.main:
        return
    path, now = os.path.join(cfg.out_dir, 'config.json'), asdict(cfg)
    launch = {'git_commit': git_commit(), 'world_size': env.world, 'torch': torch.__version__, 'argv': sys.argv}
    if cfg.resume and os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        changed = {k: [old.get(k), v] for k, v in now.items() if old.get(k) != v}
        record = {**old, **now, 'world_size': env.world,
                  'resumes': old.get('resumes', []) + [{'step': env.resumed['step'], **launch, 'changed': changed}]}
    else:
        record = {**now, **launch}
        if os.path.exists(os.path.join(cfg.out_dir, 'metrics.jsonl')):   # an attempt that never saved a checkpoint
            os.remove(os.path.join(cfg.out_dir, 'metrics.jsonl'))
    with open(path, 'w') as f:
        json.dump(record, f, indent=2)


def git_commit(*args):
    """`git rev-parse HEAD` of this repository ('' outside a git checkout); args: another git command."""
    return subprocess.run(['git', *(args or ('rev-parse', 'HEAD'))], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()


def cpu_name():
    """The processor's model name (speeds differ several-fold between CPUs: every result states it)."""
    if os.path.exists('/proc/cpuinfo'):
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    return platform.processor() or platform.machine()


def rng_states(env):
    """Every rank's torch RNG state (all randomness here is torch's), for exact mid-epoch resume."""
    states = [torch.get_rng_state()] * env.world
    if env.world > 1:
        dist.all_gather_object(states, states[0])
    return states


def save_checkpoint(path, state):
    """To a temporary file, then renamed: a crash never leaves half a checkpoint."""
    torch.save(state, path + '.tmp')
    os.replace(path + '.tmp', path)
