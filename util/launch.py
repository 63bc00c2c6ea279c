"""
How every script starts and how it ends: its config from the command line, one process or many, the device
and precision, seeds, the run directory claimed, and every expected failure as one line.

    cfg, env = start(MyConfig, PRESETS)     # parse, set up processes, device, run directory
    ...                                     # the data, the model, the loop (finetune.py's main)
    run_main(main)                          # at the bottom of the script: errors and Ctrl-C in one line

The same script runs under `python` (one process) and under `torchrun` (RANK / LOCAL_RANK / WORLD_SIZE set:
one process per GPU, a process group over NCCL, or gloo on CPUs). `env` says which process this is, its device
and its autocast dtype; the run directory is util/rundir.py's, its resume rules util/resume.py's.
"""
import argparse
import datetime
import os
import re
import signal
import sys

import torch
import torch.distributed as dist

from util.checkpoints import CheckpointError
from util.cli import parse_config
from util.config import AMP, ConfigError
from util.datafiles import DataError
from util.engine import final_lr, log, seed_all
from util.files import WriteError
from util.resume import how_to_continue, open_resumed
from util.rundir import current_run_dir, prepare_run_dir, unlock
from vit import SIZES

# -----------------------------------------------------------------------------
# Distributed, device, precision


def setup(cfg):
    """Start the process group under torchrun; pick the device and autocast dtype; make the run
    directory (refusing to overwrite another run) or read the checkpoint to resume (checked); seed."""
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    local = int(os.environ.get('LOCAL_RANK', 0))
    check_schedule(cfg, world)
    device = torch.device(f'cuda:{local}' if torch.cuda.is_available() else 'cpu')
    if device.type == 'cuda':   # the current device is the one NCCL, pinned memory and the bf16 check use
        torch.cuda.set_device(device)
    # torchrun starts a process group even for one process: the multi-GPU path, checkable on one GPU. A process
    # that stops (SIGSTOP, a stuck loader) makes the others fail after --dist-timeout, not wait for torch's default
    if (world > 1 or 'TORCHELASTIC_RUN_ID' in os.environ) and not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo',
                                device_id=device if device.type == 'cuda' else None,
                                timeout=datetime.timedelta(seconds=cfg.dist_timeout))
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    env = argparse.Namespace(rank=rank, world=world, device=device, main=rank == 0,
                             dtype=amp_dtype(cfg.amp, device))
    env.attn, env.attn_why = attn_implementation(cfg.attn_implementation, device)
    env.ckpt_path, env.pending, env.claimed = prepare_run_dir(cfg, main=rank == 0), [], False
    env.resumed = open_resumed(cfg, env.ckpt_path, world) if cfg.resume else None
    seed_all(cfg.seed, rank, 0)
    return env


def start(cls, presets):
    """What every script does first: parse its config, set up (processes, device, run directory), say what runs."""
    cfg = parse_config(cls, presets)
    env = setup(cfg)
    log(env, cfg, f'{what_runs(cfg, env)} | loading the data')   # a first line seconds after the start
    log(env, cfg, f'attention: {env.attn} ({env.attn_why})')
    return cfg, env


def check_schedule(cfg, world):
    """Refuse a final lr above the peak: the cosine would raise the lr over the run instead of lowering it."""
    batch = cfg.batch_size * cfg.accum_steps * world
    peak = cfg.blr * batch / 256
    if final_lr(cfg, peak) > peak:
        raise ConfigError(f'--min-lr {cfg.min_lr:g} is above the peak lr {peak:.3g} (--blr {cfg.blr:g} x global batch '
                          f'{batch} / 256): the lr would rise over the run; choose a --min-lr below it, or '
                          f'--min-lr-ratio (a fraction of the peak)')


