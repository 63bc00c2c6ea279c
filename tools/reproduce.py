"""
The paper's Table 1 in miniature: every method, several seeds, one command.

    python -m tools.reproduce --data fashion-mnist --quick true  # 1 seed, 160 steps of 64 a stage, from the shipped teacher
    python -m tools.reproduce --data fashion-mnist --quick true --amp off   # the same in fp32, as a CPU without bf16
    python -m tools.reproduce --data fashion-mnist               # 3 seeds, 3 epochs a stage, from the shipped teacher
    python -m tools.reproduce --data fashion-mnist --teacher ''  # the same, pre-training its own teacher first
    python -m tools.reproduce --data cifar10                     # 3 seeds: under an hour on one GPU (estimated)

Each stage runs a script in a subprocess, its `--data` preset plus a budget: `mae` (the teacher, once for
all seeds; `--teacher` skips it), then per seed `scratch`, `finetune` (--init <teacher>), `copy`, `distill`
(--teacher <teacher>), `ensemble` (fine-tuned + distilled), into runs/reproduce/<data>/<stage>/seed<k>.
`--jobs N` runs N stages side by side, each on 1/N of the CPU threads (the fashion-mnist preset: 2; on 2
cores, two one-thread stages got through 1.36x the work of one stage on both: VALIDATION.md). A stage whose
directory holds done.json (written when its script exits cleanly) is skipped, one with only a checkpoint
resumed (--resume true): interrupted, the same command continues. <out_dir>/teacher.json records the
teacher's SHA-256 before the first stage that uses it: a teacher file replaced since is refused, never paired
with stages of the old one. Every stage's inputs are checked before the first one runs; killing reproduce.py
stops its running stages. Report (reproduce_report.py): RESULTS.md, results.json, results.png and the stages'
logs in <out_dir>/results, or in --results-dir (results/<data> refreshes the committed ones; results of another
reproduction there are refused unless --replace-results true). A run's number is its final epoch's test
top-1, never its best.
"""
import ctypes
import os
import platform
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
import typing
from dataclasses import dataclass, field

import torch

from ensemble import is_result
from tools.reproduce_report import STAGES, budget, check_results_dir, ordering, records, summarise, table, write
from util.checkpoints import build_from_checkpoint
from util.launch import parse_config, without_help
from util.config import AMP, ConfigError, option
from util.files import DamagedFile, read_json, sha256_of, write_json
from util.launch import run_main
from util.files import cpu_name, git_commit

# -----------------------------------------------------------------------------
# Config


