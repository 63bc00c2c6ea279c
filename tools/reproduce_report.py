"""
reproduce.py's report: the numbers of its stages over seeds, the table, the figure and RESULTS.md, each
result against the paper's and against the aims of a miniature (AIMS).

    python -m tools.reproduce_report results/fashion-mnist   # RESULTS.md and results.png again, from results.json
"""
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

from tools.palette import colour
from util.checkpoints import read_checkpoint
from util.launch import word
from util.config import ConfigError, flag
from util.engine import lr_at
from util.files import DamagedFile, check_out_dir, read_json, read_jsonl, save_figure, write_json, write_text
from util.launch import run_main
from util.files import git_commit

STAGES = ['scratch', 'finetune', 'copy', 'distill', 'ensemble']     # per seed, in this order


def records(d):
    """metrics.jsonl, one record per step (a resumed run may have written a step twice: the last counts)."""
    path = os.path.join(d, 'metrics.jsonl')
    rs = read_jsonl(path, 'delete that line and run the same command again') if os.path.isfile(path) else []
    if not rs or not all(isinstance(r.get('step'), int) for r in rs):
        raise DamagedFile(f'{path} is missing or holds no evaluation with its step: delete {d} and run the same '
                          f'command again to run that stage afresh')
    by_step = {r['step']: r for r in rs}
    return [by_step[s] for s in sorted(by_step)]


PAPER = {'scratch': 83.0, 'finetune': 85.7, 'copy': 85.1, 'distill': 85.7, 'ensemble': 86.3}   # ImageNet, ViT-L
LABELS = {'scratch': 'train from scratch', 'finetune': 'fine-tune the teacher', 'copy': 'attention copy',
          'distill': 'attention distillation', 'ensemble': 'ensemble (fine-tuned + distilled)'}
SHORT = {'scratch': 'scratch', 'finetune': 'fine-tune', 'copy': 'copy', 'distill': 'distillation',
         'ensemble': 'ensemble'}


def mean_std(values):
    """'85.10 ± 0.23': mean and standard deviation over seeds (n - 1 in the denominator); one value: '85.10'."""
    m = statistics.mean(values)
    return f'{m:.2f} ± {statistics.stdev(values):.2f}' if len(values) > 1 else f'{m:.2f}'


def gap_closed(method, scratch, finetune):
    """The fraction of the scratch-to-fine-tune gap a method closes, (method - scratch) / (finetune -
    scratch), on means. None when fine-tuning does not beat scratch: then the ratio means nothing."""
    return (method - scratch) / (finetune - scratch) if finetune > scratch else None


def format_gap(g):
    return 'not meaningful (fine-tune ≤ scratch)' if g is None else f'{100 * g:.1f}%'


def summarise(runs):
    """Per method: final top-1 per seed, mean, std, wall times, curve (test top-1 per epoch, mean over seeds)."""
    out = {}
    for m in STAGES:
        rs = [r for r in runs if r['stage'] == m]
        v = [r['metrics']['top1'] for r in rs]
        out[m] = {'seeds': [r['seed'] for r in rs], 'top1': v, 'mean': statistics.mean(v),
                  'std': statistics.stdev(v) if len(v) > 1 else None, 'wall_s': [r['wall_s'] for r in rs]}
        if m != 'ensemble':
            per = [{round(x['epoch'], 4): x['top1'] for x in records(r['run_dir'])} for r in rs]
            epochs = sorted(set.intersection(*map(set, per)))
            out[m]['curve'] = {'epoch': epochs, 'top1': [statistics.mean(p[e] for p in per) for e in epochs]}
    gaps = {m: gap_closed(out[m]['mean'], out['scratch']['mean'], out['finetune']['mean']) for m in ('copy', 'distill')}
    dis = [100 * r['metrics']['disagreement'] for r in runs if r['stage'] == 'ensemble']
    return {'methods': out, 'gap_closed': gaps, 'disagreement_pct': dis}


def table(s):
    rows = ['| method | top-1 (%), mean ± std | per seed | gap closed | disagreement | wall time / seed | '
            'paper (ImageNet) |', '|---|---:|---|---:|---:|---:|---:|']
    for m in STAGES:
        r, gap = s['methods'][m], m in s['gap_closed']
        paper = f"{PAPER[m]} ({format_gap(gap_closed(PAPER[m], PAPER['scratch'], PAPER['finetune']))})" if gap \
            else PAPER[m]
        rows.append(f"| {LABELS[m]} | {mean_std(r['top1'])} | {' / '.join(f'{v:.2f}' for v in r['top1'])} | "
                    f"{format_gap(s['gap_closed'][m]) if gap else ''} | "
                    f"{mean_std(s['disagreement_pct']) + '%' if m == 'ensemble' else ''} | "
                    f"{statistics.mean(r['wall_s']) / 60:.1f} min | {paper} |")
    return '\n'.join(rows)