def what_runs(cfg, env):
    """The run in one line: the script, data set, model size, budget and run directory."""
    size = {**SIZES.get(cfg.model, {}), **{k: getattr(cfg, k) for k in ('embed_dim', 'depth', 'num_heads')
                                           if getattr(cfg, k) is not None}}
    shape = ', '.join(f'{size[k]} {w}' for k, w in (('depth', 'blocks'), ('embed_dim', 'wide'), ('num_heads', 'heads'))
                      if k in size)
    model = (f"a student of the teacher's shape{', ' + shape if shape else ''}" if cfg.model == 'teacher' else
             f'model {cfg.model} ({shape})') + f', {cfg.img_size} px images' + \
        (f' in {cfg.patch_size} px patches' if cfg.patch_size else '')
    cut = f', cut after {cfg.max_steps} steps (--max-steps)' if cfg.max_steps else ''
    return (f'{cfg.SCRIPT or os.path.basename(sys.argv[0])} | --data {cfg.data} | {model} | {cfg.epochs} epoch(s) '
            f'at batch {cfg.batch_size * cfg.accum_steps * env.world}{cut} | {cfg.out_dir}')


def amp_dtype(amp, device):
    """auto: bf16 where the device runs it natively, else fp16 on CUDA (with a GradScaler), else fp32."""
    if amp not in AMP:
        raise ConfigError(f"--amp must be auto, bf16, fp16 or off, not '{amp}'")
    if amp == 'auto':
        if device.type == 'cuda':
            # native only: before Ampere (a T4) bf16 is emulated, slower than fp16 with a GradScaler
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        cpu_bf16 = getattr(torch.cpu, '_is_avx512_bf16_supported', lambda: False)()
        return torch.bfloat16 if cpu_bf16 else None
    return {'bf16': torch.bfloat16, 'fp16': torch.float16, 'off': None}[amp]


# --attn-implementation auto: per device, the one tools/benchmark.py measured faster. CPU (bf16, 1 thread): eager; a
# distillation step on sdpa took 4.8x eager's time at the Fashion-MNIST preset and 1.32x at ViT-B/16 batch 8: torch's
# CPU flash kernel is slow in bf16 backward (results/benchmark/ATTENTION.md). CUDA: sdpa, not yet measured there
# against eager: the H100 profile found explicit maps the cost of distillation (results/benchmark-h100).
AUTO_ATTN = {'cuda': ('sdpa', 'fused kernels, no (N, N) map stored; not yet timed against eager on a GPU'),
             'cpu': ('eager', 'measured faster than sdpa on CPUs (results/benchmark/ATTENTION.md)')}


def attn_implementation(choice, device):
    """(implementation, why) for --attn-implementation: eager writes attention maps out, sdpa never stores one."""
    if choice != 'auto':
        return choice, f'--attn-implementation {choice}'
    implementation, why = AUTO_ATTN.get(device.type, ('eager', 'no fused kernel measured on this device'))
    return implementation, f'--attn-implementation auto on {device.type}: {why}'


# -----------------------------------------------------------------------------
# Ending: expected failures and Ctrl-C as one line


def run_main(main):
    """Run a script's main(); expected failures print one line and exit non-zero, Ctrl-C one line saying how
    to continue (exit 130, as a shell reports SIGINT)."""
    try:
        main()
    except WriteError as e:   # only a training run has a --resume: say so there, never in evaluate.py or a tool
        sys.exit(f'error: {e.what}; {how_to_continue()}' if current_run_dir() else f'error: {e}')
    except (ConfigError, DataError, CheckpointError, FloatingPointError) as e:
        lines = str(e).strip().splitlines()   # raised in a loader worker: the message is its traceback's last line
        sys.exit(f"error: {lines[-1].split(': ', 1)[-1] if 'DataLoader worker' in lines[0] else lines[0]}")
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # a second Ctrl-C does not cut the clean-up short
        print(f'error: stopped (Ctrl-C): {how_to_continue()}', file=sys.stderr, flush=True)
        sys.exit(130)
    except RuntimeError as e:
        if not (dist.is_initialized() and (isinstance(e, dist.DistError) or lost_peer(e))):
            raise
        sys.exit(f'error: process {dist.get_rank()} of {dist.get_world_size()}: {lost_peer(e) or e}: another '
                 f'process stopped, hung or died (each stops after --dist-timeout seconds); {how_to_continue()}')
    finally:
        unlock()
        if dist.is_initialized():
            dist.destroy_process_group()


def lost_peer(e):
    """The words of a gloo / NCCL error that says another process never answered or went away ('' if not one)."""
    found = re.search(r'(Timed out [^\n]*|Connection (closed|reset) [^\n]*|NCCL[^\n]*(timeout|Watchdog)[^\n]*)', str(e))
    return found.group(0).strip() if found else ''
