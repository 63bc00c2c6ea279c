"""
The paper's Table 1 in miniature: every method, several seeds, one command.

    python -m tools.reproduce --data fashion-mnist --quick true  # 1 seed, 160 steps of 64 a stage, from the shipped teacher
    python -m tools.reproduce --data fashion-mnist --quick true --amp off   # the same in fp32, as a CPU without bf16
    python -m tools.reproduce --data fashion-mnist               # 3 seeds, 3 epochs a stage, from the shipped teacher
    python -m tools.reproduce --data fashion-mnist --teacher ''  # the same, pre-training its own teacher first
    python -m tools.reproduce --data cifar10                     # 3 seeds: under an hour on one GPU (estimated)

Each stage is its script's command line, its `--data` preset plus a budget: `mae` (the teacher, once; `--teacher`
skips it), then per seed `scratch`, `finetune` (--init <teacher>), `copy`, `distill` (--teacher <teacher>) and
`ensemble`, into runs/reproduce/<data>/<stage>/seed<k>. A teacher with components beyond a plain ViT (layer scale, a
pre-norm, QuickGELU) gives them to scratch and finetune as to the students of copy and distill (teacher_components).
`plan` writes every command line, and `preflight` checks every stage's inputs, before any stage runs; then the
teacher, the training stages `--jobs` at a time, the ensembles. A stage's done.json (its command, wall time, metrics,
teacher's SHA-256) means finished and skipped; a checkpoint alone, resumed: a reproduction stopped by Ctrl-C or
SIGTERM (which stop its running stages too) continues with the same command. A failed stage starts no other. The
report (reproduce_report.py): results.json, results.png, TABLE.md and the logs, in --results-dir (results/<data>: the
committed ones). A run's number is its final epoch's top-1.
"""
import importlib
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch

from tools.reproduce_report import check_results_dir, records, summarise, table, write
from teacher import components
from util.checkpoints import CheckpointError, arch_of, read_checkpoint
from util.config import (AMP, BATCH, EPOCHS, STEPS, WORKERS, ConfigError, at_least, component_flags,
                         option)
from util.errors import DataError
from util.files import cpu_name, git_commit, read_json, sha256_of, write_json
from util.launch import parse_config, run_main

# -----------------------------------------------------------------------------
# Config


# Budgets, chosen on the validation split, never on test (results/fashion-mnist/VALIDATION.md, "budget"); cifar's
# is an estimate from FLOPs for one GPU (REFERENCE.md), not measured
PRESETS = {
    'fashion-mnist': dict(teacher='teachers/fashion-mnist-mae.pt', mae_epochs=24, epochs=3,
                          blr=4e-3),
    'cifar10': dict(mae_epochs=50, epochs=20),
    'cifar100': dict(mae_epochs=50, epochs=20),
    'fake': dict(seeds=[0], mae_epochs=1, epochs=1, max_steps=2, fake_size=256, num_workers=0),
}


