"""
How every script starts and how it ends. It starts with the resolve phase: every refusal a run can meet before its
first step, in order, before anything is built or written, ending in one immutable Plan that the builders take:

    plan = resolve(MyConfig, PRESETS)      # config, processes and device, schedule, the config's own step,
                                           # the run directory claimed, the resume state checked
    with plan.run_dir:                     # data, (teacher), model, Run, the epoch loop (finetune.py's main)
        ...
    run_main(main)                         # at the bottom of the script: a refusal and Ctrl-C in one line

The command line is the config's dataclass (util/config.py); `--help` lists every flag with the value this line runs
with and where it comes from. The same script runs under `python` (one process) and `torchrun` (one per GPU, NCCL).
"""
import argparse
import contextlib
import dataclasses
import datetime
import os
import signal
import sys
import traceback
import typing
from types import SimpleNamespace
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from util import stop
from util.attention_check import start_up_check
from util.augment import randaugment
from util.config import COMPILE_REPAID, COMPILED_DATA, check, declared
from util.datafiles import DATASETS, held_in_memory
from util.engine import final_lr, seed_all
from util.errors import AGAIN, CheckpointError, ConfigError, DataError, WriteError, flag, say, word
from util.rundir import NOTHING_SAVED, RunDir, add_to_log, open_resumed
from vit import SIZES, set_attn_implementation

# -----------------------------------------------------------------------------
# The resolve phase


class Plan(NamedTuple):
    """What a run is, settled before anything is built: its config, this process (rank of world) and its device,
    the autocast dtype (None: fp32), the attention implementation (why: logged), the run directory (claimed), the
    checkpoint a resume continues (checked, without its tensors), what the config's own resolve step settled
    (a transfer run: teacher.Transfer), and whether the training step is compiled and whether it is captured as one
    CUDA graph (why: logged)."""
    cfg: Any
    rank: int
    world: int
    device: torch.device
    dtype: Any
    attn: str
    run_dir: Any
    resumed: Any
    method: Any
    compiled: bool = False   # the training step compiled (--compile, resolved: compiled_step)
    graphed: bool = False    # the training step captured as one CUDA graph (--cuda-graph, resolved: cuda_graph)

    @property
    def main(self):
        return self.rank == 0

    def log(self, msg):
        self.run_dir.log(msg)


def resolve(cls, presets):
    """Every refusal a run can meet before its first step, in this order; returns the Plan."""
    cfg = parse_config(cls, presets)                    # the config and its rules (config.check)
    rank, world, device = processes(cfg)                # one process, or one of torchrun's
    check_schedule(cfg, world)                          # the lr schedule at this global batch
    attn, why = attn_implementation(cfg.attn_implementation, device,
                                    getattr(cfg, 'written_out', ''))   # why maps are written out
    dtype = amp_dtype(cfg.amp, device)
    graphed, graphed_why = cuda_graph(cfg, device, world, dtype)       # the step as one CUDA graph
    compiled, compiled_why = compiled_step(cfg, device, world, graphed)
    method = None
    if hasattr(cfg, 'resolve'):                         # the config's own step (a teacher's file)
        method = cfg.resolve()
    run_dir = claimed(cfg, rank)                        # the run directory, claimed and locked
    resumed = None
    if cfg.resume:
        with run_dir.released_on_error():               # the checkpoint to continue, checked
            resumed = open_resumed(cfg, run_dir, world, method)
    seed_all(cfg.seed, rank, 0)
    plan = Plan(cfg, rank, world, device, dtype, attn, run_dir, resumed, method, compiled, graphed)
    plan.log(f'{what_runs(plan)} | loading the data')    # a first line seconds after the start
    plan.log(f'attention: {attn} ({why})')
    step = 'compiled' if compiled else 'eager'
    if graphed:
        step += ', captured as one CUDA graph'
    plan.log(f'step: {step} ({graphed_why}; {compiled_why})')
    return plan