def ordering(means, digits=2):
    """'fine-tune 82.24 > ensemble 81.56 > ...': the methods by mean top-1, highest first, '=' between equal ones
    (at the digits shown)."""
    ranked = sorted(means.items(), key=lambda kv: -kv[1])
    words = [f'{SHORT[ranked[0][0]]} {ranked[0][1]:.{digits}f}']
    for (_, above), (m, v) in zip(ranked, ranked[1:]):
        words.append(f"{'=' if round(above, digits) == round(v, digits) else '>'} {SHORT[m]} {v:.{digits}f}")
    return ' '.join(words)


def budget(runs):
    """What every training stage ran, read from the command it was started with (reproduce.py gives all four the
    same budget): its schedule, and where --max-steps cut it, how far into it and at what lr (share of the peak)."""
    first = next(r for r in runs if r['stage'] in STAGES[:4])
    args = [str(a) for a in first['command']]
    given = dict(zip(args, args[1:]))
    epochs, warmup, steps = float(given['--epochs']), float(given['--warmup-epochs']), int(given['--max-steps'])
    blr = f"blr {given['--blr']}" if '--blr' in given else "each script's preset blr"
    batch = f", batch {given['--batch-size']}" if '--batch-size' in given else ''
    text = f'a {epochs:g}-epoch schedule (warm-up {warmup:g} epoch, {blr}{batch})'
    if not steps or steps >= first['metrics']['step'] / first['metrics']['epoch'] * epochs:
        return text + ', run to its end'
    reached = first['metrics']['epoch']
    lr = lr_at(SimpleNamespace(warmup_epochs=warmup, epochs=epochs, min_lr=0.0, min_lr_ratio=0.0), 1.0, reached)
    return (text + f', cut after {steps} steps by --max-steps: {reached / epochs:.0%} of the way through it, its lr '
            f'still {lr:.0%} of the peak (--max-steps only stops a run; its schedule stays the whole one)')


def versus_scratch(s):
    """How each transfer method's mean compares with training from scratch, in points."""
    m = s['methods']
    diff = {k: m[k]['mean'] - m['scratch']['mean'] for k in ('copy', 'distill')}
    points = ', '.join(f'{SHORT[k]} {v:+.2f}' for k, v in diff.items())
    return f"{'both' if min(diff.values()) > 0 else 'not both'} transfer methods beat scratch ({points} points)"


def plot(s, path, split='test'):
    """Left: final top-1 per method: each seed a dot, the mean ± std a bar of error (points, not filled bars:
    the axis starts near the lowest number, and a bar's length would exaggerate the differences).
    Right: top-1 per epoch, mean over seeds; left out when each run was evaluated once (quick mode), since a
    curve of one point shows nothing. Returns the figure."""
    from matplotlib.figure import Figure   # no pyplot: no global state, rendered by Agg
    curves = len(s['methods']['scratch']['curve']['epoch']) > 1
    fig = Figure(figsize=(11 if curves else 5.5, 4), layout='constrained')
    left, right = fig.subplots(1, 2) if curves else (fig.subplots(), None)
    n = len(s['methods']['scratch']['top1'])
    for i, m in enumerate(STAGES):
        r = s['methods'][m]
        left.scatter([i] * len(r['top1']), r['top1'], s=14, color=colour(m), alpha=0.5)
        left.errorbar(i + 0.15, r['mean'], yerr=r['std'] or 0.0, fmt='o', color=colour(m), capsize=4)
        left.annotate(f"{r['mean']:.2f}", (i + 0.25, r['mean']), va='center', fontsize=8)
    left.set_xticks(range(len(STAGES)), STAGES)
    left.set_xlim(-0.5, len(STAGES) - 0.2)
    seeds = f'each seed a dot, mean ± std over {n} seeds' if n > 1 else 'one seed'
    left.set(ylabel=f'{split} top-1 (%), final epoch', title=f'final top-1: {seeds}\n(the axis does not start at 0)')
    left.grid(axis='y', alpha=0.3)
    if curves:
        for i, m in enumerate(STAGES[:4]):
            r = s['methods'][m]
            right.plot(r['curve']['epoch'], r['curve']['top1'], marker='o', color=colour(m), label=LABELS[m])
        right.set(xlabel='epoch', ylabel=f'{split} top-1 (%)', xticks=r['curve']['epoch'],
                  title='during training (mean over seeds)\n(the axis does not start at 0)')
        right.grid(alpha=0.3)
        right.legend(fontsize=8)
    save_figure(fig, path, dpi=100)
    return fig