@dataclass
class ReproduceConfig:
    data: str = option('fashion-mnist', "every script's --data (ImageNet: the scripts' recipes)",
                       choices=tuple(PRESETS))
    data_dir: str = './data'
    seeds: list[int] = option(factory=lambda: [0, 1, 2],
                              rule=(lambda v: (len(set(v)) == len(v)
                                               and 0 <= min(v) <= max(v) < 2 ** 63),
                                    'each seed once, in [0, 2**63)'))
    teacher: str = option('', 'a checkpoint file or name; empty = pre-train one (stage mae); '
                          'the fashion-mnist preset: the shipped teacher (teachers/README.md)')
    quick: bool = option(False, '1 seed, a 1-epoch schedule cut after 160 steps of 64 a stage: '
                         'checks the pipeline, is not a result')
    val_size: int = option(0, 'every stage evaluates on this many held-out training images, '
                           'not on test: the split to choose a budget on; dirs get a -val suffix',
                           at_least(0, 'the test split', STEPS))
    out_dir: str = option('', 'run directories; empty = runs/reproduce/<data>[-quick][-val]')
    results_dir: str = option('', 'results.json, results.png, TABLE.md, logs/; '
                              'empty = <out_dir>/results. The committed ones are refreshed only '
                              'when named: results/<data>[-quick]')
    replace_results: bool = option(False, "--results-dir may hold another reproduction's results "
                                   '(other data, preset or teacher): replace them; '
                                   'without it they are refused, never mixed')
    mae_epochs: int = option(10, 'every stage warms up for a tenth of its epochs, '
                                 "as the scripts' presets do",
                             at_least(1, most=EPOCHS))
    epochs: int = option(2, 'each of scratch, finetune, copy, distill', at_least(1, most=EPOCHS))
    blr: float = option(0.0, 'base lr of scratch, finetune, copy and distill; '
                             "0 = each script's preset",
                        at_least(0, "each script's own"))
    batch_size: int = option(0, 'batch of scratch, finetune, copy and distill; '
                                "0 = each script's preset",
                             at_least(0, "each script's own", BATCH))
    max_steps: int = option(0, 'cut every stage short after this many steps, '
                               'its schedule still the whole --epochs one '
                               "(the scripts' --max-steps); 0 = the whole schedule",
                            at_least(0, 'the whole schedule', STEPS))
    num_workers: typing.Optional[int] = option(None, "None = each script's preset",
                                               at_least(0, most=WORKERS))
    jobs: int = option(0, 'training stages side by side, each a process on 1/jobs of the CPU threads '
                       '(OMP_NUM_THREADS, unless you set it); 0 = auto: on a CPU 1 (fashion-mnist: 2), '
                       'on a GPU as many as its free memory (4 GiB a stage) and CPU cores hold',
                       at_least(0, 'auto', WORKERS))
    amp: str = option('auto', "every stage's --amp: auto (bf16 where the device has it) | "
                      'bf16 | fp16 | off (off: fp32, what a CPU without bf16 runs)', choices=AMP)
    fake_size: int = option(2048, '--data fake only', at_least(1, most=STEPS))


QUICK = dict(seeds=[0], mae_epochs=1, epochs=1, max_steps=160, batch_size=64, blr=8e-3)


def parse(argv=None):
    """Defaults < --data's preset < --quick's < your flags (--help shows them for that choice)."""
    cfg = parse_config(ReproduceConfig, PRESETS, argv, checked=False)
    if not cfg.quick:
        return parse_config(ReproduceConfig, PRESETS, argv)
    quick = {k: {**v, **QUICK} for k, v in PRESETS.items()}
    return parse_config(ReproduceConfig, quick, argv, 'preset of --data {} with --quick true')

# -----------------------------------------------------------------------------
# The plan: every stage's command line, before any runs


# the repository: the scripts
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {'mae': 'mae_pretrain.py', 'scratch': 'finetune.py', 'finetune': 'finetune.py',
           'copy': 'attention_copy.py', 'distill': 'attention_distill.py',
           'ensemble': 'ensemble.py'}
# the longest first: the last to run, maybe alone, are short
ORDER = ['distill', 'copy', 'scratch', 'finetune']
USES_TEACHER = ('finetune', 'copy', 'distill')


def run_dir(root, stage, seed):
    if stage == 'mae':
        return os.path.join(root, 'mae')
    return os.path.join(root, stage, f'seed{seed}')


def command(cfg, stage, seed, root, teacher, parts=None):
    """[python, script, flags]: the script's own --data preset, then this reproduction's budget. parts: the
    teacher's components beyond a plain ViT (teacher_components), which scratch and finetune are built with too."""
    args = ['--data', cfg.data, '--data-dir', cfg.data_dir, '--seed', seed]
    if cfg.data == 'fake':
        args += ['--fake-size', cfg.fake_size]
    if cfg.num_workers is not None:
        args += ['--num-workers', cfg.num_workers]
    if cfg.val_size:
        args += ['--val-size', cfg.val_size]
    if cfg.amp != 'auto':   # auto: the scripts' own default, left unsaid
        args += ['--amp', cfg.amp]
    if stage == 'ensemble':   # its result is the stage's own, made anew whatever the file holds
        models = [os.path.join(run_dir(root, s, seed), 'checkpoint.pt')
                  for s in ('finetune', 'distill')]
        out = os.path.join(run_dir(root, stage, seed), 'ensemble.json')
        args += ['--models', *models, '--out', out, '--overwrite', 'true']
    else:
        epochs = cfg.mae_epochs if stage == 'mae' else cfg.epochs
        args += ['--out-dir', run_dir(root, stage, seed), '--epochs', epochs,
                 '--warmup-epochs', epochs / 10, '--max-steps', cfg.max_steps]
        # the MAE encoder normalises every token: no global pooling, whatever the preset says
        if stage == 'mae':
            args += ['--global-pool', 'false']
        else:
            if cfg.blr:
                args += ['--blr', cfg.blr]
            if cfg.batch_size:
                args += ['--batch-size', cfg.batch_size]
            if stage in ('scratch', 'finetune'):
                args += component_flags(parts or {})
            if stage == 'finetune':
                args += ['--init', teacher]
            elif stage in ('copy', 'distill'):
                args += ['--teacher', teacher]
    return [sys.executable, os.path.join(ROOT, SCRIPTS[stage]), *map(str, args)]