@dataclass
class ReproduceConfig:
    data: str = option('fashion-mnist', "fashion-mnist | cifar10 | cifar100 | fake: every script's --data")
    data_dir: str = './data'
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    teacher: str = option('', 'a checkpoint file or name; empty = pre-train one (stage mae); the fashion-mnist preset: '
                          'the shipped teacher (teachers/README.md)')
    quick: bool = option(False, '1 seed, a 1-epoch schedule cut after 160 steps of 64 a stage: checks the pipeline, is '
                         'not a result')
    val_size: int = option(0, 'every stage evaluates on this many held-out training images, not on test: the split to '
                           'choose a budget on; dirs get a -val suffix')
    out_dir: str = option('', 'run directories; empty = runs/reproduce/<data>[-quick][-val]')
    results_dir: str = option('', 'RESULTS.md, results.json, results.png, logs/; empty = <out_dir>/results. The '
                              'committed ones are refreshed only when named: results/<data>[-quick]')
    replace_results: bool = option(False, "--results-dir may hold another reproduction's results (other data, preset "
                                   'or teacher): replace them; without it they are refused, never mixed')
    mae_epochs: int = option(10, "every stage warms up for a tenth of its epochs, as the scripts' presets do")
    epochs: int = option(2, 'each of scratch, finetune, copy, distill')
    blr: float = option(0.0, "base lr of scratch, finetune, copy and distill; 0 = each script's preset")
    batch_size: int = option(0, "batch of scratch, finetune, copy and distill; 0 = each script's preset")
    max_steps: int = option(0, 'cut every stage short after this many steps, its schedule still the whole --epochs one '
                            "(the scripts' --max-steps); 0 = the whole schedule")
    num_workers: typing.Optional[int] = option(None, "None = each script's preset")
    jobs: int = option(1, 'stages run side by side, each as soon as those it needs are done, on 1/jobs of the CPU '
                       'threads each (OMP_NUM_THREADS, unless you set it)')
    amp: str = option('auto', "every stage's --amp: auto (bf16 where the device has it) | bf16 | fp16 | off (off: "
                      'fp32, what a CPU without bf16 runs)')
    fake_size: int = option(2048, '--data fake only')

    def checks(self):
        return [('data', self.data in PRESETS, f"reproduce.py runs {', '.join(PRESETS)} (ImageNet: the scripts' recipes)"),
                ('seeds', len(set(self.seeds)) == len(self.seeds) and min(self.seeds) >= 0, 'each seed once, 0 or more'),
                ('val_size', self.val_size >= 0, 'must be 0 (the test split) or more'),
                ('blr', self.blr >= 0, "a positive base lr, or 0 for each script's own"),
                ('batch_size', self.batch_size >= 0, "a batch size, or 0 for each script's own"),
                *[(k, getattr(self, k) >= 1, 'must be at least 1') for k in ('mae_epochs', 'epochs', 'fake_size', 'jobs')],
                ('max_steps', self.max_steps >= 0, 'must be 0 (the whole schedule) or more'),
                ('amp', self.amp in AMP, f"choose one of {', '.join(AMP)}"),
                ('num_workers', self.num_workers is None or self.num_workers >= 0, 'must be 0 or more (or none)')]


# Budgets, chosen on the validation split (results/fashion-mnist/VALIDATION.md), never on test. fashion-mnist:
#   the shipped 8-head teacher, 3 epochs a stage at blr 4e-3, two stages at a time: what fits the hour on 2
#   CPU cores (two one-thread stages side by side got through 1.36x the work of one on both cores; the 8-head
#   runs' logs read 20-27% fewer img/s than the 4-head runs', which put 4 epochs past the hour). On
#   validation (3 seeds) these exact stages closed 40% of the gap by copy and 86% by distillation, and the
#   ensemble beat fine-tuning on every seed (+0.33); every method did better at blr 4e-3 than at its
#   preset's 2e-3. Timings: results/fashion-mnist/RESULTS.md. --quick: 160 steps of 64 images a stage at blr
#   8e-3 (lr 2e-3, the full run's), what fits 5 minutes of one core in fp32 (--amp off); 80 steps of 128 cost as
#   much, and distillation ended below scratch there on test in fp32 (VALIDATION.md, budget).
# cifar10 / cifar100, one GPU (estimated from FLOPs, not measured): ViT-Tiny, D 192, depth 9, N 65 tokens:
#   (24 D^2 + 4 N D) x 9 x 65 = 0.55 GFLOP an image forward, x 3 to train: 82 TFLOP an epoch of 50k; the
#   teacher adds ~35% to copy / distill. 3 seeds x 20 epochs x (1 + 1 + 1.35 + 1.35) = 23 PFLOP, MAE 50
#   epochs 1.5, evaluations 1.3: ~26 PFLOP = 22 min at an effective 20 TFLOP/s (a model this small uses a
#   few % of a GPU's peak), 44 min at 10; the loaders must deliver ~5k images/s (8 workers).
PRESETS = {
    'fashion-mnist': dict(teacher='teachers/fashion-mnist-mae.pt', mae_epochs=24, epochs=3, blr=4e-3, jobs=2),
    'cifar10': dict(mae_epochs=50, epochs=20, num_workers=8),
    'cifar100': dict(mae_epochs=50, epochs=20, num_workers=8),
    'fake': dict(seeds=[0], mae_epochs=1, epochs=1, max_steps=2, fake_size=256, num_workers=0),
}
QUICK = dict(seeds=[0], mae_epochs=1, epochs=1, max_steps=160, batch_size=64, blr=8e-3)