def teacher_made(path):
    """How a shipped teacher was made (mae_pretrain.py --export records it), or None."""
    ckpt = read_checkpoint(path) if os.path.isfile(path) else None
    made = ckpt.get('made') if isinstance(ckpt, dict) else None
    return made if isinstance(made, dict) and {'epoch', 'held_out_mse', 'command'} <= set(made) else None


# What a miniature should show for the paper's effect to count at strength (the fashion-mnist reproduction's
# targets): copy closes at least half the scratch-to-fine-tune gap, distillation at least the paper's copy
# share (77.8%), and the ensemble beats fine-tuning alone. The paper's: 77.8%, 100%, +0.6.
AIMS = {'copy': 0.50, 'distill': 0.78, 'ensemble': 0.0}   # gap shares; the ensemble's margin in points


def aim(key, value):
    """'the aim: ≥ 50%, met' | '..., missed by 30.1 points of gap': one result against AIMS."""
    want = AIMS[key]
    if key == 'ensemble':
        return f'the aim: above it, {"met" if value > want else f"missed by {want - value:.2f} points"}'
    if value is None:
        return f'the aim: ≥ {100 * want:.0f}%, not measurable'
    return f'the aim: ≥ {100 * want:.0f}%, ' + ('met' if value >= want else
                                                 f'missed by {100 * (want - value):.1f} points of gap')


def against_paper(s):
    """The paper's pattern, point by point: what share of the gap each transfer method closes, and whether the
    ensemble beats fine-tuning alone, here (against AIMS) and in the paper."""
    m = s['methods']
    paper = {k: gap_closed(PAPER[k], PAPER['scratch'], PAPER['finetune']) for k in ('copy', 'distill')}
    lines = [f"- {LABELS[k]} closes {format_gap(s['gap_closed'][k])} of the gap ({aim(k, s['gap_closed'][k])}); "
             f"the paper's, {format_gap(paper[k])}" for k in ('copy', 'distill')]
    diff, paper_diff = m['ensemble']['mean'] - m['finetune']['mean'], PAPER['ensemble'] - PAPER['finetune']
    lines.append(f"- the ensemble is {diff:+.2f} points against fine-tuning alone ({aim('ensemble', diff)}); "
                 f"the paper's, {paper_diff:+.1f}")
    return "The paper's pattern, here (means over seeds):\n\n" + '\n'.join(lines)


def command_now(command):
    """The recorded command, as it runs at this commit: the driver was reproduce.py at the repository's root before
    it moved to tools/ (results.json keeps what was typed)."""
    old = 'python reproduce.py '
    if not command.startswith(old):
        return f'`{command}`'
    return f"`python -m tools.reproduce {command[len(old):]}` (run as `{command}`, where the driver then was)"


def named(cfg):
    """The name the README's table of budgets gives this run's budget, when it is one of them."""
    from tools.reproduce import parse     # here, not above: reproduce.py imports this file
    if cfg.data != 'fashion-mnist' or cfg.val_size:
        return ''
    preset = parse(['--data', 'fashion-mnist', *['--quick', 'true'] * bool(cfg.quick)])
    if any(getattr(cfg, k, OLDER.get(k)) != getattr(preset, k) for k in ('seeds', 'teacher', 'mae_epochs', 'epochs', 'blr',
                                                                  'batch_size', 'max_steps')):
        return ''
    return f", the budget the README calls *{'the quick command' if cfg.quick else 'the committed reproduction'}*"