def plan(cfg, root, teacher, parts=None):
    """[((stage, seed), command line)] in the order they start:
    the teacher, every seed's training stages, ensembles."""
    stages = []
    if not cfg.teacher:
        stages.append(('mae', 0))
    stages += [(s, k) for s in ORDER for k in cfg.seeds]
    stages += [('ensemble', k) for k in cfg.seeds]
    return [((s, k), command(cfg, s, k, root, teacher, parts)) for s, k in stages]


def teacher_components(cfg):
    """The components beyond a plain ViT (layer scale, a pre-norm, an activation: teacher.components) of the teacher
    --teacher names. Copy and distillation give them to their students (--student-arch auto); scratch and fine-tune
    are built with them too, so that the table compares students of one architecture, which the teacher's attention
    alone sets apart (and fine-tuning loads the teacher's weights into its own). {} for the teacher that stage mae
    pre-trains, a plain ViT: then every command is the one a plain teacher has."""
    if not cfg.teacher:
        return {}
    return components(arch_of(read_checkpoint(cfg.teacher), cfg.teacher, 0, '--teacher-num-heads'))


CONFIGS = {'mae_pretrain.py': 'MAEConfig', 'finetune.py': 'FinetuneConfig',
           'attention_copy.py': 'CopyConfig', 'attention_distill.py': 'DistillConfig',
           'ensemble.py': 'EnsembleConfig'}


def preflight(steps, with_teacher):
    """Every stage's flags checked before the first stage runs, as its script's resolve phase checks them: its
    config's rules, and with_teacher (given, or made already), the teacher read and fitted to the stage's model
    (--init of finetune, --teacher of copy and distill): a missing file, not a ViT, a copy student refused. A
    refusal names the stage, and nothing has run."""
    for (stage, seed), argv in steps:
        script = os.path.basename(argv[1])
        module = importlib.import_module(script[:-3])
        try:
            presets = module.presets(argv[2:]) if script == 'finetune.py' else module.PRESETS
            cfg = parse_config(getattr(module, CONFIGS[script]), presets, argv[2:])
            if stage in USES_TEACHER and with_teacher:
                cfg.resolve()
        # SystemExit: a flag that does not parse
        except (SystemExit, ConfigError, CheckpointError, DataError) as e:
            raise ConfigError(f'stage {tag(stage, seed)}: {e}') from None


def read_done(d, stage):
    """A finished stage's done.json (and a training stage's metrics.jsonl read, so that a damaged one is
    refused before any stage runs)."""
    done = read_json(os.path.join(d, 'done.json'),
                     'delete it and run the same command again: the stage is finished from its '
                     'checkpoint (an ensemble runs again)')
    if stage not in ('mae', 'ensemble'):
        records(d)
    return done

# -----------------------------------------------------------------------------
# Running a stage: its command line in a process, its output shown tagged, done.json when it exits cleanly


# --jobs auto on a CPU where more than one was measured faster: two one-thread Fashion-MNIST stages got through 1.36x
# the work of one on 2 cores (results/fashion-mnist/VALIDATION.md, "jobs"); elsewhere one
CPU_JOBS = {'fashion-mnist': 2}
# --jobs auto on a GPU: a stage's share of its memory (a CUDA context, the set held, a small model's step and its
# compilation), a rule with room to spare, not a measurement
GPU_STAGE_BYTES = 4 * 2 ** 30