def parse(argv=None):
    """Defaults < --data's preset < --quick's < your flags (--help shows them for that choice)."""
    cfg = parse_config(ReproduceConfig, PRESETS, without_help(argv))
    if not cfg.quick:
        return parse_config(ReproduceConfig, PRESETS, argv)
    return parse_config(ReproduceConfig, {k: {**v, **QUICK} for k, v in PRESETS.items()}, argv,
                        'preset of --data {} with --quick true')

# -----------------------------------------------------------------------------
# Stages: one subprocess each, skipped when done, resumed when interrupted


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository: the scripts
SCRIPTS = {'mae': 'mae_pretrain.py', 'scratch': 'finetune.py', 'finetune': 'finetune.py',
           'copy': 'attention_copy.py', 'distill': 'attention_distill.py', 'ensemble': 'ensemble.py'}


def run_dir(root, stage, seed):
    return os.path.join(root, 'mae') if stage == 'mae' else os.path.join(root, stage, f'seed{seed}')


def stage_command(cfg, stage, seed, root, teacher, resume=False):
    """[python, script, flags]: the script's own --data preset, then this reproduction's budget."""
    d = run_dir(root, stage, seed)
    args = ['--data', cfg.data, '--data-dir', cfg.data_dir, '--seed', seed]
    args += ['--fake-size', cfg.fake_size] if cfg.data == 'fake' else []
    args += ['--num-workers', cfg.num_workers] if cfg.num_workers is not None else []
    args += ['--val-size', cfg.val_size] if cfg.val_size else []
    args += ['--amp', cfg.amp] if cfg.amp != 'auto' else []     # auto: the scripts' own default, left unsaid
    epochs = cfg.mae_epochs if stage == 'mae' else cfg.epochs
    train = ['--out-dir', d, '--epochs', epochs, '--warmup-epochs', epochs / 10, '--max-steps', cfg.max_steps]
    train += ['--blr', cfg.blr] if cfg.blr and stage != 'mae' else []
    train += ['--batch-size', cfg.batch_size] if cfg.batch_size and stage != 'mae' else []
    models = [os.path.join(run_dir(root, s, seed), 'checkpoint.pt') for s in ('finetune', 'distill')]
    extra = {   # the MAE encoder normalises every token: no global pooling, whatever the preset says
        'mae': train + ['--global-pool', 'false'], 'scratch': train, 'finetune': train + ['--init', teacher],
        'copy': train + ['--teacher', teacher], 'distill': train + ['--teacher', teacher],
        'ensemble': ['--models', *models, '--out', os.path.join(d, 'ensemble.json')]}[stage]
    return [sys.executable, os.path.join(ROOT, SCRIPTS[stage]), *map(str, args + extra + ['--resume', 'true'] * resume)]


def plan_stage(cfg, stage, seed, root, teacher):
    """('done' | 'partial' | 'new', command). Never mixes in a run that was made with other flags (paths
    under the reproduction's root compare relative to it: a reproduction moved elsewhere carries on)."""
    d = run_dir(root, stage, seed)
    done, config, ckpt = (os.path.join(d, f) for f in ('done.json', 'config.json', 'checkpoint.pt'))
    state = 'done' if os.path.exists(done) else 'partial' if os.path.exists(ckpt) else 'new'
    cmd = stage_command(cfg, stage, seed, root, teacher, resume=state == 'partial')
    old = read_done(d, stage)['command'] if state == 'done' else [None, *read_json(
        config, f'delete {d} to run that stage afresh', {'argv': list})['argv']] if os.path.exists(config) else None
    old, new = (flags(c, stage, seed) if c else None for c in (old, cmd))
    if old is not None and old != new:
        raise ConfigError(f"{d} holds a run made with {', '.join(sorted(old - new))}, not with "
                          f"{', '.join(sorted(new - old))}: run with the flags that made it, or choose another "
                          f"--out-dir")
    if state == 'done' and stage in STAGES[:4]:   # the metrics the report reads, checked before anything runs
        records(d)
    out = os.path.join(d, 'ensemble.json')
    if stage == 'ensemble' and state == 'new' and os.path.exists(out) and not is_result(out):
        raise DamagedFile(f'{out} is not a result of ensemble.py (cut short?): delete it and run the same command '
                          f'again (the ensemble stage makes it anew)')
    return state, cmd