def processes(cfg):
    """(rank, world size, device): under torchrun, a process group (NCCL on GPUs, gloo on CPUs); else one process.
    torchrun starts a group even for one process (the multi-GPU path, checkable on one GPU). A process that stops
    (SIGSTOP, a stuck loader) makes the others fail after --dist-timeout, not wait for torch's default."""
    rank = int(os.environ.get('RANK', 0))
    world = int(os.environ.get('WORLD_SIZE', 1))
    local = int(os.environ.get('LOCAL_RANK', 0))
    cuda = torch.cuda.is_available()
    device = torch.device(f'cuda:{local}' if cuda else 'cpu')
    if cuda:   # the current device is the one NCCL, pinned memory and the bf16 check use
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if (world > 1 or 'TORCHELASTIC_RUN_ID' in os.environ) and not dist.is_initialized():
        dist.init_process_group('nccl' if cuda else 'gloo', device_id=device if cuda else None,
                                timeout=datetime.timedelta(seconds=cfg.dist_timeout))
    return rank, world, device


def claimed(cfg, rank):
    """The run directory (RunDir), claimed by the main process alone. The others are told what it found and raise its
    refusal too: every process ends with the same line, and none reads the folder while the main process makes it a
    run's (a .lock made but not yet signed would be another program's to them)."""
    refusal = run_dir = None
    try:
        run_dir = RunDir(cfg, main=rank == 0)
    except ConfigError as e:
        refusal = e
    if dist.is_initialized():
        told = [refusal]
        dist.broadcast_object_list(told, src=0)
        refusal = told[0]
    if refusal is not None:
        raise refusal
    return run_dir


def check_schedule(cfg, world):
    """Refuse a final lr above the peak: the cosine would raise the lr over the run instead of lowering
    it."""
    batch = cfg.batch_size * cfg.accum_steps * world
    peak = cfg.blr * batch / 256
    if final_lr(cfg, peak) > peak:   # blr 0: 0 (final_lr), a run whose weights stay as loaded
        raise ConfigError(f'--min-lr {cfg.min_lr:g} is above the peak lr {peak:.3g} (--blr '
                          f'{cfg.blr:g} x global batch {batch} / 256): the lr would rise over the '
                          f'run; choose a --min-lr below it, or --min-lr-ratio (a fraction of the '
                          f'peak)')


def amp_dtype(amp, device):
    """auto: bf16 where the device runs it natively, else fp16 on CUDA (with a GradScaler), else fp32; `amp` is one of
    config.AMP, as every config's rule for --amp holds."""
    if amp == 'auto':
        if device.type == 'cuda':
            # native only: before Ampere (a T4) bf16 is emulated, slower than fp16 with a GradScaler
            if torch.cuda.is_bf16_supported(including_emulation=False):
                return torch.bfloat16
            return torch.float16
        return torch.bfloat16 if torch.cpu._is_avx512_bf16_supported() else None
    return {'bf16': torch.bfloat16, 'fp16': torch.float16, 'off': None}[amp]


# auto: per device, the one measured faster there; sdpa is also checked against the definition at every run's start
AUTO_ATTN = {'cuda': ('sdpa', 'fused kernels, no (N, N) map stored; measured faster than eager on '
                             'an H100 and an H200 (results/benchmark-h100/sdpa, '
                             'results/benchmark-h200)'),
             'cpu': ('eager', 'measured faster than sdpa on CPUs (results/benchmark/ATTENTION.md)')}


# --compile auto: compiled on a GPU where a small data set, held in its memory, trains long enough to repay the
# compilation. On one H200 (results/benchmark-h200/round7), on Fashion-MNIST's preset, the first 10 compiled steps
# (the compilation in them, the optimizer's step compiled too then: util/engine.build_optimizer) took 41 s for
# fine-tuning and 25 s for distillation, then each step ran 3.2x and 4.2x faster than eager
# (16 -> 5.0 ms, 23 -> 5.6 ms): repaid after about 3,800 and 1,400 steps; a run of one epoch (468 steps) took 62 s
# compiled, 19 s eager; CIFAR's step was not measured. A step captured as one CUDA graph (util/engine.GraphedStep)
# launches the eager kernels without the host's wait: a compilation on top could repay itself only by what fusing
# kernels saves of a step's 2.15 ms of kernels (round7's profile; the graphed step replays in 2.27 ms: round8), which
# was never measured; so auto does not compile a graphed step (--compile true still does).