def jobs_at_a_time(cfg, stages):
    """(training stages side by side, why): --jobs, or for 0 (auto) on a CPU CPU_JOBS's (else 1); on a GPU one a
    GPU_STAGE_BYTES of its free memory and a CPU core (each stage's process launches its own steps), at most
    `stages` (those to run) and at least 1. Each stage is its own process with its own seeds: its results are those
    it gets run alone (its thread count aside: OMP_NUM_THREADS, stage_env)."""
    if cfg.jobs:
        return cfg.jobs, f'--jobs {cfg.jobs}'
    if not torch.cuda.is_available():
        n = CPU_JOBS.get(cfg.data, 1)
        return n, f'--jobs auto on a CPU with --data {cfg.data}'
    free = torch.cuda.mem_get_info()[0]
    cores = os.cpu_count() or 1
    n = max(1, min(stages, cores, free // GPU_STAGE_BYTES))
    return n, (f'--jobs auto on a GPU: {free / 2 ** 30:.0f} GiB free at 4 GiB a stage, {cores} CPU cores, '
               f'{stages} stages to run')


def stage_env(cfg):
    """With --jobs above 1, each stage's share of the CPU threads,
    unless OMP_NUM_THREADS is set already."""
    env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
    if cfg.jobs > 1 and 'OMP_NUM_THREADS' not in env:
        env['OMP_NUM_THREADS'] = str(max(1, (os.cpu_count() or 1) // cfg.jobs))
    return env


def tag(stage, seed):
    return stage if stage == 'mae' else f'{stage} seed {seed}'


def run_stage(key, argv, root, env, record, failed):
    """Run one stage unless a stage has failed; returns its done.json record, or None if it did not run. `failed`
    collects the failures, and holds the running stages' processes (a SIGTERM stops them)."""
    stage, seed = key
    d = run_dir(root, *key)
    name = tag(*key)
    resumed = stage != 'ensemble' and os.path.exists(os.path.join(d, 'checkpoint.pt'))
    if resumed:
        argv = argv + ['--resume', 'true']
    if failed:
        return None
    # each line in one write (print writes its end apart): stages side by side never run two lines into one
    print(f"== {name}: {'resuming' if resumed else 'running'} {shlex.join(argv[1:])}\n", end='',
          flush=True)
    start = time.time()
    last = ''
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env) as p:
        failed.processes.append(p)
        for line in p.stdout:
            print(f'   {name} | {line.rstrip()}\n', end='', flush=True)
            last = line.strip().removeprefix('error: ') or last
    if p.returncode:
        failed.append(f'{name} failed (exit {p.returncode}): {last} | run directory {d}')
        return None
    if stage == 'ensemble':
        r = read_json(os.path.join(d, 'ensemble.json'),
                      'run the same command again (the ensemble stage makes it anew)')
        metrics = {**r['ensemble'], 'disagreement': r['disagreement'][0]['rate'],
                   'models': r['models']}
    else:
        metrics = records(d)[-1]
    if stage in USES_TEACHER:   # the teacher it trained from: its own digest of the bytes it loaded
        run = read_json(os.path.join(d, 'config.json'), 'delete the run directory and run the same command again')
        trained_from = run.get('teacher_sha256') or run.get('init_sha256')
        if trained_from != record['teacher_sha256']:
            failed.append(f"{name} trained from a teacher file other than the other stages' (it changed while "
                          f'the reproduction ran): put the teacher back, delete {d} and run the same command again')
            return None
    done = {'stage': stage, 'seed': seed, 'command': argv, 'resumed': resumed, 'started': start,
            'wall_s': time.time() - start, 'metrics': metrics, **record}
    write_json(os.path.join(d, 'done.json'), done)
    return done


class Failures(list):
    """The stages that failed, and the processes of those started:
    SIGTERM stops them too, then this one, in a line."""
    def __init__(self):
        super().__init__()
        self.processes = []

    def stop(self, *_):
        for p in self.processes:
            p.terminate()
        sys.exit('error: stopped (SIGTERM), and the running stages with it: '
                 'run the same command again to continue')


def run_side_by_side(steps, jobs, root, env, record, failed):
    """{key: done.json record} of the steps that ran, `jobs` at a time;
    a failed one starts no other."""
    with ThreadPoolExecutor(jobs) as pool:
        futures = {key: pool.submit(run_stage, key, argv, root, env, record, failed)
                   for key, argv in steps}
    if failed:
        sys.exit(f"error: {'; '.join(failed)}; fix the cause and run the same command again "
                 f"to continue")
    return {key: f.result() for key, f in futures.items()}

# -----------------------------------------------------------------------------
# Main


def main():
    cfg = parse()
    name = cfg.data
    if cfg.quick:
        name += '-quick'
    if cfg.val_size:
        name += '-val'
    root = cfg.out_dir or os.path.join('runs', 'reproduce', name)
    results_dir = cfg.results_dir or os.path.join(root, 'results')
    teacher = cfg.teacher or os.path.join(run_dir(root, 'mae', 0), 'checkpoint.pt')
    steps = plan(cfg, root, teacher, teacher_components(cfg))
    # what can be refused, before any stage runs: the finished stages' records, where the results go, the teacher
    digest = sha256_of(teacher)
    done = {key: read_done(run_dir(root, *key), key[0]) for key, _ in steps
            if os.path.exists(os.path.join(run_dir(root, *key), 'done.json'))}
    for (stage, seed), r in done.items():
        if stage in USES_TEACHER and r.get('teacher_sha256') != digest:
            raise ConfigError(f"{run_dir(root, stage, seed)} was made from another teacher, "
                              f"not from {teacher} (by their sha256): put that file back, "
                              f"or choose another --out-dir to run every stage from this one")
    check_results_dir(results_dir, cfg, digest)
    todo = [(key, argv) for key, argv in steps if key not in done]
    preflight(todo, bool(cfg.teacher) or os.path.exists(teacher))
    device = f'cuda ({torch.cuda.get_device_name(0)})' if torch.cuda.is_available() else 'cpu'
    jobs, why = jobs_at_a_time(cfg, max(1, sum(key[0] in ORDER for key, _ in todo)))
    cfg = replace(cfg, jobs=jobs)   # what results.json records: the number that ran
    print(f'== {jobs} training stage(s) at a time ({why})', flush=True)
    env = stage_env(cfg)
    prov = {'command': shlex.join(['python', '-m', 'tools.reproduce', *sys.argv[1:]]),
            'git_commit': git_commit() or 'unknown',
            'machine': f'{cpu_name()}, {os.cpu_count()} CPUs, {platform.platform()}, '
                       f'torch {torch.__version__}, device {device}',
            'stage_threads': env.get('OMP_NUM_THREADS')}
    start = time.time()
    failed = Failures()
    signal.signal(signal.SIGTERM, failed.stop)
    for key in done:
        print(f'== {tag(*key)}: done, skipped ({run_dir(root, *key)})', flush=True)
    ran = {}
    # the teacher first (the mae stage makes it), then the training stages, then the ensembles
    try:
        for phase, jobs in ((['mae'], 1), (ORDER, cfg.jobs), (['ensemble'], cfg.jobs)):
            digest = sha256_of(teacher)
            record = {'machine': prov['machine'], 'teacher_sha256': digest}
            steps_now = [s for s in todo if s[0][0] in phase]
            ran |= run_side_by_side(steps_now, jobs, root, env, record, failed)
    # the stages had it too (one process group): each saved where it got to
    except KeyboardInterrupt:
        sys.exit('error: stopped (Ctrl-C): run the same command again to continue')
    prov.update(wall_s=time.time() - start, teacher=teacher, teacher_sha256=digest)
    runs = [{**(done.get(key) or ran[key]), 'run_dir': run_dir(root, *key), 'skipped': key in done}
            for key, _ in steps]
    s = summarise(runs)
    write(results_dir, cfg, s, runs, root, prov)
    written = f'written: {results_dir}/results.json, results.png, TABLE.md, logs/'
    if cfg.quick:
        written += ' (--quick: runs cut short, not a result)'
    print(f'\n{table(s)}\n\n{written}')


if __name__ == '__main__':
    run_main(main)