def flags(cmd, stage, seed):
    """{'--flag value'} of a stage's command after the interpreter and the script, --resume left out (it is no
    difference), and the root the command was made under, wherever that was, written as <root>/."""
    args = [str(a) for a in cmd[2:]]
    given = dict(zip(args, args[1:]))
    d = os.path.dirname(given.get('--out', '')) if stage == 'ensemble' else given.get('--out-dir', '')
    tail = run_dir('', stage, seed)                                   # e.g. copy/seed0
    root = d[:-len(tail)] if d.endswith(os.sep + tail) else None     # with its separator: runs/reproduce/fake/
    return {f"{a} {'<root>/' + b[len(root):] if root and b.startswith(root) else b}"
            for a, b in zip(args, args[1:]) if a.startswith('--') and a != '--resume'}


def read_done(d, stage):
    """A finished stage's done.json, with what the report reads from it."""
    fix = 'delete it and run the same command again: ' + ('the stage runs again' if stage == 'ensemble' else
                                                          'the stage is finished from its checkpoint')
    path = os.path.join(d, 'done.json')
    done = read_json(path, fix, {'stage': str, 'seed': int, 'command': list, 'wall_s': (int, float), 'metrics': dict})
    if not isinstance(done['metrics'].get('mse' if stage == 'mae' else 'top1'), (int, float)):
        raise DamagedFile(f"{path} has no final {'mse' if stage == 'mae' else 'top1'} in its metrics: {fix}")
    return done

# -----------------------------------------------------------------------------
# The teacher, by content: every stage under a root comes from the one file <root>/teacher.json records (its
# SHA-256), written before the first stage that uses it starts. Its path alone is no proof: the file under it
# may have been replaced, and the table would pair a student of the old teacher with a fine-tune of the new.

USES_TEACHER = ('finetune', 'copy', 'distill', 'ensemble')


def check_teacher(root, teacher, digest, stages):
    """Refuse, before any stage runs, a teacher whose contents (digest: its SHA-256; None while stage mae is
    still to make it, or for a name such as mae_vit_base) are not those the stages under root were made from,
    or stages made from a teacher of which root has no record."""
    path = os.path.join(root, 'teacher.json')
    if os.path.exists(path):
        recorded = read_json(path, 'choose another --out-dir (its stages cannot be matched to a teacher without it)',
                             {'sha256': str})['sha256']
        if digest is not None and digest != recorded:
            raise ConfigError(f'{teacher} is not the teacher the stages in {root} were made from: its sha256 is '
                              f'{digest[:16]}..., theirs {recorded[:16]}...; put that file back, or choose another '
                              f'--out-dir to run every stage from this one')
    elif any(os.path.exists(os.path.join(run_dir(root, s, k), f)) for s, k in stages if s in USES_TEACHER
             for f in ('done.json', 'checkpoint.pt')):
        raise ConfigError(f'{root} holds stages made from a teacher it has no record of ({path} is missing), '
                          f'which {teacher} may not be: choose another --out-dir')


def record_teacher(root, teacher):
    """The teacher's SHA-256, recorded in <root>/teacher.json the first time (None for a name)."""
    path = os.path.join(root, 'teacher.json')
    if os.path.exists(path):
        return read_json(path, 'choose another --out-dir', {'sha256': str})['sha256']
    digest = sha256_of(teacher)
    if digest is not None:
        os.makedirs(root, exist_ok=True)
        write_json(path, {'teacher': teacher, 'sha256': digest})
    return digest