def report(cfg, s, runs, root, prov, validation=False, rewritten=''):
    """RESULTS.md: the table, what its columns mean, how it was made. validation: link VALIDATION.md (the
    choices behind the preset) beside it; rewritten: the commit that re-wrote it from results.json."""
    mae = [r for r in runs if r['stage'] == 'mae']
    made = teacher_made(cfg.teacher)
    teacher = (f"MAE, pre-trained here on the training split ({cfg.mae_epochs} epoch(s), held-out masked MSE "
               f"{mae[0]['metrics']['mse']:.4f}, {mae[0]['wall_s'] / 60:.1f} min)" if mae else
               f"`{cfg.teacher}` (MAE, {made['epoch']:.0f} epochs on the training split, held-out masked MSE "
               f"{made['held_out_mse']:.4f}; made by `{made['command']}`, not counted in the wall times)" if made
               else f'`{cfg.teacher}`')
    quick = (f"\n**--quick: a smoke run of the pipeline, not a result.** It shows that every stage runs end to end;\n"
             f"here {versus_scratch(s)} within the same steps. It does not measure the paper's\n"
             f"comparison of the methods: every stage stops early in its schedule (below), so their order here is that\n"
             f"of runs cut short. A run without --quick is the result.\n" if cfg.quick else '')
    threads = f" ({prov['stage_threads']} thread(s) each)" if prov.get('stage_threads') else ''
    n_skipped = sum(bool(r.get('skipped')) for r in runs)
    skipped = f', skipping {n_skipped} stage(s) done before' if n_skipped else ''
    stamp = lambda t: time.strftime('%Y-%m-%d %H:%M %Z', time.localtime(t))
    written = (f"the run ended {stamp(max(r.get('started', 0) + r['wall_s'] for r in runs))}; this report was "
               f"re-written from its results.json by reproduce_report.py at commit {rewritten}, "
               f"{stamp(time.time())}" if rewritten else f'written {stamp(time.time())}')
    choices = ('\nEvery configuration tried on the validation split, and why this one: '
               '[VALIDATION.md](VALIDATION.md).\n' if validation else '')
    split = (f'top-1 on {cfg.val_size} training images held out from every stage (--val-size), never the test\n'
             f'split\'s,') if cfg.val_size else 'test top-1'
    return f"""# Attention transfer on {cfg.data}: the paper's Table 1 in miniature
{quick}
Each method trains the same ViT (the scripts' `--data {cfg.data}` preset) on the training split{named(cfg)}:
{budget(runs)}; {len(cfg.seeds)} seed(s): {', '.join(map(str, cfg.seeds))}. Teacher: {teacher}.
Each number is the {split} at the end of its run (the ensemble: of the two final models),
never the best evaluation's; nothing was chosen by looking at the test split.

{table(s)}

- *gap closed*: (method − scratch) / (fine-tune − scratch), on the means; not meaningful when fine-tuning
  does not beat scratch.
- *disagreement*: how often the fine-tuned and the distilled model's top-1 predictions differ on the
  evaluated images (per seed: {', '.join(f'{d:.2f}%' for d in s['disagreement_pct'])}).
- *paper*: ImageNet-1K, ViT-L/16, MAE teacher, 50-200 epochs on 64 GPUs: a pattern to compare, not values.
- *wall time*: each stage's last launch (a resumed stage counts from its restart), mean over seeds; all
  stages {sum(r['wall_s'] for r in runs) / 60:.1f} min, {cfg.jobs} at a time{threads}: reproduce.py ran {prov['wall_s'] / 60:.1f} min{skipped}.

Order of the means here: {ordering({m: r['mean'] for m, r in s['methods'].items()})};
the paper's: {ordering(PAPER, 1)}.

{against_paper(s)}
{choices}
![results](results.png)

## Provenance

- command: {command_now(prov['command'])}
- git commit: {prov['git_commit']}
- machine: {'; '.join(sorted({r['machine'] for r in runs}))}
- every stage's log, per-epoch metrics, config and done.json: [`logs/<stage>/seed<k>/`](logs/) (the run
  directories, checkpoints included, were `{root}/<stage>/seed<k>`)
- {written}
"""

def keep_logs(runs, root, dest):
    """Each stage's small files (log, per-epoch metrics, config, done.json; not its checkpoint) beside the
    report, so a committed result carries its logs even though run directories are not committed."""
    for r in runs:
        out = os.path.join(dest, os.path.relpath(r['run_dir'], root))
        os.makedirs(out, exist_ok=True)
        for f in ('log.txt', 'metrics.jsonl', 'config.json', 'done.json', 'ensemble.json'):
            if os.path.exists(os.path.join(r['run_dir'], f)):
                shutil.copyfile(os.path.join(r['run_dir'], f), os.path.join(out, f))


def write_report(results_dir, cfg, s, runs, root, prov, rewritten=''):
    """RESULTS.md (linking VALIDATION.md if one is beside it) and results.png in results_dir."""
    validation = Path(results_dir, 'VALIDATION.md').exists()
    md = report(cfg, s, runs, root, prov, validation, rewritten)     # made before either file is written
    plot(s, os.path.join(results_dir, 'results.png'), 'validation' if cfg.val_size else 'test')
    write_text(os.path.join(results_dir, 'RESULTS.md'), md)