def compiled_step(cfg, device, world=1, graphed=False):
    """(whether the training step is compiled, why) for --compile: true and false as said; auto compiles on a GPU for a
    data set held in memory whose training split's size is declared (config.COMPILED_DATA) in a run of at least
    COMPILE_REPAID steps, its step not captured as one CUDA graph, and nowhere else: a CPU runs eager (the
    committed CPU runs' path), ImageNet's step is long enough to keep the GPU busy, and --data fake's runs last
    seconds."""
    if cfg.compile != 'auto':
        return cfg.compile == 'true', f'--compile {cfg.compile}'
    auto = f'--compile auto on {device.type}'
    if device.type != 'cuda':
        return False, f'{auto}: eager, as the committed CPU runs'
    if graphed:
        return False, f'{auto}: eager inside the CUDA graph (a compilation on top was never measured to repay itself)'
    if cfg.data not in COMPILED_DATA:
        return False, f"{auto} with --data {cfg.data}: compiled only for {', '.join(COMPILED_DATA)}"
    batch = cfg.batch_size * cfg.accum_steps * world
    steps = cfg.epochs * -(-DATASETS[cfg.data].train_images // batch)
    steps = min(steps, cfg.max_steps or steps)
    if steps < COMPILE_REPAID:
        return False, f'{auto}: {steps} steps do not repay a compilation (at least {COMPILE_REPAID}, measured on an ' \
                      f'H200)'
    return True, f'{auto} with --data {cfg.data}: {steps} steps repay the compilation (measured on an H200)'


def cuda_graph(cfg, device, world, dtype):
    """(whether the training step is captured as one CUDA graph, why) for --cuda-graph: where a run allows one (one
    process on a GPU and no process group, one micro-batch a step, no GradScaler: bf16 or fp32), true captures it (else
    refused) and auto captures it for a data set held in memory (a folder's step is long, its batches made by workers);
    false never. Under torchrun, even of one process, the model is wrapped in DDP, whose capture torch's notes ask to
    follow 11 warm-up steps on a side stream and whose all-reduce is not captured here: eager."""
    allows = [(device.type == 'cuda', f'no GPU here ({device.type})'),
              (world == 1, f'{world} processes (their all-reduce is not captured here)'),
              (not dist.is_initialized(), 'a process group (torchrun, even of one process: its DDP step is not '
                                          'captured here)'),
              (cfg.accum_steps == 1, f'--accum-steps {cfg.accum_steps} (a graph replays one micro-batch a step)'),
              # for most optimizers GradScaler.step reads on the host whether the gradients overflowed
              (dtype != torch.float16, "fp16's GradScaler (torch's notes on CUDA graphs keep its step out of "
                                       "a capture; bf16 and fp32 are captured: --amp)")]
    blocked = next((why for holds, why in allows if not holds), '')
    if cfg.cuda_graph == 'false':
        return False, '--cuda-graph false'
    if cfg.cuda_graph == 'true':
        if blocked:
            raise ConfigError(f'--cuda-graph true needs one process on a GPU (no torchrun), --accum-steps 1 and bf16 '
                              f'or fp32: '
                              f'here {blocked}; use --cuda-graph auto or false')
        return True, '--cuda-graph true'
    auto = f'--cuda-graph auto on {device.type}'
    if blocked:
        return False, f'{auto}: eager, {blocked}'
    if not held_in_memory(cfg):
        return False, f'{auto} with --data {cfg.data}: eager, its images read from files by loader workers'
    return True, f'{auto}: one process, one micro-batch a step, autocast {dtype}, the set held in memory'


def attn_implementation(choice, device, written_out=''):
    """(implementation, why) for --attn-implementation: eager writes maps out, sdpa never stores one; where the run
    needs its maps written out (written_out: why, the config's), auto picks eager and sdpa is refused."""
    if choice == 'sdpa' and written_out:
        raise ConfigError(f'{written_out}: with --attn-implementation eager or auto')
    if choice != 'auto':
        return choice, f'--attn-implementation {choice}'
    implementation, why = ('eager', written_out) if written_out else AUTO_ATTN[device.type]
    return implementation, f'--attn-implementation auto on {device.type}: {why}'


def on_device(models, cfg, dataset):
    """(the models on the GPU if there is one, their attention as --attn-implementation says once the start-up check
    has run each one's first layer forward on dataset's first images, as many as a batch they are scored in (a
    kernel's grid grows with the batch); a `place` for predict_all; the attention, why)."""
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    # a model whose maps are written out (a copy student's averaged maps: teacher.written_out) keeps them so
    written = next((m.written_out for m in models if getattr(m, 'written_out', '')), '')
    attn, why = attn_implementation(cfg.attn_implementation, device, written)
    # what predict_all reads (device, dtype) and what start_up_check reads of a plan
    place = SimpleNamespace(device=device, dtype=amp_dtype(cfg.amp, device), attn=attn, cfg=cfg, log=say)
    models = [m.to(device) for m in models]
    x = torch.stack([dataset[i][0] for i in range(min(cfg.batch_size, len(dataset)))]).to(device)
    # the ViT running its own attention first (a copy's teacher)
    vits = [getattr(m, 'teacher', m) for m in models]
    layers = {f'model {i} layer 0': v.blocks[0].attn for i, v in enumerate(vits, 1)}

    def first_layers():
        return [v.forward_tokens(x, depth=1) for v in vits]

    checked, _ = start_up_check(place, 'evaluation', models, first_layers, layers, backward=False)
    for m in models:   # told once, the verdict
        set_attn_implementation(m, checked)
    return models, place, f'{attn} ({why})' if checked == attn else 'eager (the start-up check)'


def what_runs(plan):
    """The run in one line: the script, data set, model size, budget and run directory."""
    cfg = plan.cfg
    # a flag's value, else the size's own (none for a teacher-shaped student)
    size = SIZES.get(cfg.model, {})
    words = {'depth': 'blocks', 'embed_dim': 'wide', 'num_heads': 'heads'}
    shape = ', '.join(f'{getattr(cfg, k) or size[k]} {w}' for k, w in words.items()
                      if getattr(cfg, k) or k in size)
    model = f'model {cfg.model}' if cfg.model != 'teacher' else "a student of the teacher's shape"
    if shape:
        model += f' ({shape})'
    model += f', {cfg.img_size} px images'
    if cfg.patch_size:
        model += f' in {cfg.patch_size} px patches'
    budget = f'{cfg.epochs} epoch(s) at batch {cfg.batch_size * cfg.accum_steps * plan.world}'
    if cfg.max_steps:
        budget += f', cut after {cfg.max_steps} steps (--max-steps)'
    return f'{cfg.SCRIPT} | --data {cfg.data} | {model} | {budget} | {cfg.out_dir}'

# -----------------------------------------------------------------------------
# Ending: a refusal and Ctrl-C as one line, anything else with its traceback

# what the project raises for input it refuses (a file, a flag, data; a write that failed, a run that diverged): each
# one line naming the fix
REFUSALS = (ConfigError, DataError, CheckpointError, FloatingPointError)


def run_main(main):
    """Run a script's main(): a refusal ends in its one line and a non-zero exit, Ctrl-C in one line saying how to
    continue (exit 130, as a shell reports SIGINT); SIGUSR1 or SIGTERM while the run trains in the checkpoint of the
    step reached and exit stop.SAVED_AND_STOPPED (util/stop.py); anything else (a bug, a learner's own; a fault no
    check foresaw) shows its traceback, then one line. An error that left a run directory carries how to continue that
    run and where its log is (RunDir.__exit__)."""
    stop.start()
    signal.signal(signal.SIGINT, signal.default_int_handler)   # a script's imports exit 130 quietly till here
    for signum in stop.SIGNALS:                                 # a scheduler's
        signal.signal(signum, save_and_stop)
    signal.signal(signal.SIGHUP, stopped)                       # a closed terminal
    try:
        main()
        stop.ended('finished')
        if dist.is_initialized():   # the group let go by every process at once, none while another still uses it
            dist.barrier()
    except stop.SavedAndStopped as e:     # its line said (Run.save_and_stop)
        # saved: the signals torchrun sends a process once another has ended change nothing (an interpreter that
        # is ending has no handler of its own left: it would die of them)
        for signum in stop.SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        stop.ended('saved', e.args[0])
        sys.exit(stop.SAVED_AND_STOPPED)
    except KeyboardInterrupt as e:   # Ctrl-C, SIGTERM or SIGHUP (stopped): the loader's workers end with it
        # a second Ctrl-C does not cut the clean-up short
        for signum in (signal.SIGINT, *stop.SIGNALS, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        how = e.args[0] if e.args else 'Ctrl-C'
        scheduler = how in (s.name for s in stop.SIGNALS)   # before the run trained: nothing lost, go on
        stop.ended('stopped before training' if scheduler else 'stopped')
        then = getattr(e, 'how_to_continue', AGAIN)
        print(f'error: stopped ({how}): {then}', file=sys.stderr, flush=True)
        # as a shell reports the signal: 128 + its number
        sys.exit(128 + (signal.SIGINT if how == 'Ctrl-C' else signal.Signals[how]))
    except REFUSALS as e:
        stop.ended('failed')
        sys.exit(f'error: {refusal(e)}')
    except Exception as e:
        stop.ended('failed')
        # said first: torchrun stops the other processes as soon as one dies
        if 'TORCHELASTIC_RUN_ID' in os.environ:
            for signum in (signal.SIGINT, *stop.SIGNALS, signal.SIGHUP):
                signal.signal(signum, signal.SIG_IGN)
        sys.exit(f'error: {unexpected(e)}')
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def refusal(e):
    """A refusal in one line, as it says (a write that failed: with how to continue the run, or outside one, to run
    the command again)."""
    if isinstance(e, WriteError):
        return f"{e}; {getattr(e, 'how_to_continue', AGAIN)}"
    lines = str(e).strip().splitlines() or ['']
    if 'DataLoader worker' in lines[0]:   # raised in a loader worker: its traceback's last line
        return lines[-1].split(': ', 1)[-1]
    return lines[0]


def unexpected(e):
    """An error no check foresaw: its traceback printed on stderr and added to the run's log where there is one; the
    line after it names the error, where the traceback is, and the run's last checkpoint where one was saved (no
    advice to run the same command again: a bug would meet it again)."""
    shown = ''.join(traceback.format_exception(e))
    print(shown, end='', file=sys.stderr, flush=True)
    said = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]} (its traceback above"
    log = getattr(e, 'log', None)
    if log:
        with contextlib.suppress(WriteError):   # a full disk: the screen has it
            add_to_log(log, shown)
            said += f'; in {log} too'
    said += ')'
    if isinstance(e, BlockingIOError):   # EAGAIN: fork() refused at the process limit (loader workers)
        said += '; more processes than this machine allows: lower --num-workers'
    if dist.is_initialized():   # gloo's words for a peer gone are a bare RuntimeError's
        said = f'process {dist.get_rank()} of {dist.get_world_size()}: {said}; if another ' \
               f'process stopped, hung or died, each stops after --dist-timeout seconds'
    how = getattr(e, 'how_to_continue', NOTHING_SAVED)
    return said if how == NOTHING_SAVED else f'{said}; {how}'


def stopped(signum, frame):
    """SIGHUP (a closed terminal) stops the run as Ctrl-C does: its checkpoint kept, its loader workers ended with
    it, one line."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def save_and_stop(signum, frame):
    """SIGUSR1 (SLURM's, ahead of a time limit) or SIGTERM (a preemption's, `kill`'s): while the run trains, noted,
    and every process saves the step they agree on and ends (util/stop.py); a second signal, or one during that save,
    changes nothing. Before the run trains (and in a script that trains nothing) it stops the run as Ctrl-C does:
    nothing was trained since its checkpoint."""
    if not stop.training:
        stopped(signum, frame)
    stop.asked.append(signum)

# -----------------------------------------------------------------------------
# The command line of a config


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line, a non-zero exit, no usage dump; with --help asked for, the help."""
        if {'-h', '--help'} & set(sys.argv[1:]):
            say(self.format_help())
            sys.exit(0)
        sys.exit(f"error: {message.removeprefix('argument ')} (see --help)")


def _typed(tp):
    """(argparse's type=, metavar) for one value of annotation tp: none for an Optional[X]'s None, true or false
    for a bool."""
    if typing.get_origin(tp) is typing.Union:   # Optional[X]
        inner, metavar = _typed(typing.get_args(tp)[0])
        return (lambda s: None if s.lower() == 'none' else inner(s)), metavar
    if tp is bool:
        def to_bool(s):
            if s.lower() not in ('true', 'false'):
                raise argparse.ArgumentTypeError(f"expected true or false, got '{s}'")
            return s.lower() == 'true'
        return to_bool, 'BOOL'
    return tp, tp.__name__.upper()


def parse_config(cls, presets=None, argv=None, preset_label='preset of --data {}', checked=True):
    """cls's defaults < presets[--data] < command line. Unknown keys and bad values are errors:
    wrong types exit at once, values out of range raise ConfigError (check; a --randaug string
    util/augment.py cannot run: its own words), before anything is made.
    --help prints every flag's value for this command line (preset_label names where a preset's come from).
    checked False: no check, and no --help (a first parse that only picks the presets: the next one prints it)."""
    presets = presets or {}
    given = vars(parser(cls, presets, {}).parse_args(argv))
    asked_help = given.pop('help', False)
    data = given.get('data', getattr(cls, 'data', None))
    preset = presets.get(data, {})
    cfg = cls(**{**preset, **given})
    if not checked:
        return cfg
    if asked_help:   # before check(): the help of a line that would be refused is still shown
        lines = help_lines(cfg, given, preset, preset_label.format(data))
        say(parser(cls, presets, lines).format_help())
        sys.exit(0)   # say: `| head` may close the pipe, with no traceback
    check(cfg)
    # the --randaug string, read by the augmentation that runs it: its ValueError names the fix
    try:
        randaugment(getattr(cfg, 'randaug', ''))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg


def help_lines(cfg, given, preset, label):
    """{field: its line in --help}: the value this command line runs with, where it comes from (your flag, the
    preset `label`, the default), and the field's sentence."""
    notes = declared(type(cfg))
    out = {}
    for k, v in dataclasses.asdict(cfg).items():
        source = 'your flag' if k in given else label if k in preset else 'default'
        out[k] = f'{word(v)} ({source})'
        if 'help' in notes[k]:
            out[k] += f"; {notes[k]['help']}"
    return out


def parser(cls, presets, helps):
    """The command line of a config: --key-name VALUE for each field, typed by its annotation; helps: {field: its
    line in --help} ('%' escaped: argparse formats help strings), {} for parsing alone."""
    doc = (sys.modules[cls.__module__].__doc__ or '').strip().split('\n\n')[0]   # as written
    epilog = None
    if presets:
        epilog = f"--data picks a preset ({', '.join(presets)}), applied before your flags:\n" \
                 f"`--data X --help` shows the values under X's."
    p = _Parser(allow_abbrev=False, add_help=False, description=doc,
                formatter_class=argparse.RawDescriptionHelpFormatter,
                usage='%(prog)s [--flag value ...]', epilog=epilog,
                argument_default=argparse.SUPPRESS)   # a field not given: not in the namespace
    p.add_argument('-h', '--help', action='store_true',
                   help="show each flag's value for this command line, where it comes from, and "
                        "what it means")
    notes = declared(cls)
    for f in dataclasses.fields(cls):
        many = typing.get_origin(f.type) is list    # list[X]: --key a b c
        converter, metavar = _typed(typing.get_args(f.type)[0] if many else f.type)
        # its dest: --key-name -> key_name
        p.add_argument(flag(f.name), nargs='+' if many else None, type=converter, metavar=metavar,
                       choices=notes[f.name].get('choices'),
                       help=helps.get(f.name, '').replace('%', '%%'))
    return p