def die_with(parent):
    """What the stage's process does before it starts (Linux): ask for SIGTERM when reproduce.py dies, also by
    SIGKILL, which no handler sees (prctl PR_SET_PDEATHSIG); prctl is looked up here, not in the new process."""
    if not sys.platform.startswith('linux'):
        return None
    prctl = ctypes.CDLL(None).prctl

    def ask():
        prctl(1, int(signal.SIGTERM))    # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:       # reproduce.py died before that: stop now
            os._exit(1)
    return ask


# The order stages start in: the longest first, so that with --jobs the last ones, which may run alone, are short
ORDER = ['distill', 'copy', 'scratch', 'finetune', 'ensemble']


def tag(stage, seed):
    return stage if stage == 'mae' else f'{stage} seed {seed}'


def needs(stage, seed, stages):
    """The stages that must be done before this one starts: the teacher, and the ensemble's two models."""
    first = [('mae', 0)] if stage != 'mae' and ('mae', 0) in stages else []
    return first + [('finetune', seed), ('distill', seed)] * (stage == 'ensemble')


def stage_env(cfg):
    """The stages' environment: with --jobs above 1, each stage's share of the CPU threads (two stages on 2
    cores: one thread each, not two), unless OMP_NUM_THREADS is set already."""
    env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
    if cfg.jobs > 1 and 'OMP_NUM_THREADS' not in env:
        env['OMP_NUM_THREADS'] = str(max(1, (os.cpu_count() or 1) // cfg.jobs))
    return env


def start_stage(cfg, stage, seed, root, state, cmd, finished):
    """Start (or resume: state 'partial') a stage's script; a thread prints its output, tagged, and puts (stage,
    seed, exit code, last line) on `finished` when it exits."""
    d, name = run_dir(root, stage, seed), tag(stage, seed)
    print(f"== {name}: {'resuming' if state == 'partial' else 'running'} {shlex.join(cmd[1:])}", flush=True)
    # started from this (the main) thread: PR_SET_PDEATHSIG fires when the thread that started it ends
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=stage_env(cfg),
                            preexec_fn=die_with(os.getpid()))

    def stream():
        last = ''
        for line in proc.stdout:
            print(f'   {name} | {line.rstrip()}', flush=True)
            last = line.strip().removeprefix('error: ') or last
        finished.put((stage, seed, proc.wait(), last))
    threading.Thread(target=stream, daemon=True).start()
    return {'proc': proc, 'tag': name, 'dir': d, 'cmd': cmd, 'resumed': state == 'partial', 't0': time.time()}


def finish_stage(stage, seed, running, machine):
    """done.json for a stage whose script exited cleanly: the final metrics (the last evaluation, or the
    ensemble's numbers), when it started and its wall time."""
    d, cmd = running['dir'], running['cmd']
    r = read_json(os.path.join(d, 'ensemble.json'), 'run the same command again (the ensemble stage makes it anew)',
                  {'ensemble': dict, 'disagreement': list, 'models': list}) if stage == 'ensemble' else None
    metrics = {**r['ensemble'], 'disagreement': r['disagreement'][0]['rate'], 'models': r['models']} if r \
        else records(d)[-1]
    done = {'stage': stage, 'seed': seed, 'command': cmd, 'resumed': running['resumed'], 'started': running['t0'],
            'wall_s': time.time() - running['t0'], 'machine': machine, 'metrics': metrics,
            'teacher_sha256': running.get('teacher_sha256')}
    write_json(os.path.join(d, 'done.json'), done)
    return {**done, 'run_dir': d}


def run_stages(cfg, stages, root, teacher, machine):
    """Every stage, in order, `cfg.jobs` at a time: each starts as soon as a slot is free and the stages it
    needs are done; a finished one (done.json) is skipped. A failed stage starts no new ones: those running
    finish, then reproduce.py exits with the failure. Killing reproduce.py (SIGTERM, Ctrl-C) stops them all."""
    pending, running, runs, failed, finished = list(stages), {}, {}, [], queue.Queue()

    def stop(signum, _):   # the stages never train on alone
        for r in running.values():
            r['proc'].send_signal(signum)
        for r in running.values():
            r['proc'].wait()
        names = ', '.join(r['tag'] for r in running.values())
        sys.exit(f'error: {names} stopped by {signal.Signals(signum).name}; run the same command again to continue')
    signal.signal(signal.SIGTERM, stop), signal.signal(signal.SIGINT, stop)
    while pending or running:
        while not failed and len(running) < cfg.jobs:
            key = next((k for k in pending if all(n in runs for n in needs(*k, stages))), None)
            if key is None:
                break
            pending.remove(key)
            state, cmd = plan_stage(cfg, *key, root, teacher)
            if state == 'done':
                d = run_dir(root, *key)
                print(f'== {tag(*key)}: done, skipped ({d})', flush=True)
                runs[key] = {**read_done(d, key[0]), 'run_dir': d, 'skipped': True}
            else:   # the teacher is recorded by content before the first stage that uses it starts
                digest = record_teacher(root, teacher) if key[0] in USES_TEACHER else None
                running[key] = {**start_stage(cfg, *key, root, state, cmd, finished), 'teacher_sha256': digest}
        if not running:
            break
        stage, seed, code, last = finished.get()
        r = running.pop((stage, seed))
        if code == 0:
            runs[stage, seed] = finish_stage(stage, seed, r, machine)
            continue
        failed.append(f"{r['tag']} failed (exit {code}): {last} | run directory {r['dir']}")
        print(f'error: {failed[-1]}' + f'; waiting for {len(running)} running stage(s)' * bool(running), flush=True)
    if failed:
        sys.exit(f"error: {'; '.join(failed)}; fix the cause and run the same command again to continue")
    return [runs[k] for k in stages]

# -----------------------------------------------------------------------------
# Main


def main():
    cfg = parse()
    name = cfg.data + '-quick' * cfg.quick + '-val' * bool(cfg.val_size)
    root = cfg.out_dir or os.path.join('runs', 'reproduce', name)
    results_dir = cfg.results_dir or os.path.join(root, 'results')
    device = f'cuda ({torch.cuda.get_device_name(0)})' if torch.cuda.is_available() else 'cpu'
    prov = {'command': shlex.join(['python', '-m', 'tools.reproduce', *sys.argv[1:]]),
            'git_commit': git_commit() or 'unknown',
            'machine': f'{cpu_name()}, {os.cpu_count()} CPUs, {platform.platform()}, torch {torch.__version__}, '
                       f'device {device}', 'stage_threads': stage_env(cfg).get('OMP_NUM_THREADS')}
    teacher = cfg.teacher or os.path.join(run_dir(root, 'mae', 0), 'checkpoint.pt')
    stages = [('mae', 0)] * (not cfg.teacher) + [(stage, seed) for stage in ORDER for seed in cfg.seeds]
    # every input checked before any stage runs: where the results go, each stage's directory, the teacher
    digest = sha256_of(teacher)
    for stage, seed in stages:
        plan_stage(cfg, stage, seed, root, teacher)
    check_teacher(root, teacher, digest, stages)
    check_results_dir(results_dir, cfg, digest)
    if cfg.teacher:
        build_from_checkpoint(cfg.teacher, num_classes=0)   # a missing file, not a ViT, a copy student: refused
    t0 = time.time()
    runs = run_stages(cfg, stages, root, teacher, prov['machine'])
    prov.update(wall_s=time.time() - t0, teacher=teacher, teacher_sha256=record_teacher(root, teacher))

    s = summarise(runs)
    write(results_dir, cfg, s, runs, root, prov)
    means = {m: r['mean'] for m, r in s['methods'].items()}
    print(f"\nevery stage: {budget(runs)}\n\n{table(s)}\n\norder of the means: {ordering(means)}"
          f"{' (--quick: runs cut short, not a result)' if cfg.quick else ''}\n\n"
          f"written: {results_dir}/RESULTS.md, results.json, results.png, logs/")


if __name__ == '__main__':
    run_main(main)