# What a reproduction's numbers depend on: results made with other values are another reproduction's
SAME = ('data', 'seeds', 'teacher', 'quick', 'val_size', 'mae_epochs', 'epochs', 'blr', 'batch_size', 'max_steps',
        'fake_size', 'amp')
OLDER = {'amp': 'auto', 'batch_size': 0}   # fields results.json had no entry for before they existed: the value they ran with


def check_results_dir(results_dir, cfg, teacher_sha256=None):
    """Refuse, before any stage runs, a --results-dir that cannot be written, or that holds results of another
    reproduction (another data set, preset, budget or teacher, by results.json) or files of unknown origin,
    unless --replace-results true: a reproduction replaces only its own results."""
    check_out_dir(results_dir, '--results-dir')
    path, replace = os.path.join(results_dir, 'results.json'), 'pass --replace-results true to replace them'
    if cfg.replace_results:
        return
    if not os.path.exists(path):
        found = [f for f in ('RESULTS.md', 'results.png', 'logs') if os.path.exists(os.path.join(results_dir, f))]
        if found:
            raise ConfigError(f"--results-dir {results_dir} holds {', '.join(found)} but no results.json saying what "
                              f"made them: choose another --results-dir, or {replace}")
        return
    old = read_json(path, f'restore it (committed results: git checkout -- {path}), or {replace}', {'config': dict})
    now = asdict(cfg)
    was = {k: old['config'].get(k, OLDER.get(k)) for k in SAME}
    diff = [f"{flag(k)} {word(was[k])} (here {word(now[k])})" for k in SAME if was[k] != now[k]]
    if old.get('teacher_sha256') and teacher_sha256 and old['teacher_sha256'] != teacher_sha256:
        diff.append(f"a teacher with sha256 {old['teacher_sha256'][:16]}... (here {teacher_sha256[:16]}...)")
    if diff:
        raise ConfigError(f"--results-dir {results_dir} holds another reproduction's results, made with "
                          f"{'; '.join(diff)}: choose another --results-dir, or {replace}")


def write(results_dir, cfg, s, runs, root, prov):
    """RESULTS.md, results.json, results.png and the stages' logs in results_dir (logs/ replaced whole: never a
    mix of two runs' logs). prov: the command, commit, machine, threads a stage, wall time and teacher (a path
    and its sha256) of the run."""
    os.makedirs(results_dir, exist_ok=True)
    write_report(results_dir, cfg, s, runs, root, prov)
    record = {**prov, 'config': asdict(cfg), 'summary': s, 'stages': runs, 'paper': PAPER}
    write_json(os.path.join(results_dir, 'results.json'), record)
    shutil.rmtree(os.path.join(results_dir, 'logs'), ignore_errors=True)
    keep_logs(runs, root, os.path.join(results_dir, 'logs'))


def rewrite(results_dir):
    """RESULTS.md and results.png again from results.json, after a change to how the report reads: the
    numbers, stages and provenance are the run's own (its run directories need not exist any more)."""
    path = os.path.join(results_dir, 'results.json')
    if not os.path.isfile(path):
        raise ConfigError(f'{path} not found: name a directory that reproduce.py wrote (--results-dir)')
    fix = f'restore it (committed results: git checkout -- {path}), or make it again with python -m tools.reproduce'
    d = read_json(path, fix, {'config': dict, 'summary': dict, 'stages': list})
    prov = {k: d[k] for k in ('command', 'git_commit', 'machine', 'stage_threads', 'wall_s') if k in d}
    try:   # everything below reads the file's contents: a missing or mistyped entry is the file's fault
        runs = d['stages']
        root = next(os.path.dirname(os.path.dirname(r['run_dir'])) for r in runs if r['stage'] != 'mae')
        write_report(results_dir, SimpleNamespace(**d['config']), d['summary'], runs, root, prov,
                     rewritten=git_commit() or 'unknown')
    except (KeyError, AttributeError, TypeError, ValueError, IndexError, StopIteration) as e:
        raise DamagedFile(f'{path} does not hold what reproduce.py writes ({type(e).__name__}: {e}): {fix}') from None
    print(f'written: {results_dir}/RESULTS.md, results.png (from results.json)')


if __name__ == '__main__':
    # python -m tools.reproduce_report results/fashion-mnist: the report again, from the run's results.json
    if len(sys.argv) != 2:
        sys.exit('usage: python -m tools.reproduce_report RESULTS_DIR (a directory reproduce.py wrote, with results.json)')
    run_main(lambda: rewrite(sys.argv[1]))
