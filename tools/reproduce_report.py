"""
reproduce.py's report: the numbers of its stages over seeds (results.json holds every one), their tables
(TABLE.md), the figure (results.png), and the stages' logs beside them. What the numbers show is written by hand
in the page beside them (RESULTS.md); tests/test_pages.py checks each number such a page states.

    python -m tools.reproduce_report results/fashion-mnist   # TABLE.md and results.png again, from results.json
    python -m tools.reproduce_report results/fashion-mnist --dirty true   # from uncommitted code: results.json says so
"""
import os
import shutil
import statistics
import sys
from dataclasses import asdict
from types import SimpleNamespace

from tools.intervals import interval
from tools.palette import SHORT, colour
from util.config import ConfigError
from util.engine import lr_at
from util.errors import flag, word
from util.files import (DamagedFile, check_out_dir, page_commit, read_json, read_jsonl, save_figure, write_json,
                        write_text)
from util.launch import run_main

STAGES = ['scratch', 'finetune', 'copy', 'distill', 'ensemble']     # per seed, in this order
# ImageNet, ViT-L
PAPER = {'scratch': 83.0, 'finetune': 85.7, 'copy': 85.1, 'distill': 85.7, 'ensemble': 86.3}
LABELS = {'scratch': 'train from scratch', 'finetune': 'fine-tune the teacher',
          'copy': 'attention copy', 'distill': 'attention distillation',
          'ensemble': 'ensemble (fine-tuned + distilled)'}


def records(d):
    """metrics.jsonl, one record per step
    (a resumed run may have written a step twice: the last counts)."""
    path = os.path.join(d, 'metrics.jsonl')
    rs = read_jsonl(path, 'delete that line and run the same command again')
    if not rs:   # a run stopped before its first evaluation; advice to delete only for a folder a run made
        again = ''
        if is_run(d):
            again = (f', or (reproduce.py, tools/variants.sh) delete {d} and run the same command again to run '
                     f'it afresh')
        raise DamagedFile(f'{path} is missing or holds no evaluation: name a run evaluated at least once{again}')
    by_step = {r['step']: r for r in rs}
    return [by_step[s] for s in sorted(by_step)]


def is_run(d):
    """Whether folder d holds a run a script of this repository made (its config.json says what made it)."""
    try:
        return 'argv' in read_json(os.path.join(d, 'config.json'), '')
    except DamagedFile:   # missing, not JSON: a folder of anyone's
        return False


def per_epoch(run_dirs):
    """(the epochs every run was evaluated at, [each run's top-1 at them]),
    from the runs' metrics.jsonl."""
    per = [{round(r['epoch'], 4): r['top1'] for r in records(d)} for d in run_dirs]
    epochs = sorted(set.intersection(*map(set, per)))
    return epochs, [[p[e] for e in epochs] for p in per]

# -----------------------------------------------------------------------------
# The numbers and their tables


def mean_std(values):
    """'85.10 ± 0.23': mean and standard deviation over seeds (n - 1 in the denominator);
    one value: '85.10'."""
    m = statistics.mean(values)
    if len(values) > 1:
        return f'{m:.2f} ± {statistics.stdev(values):.2f}'
    return f'{m:.2f}'


def gap_closed(method, scratch, finetune):
    """The fraction of the scratch-to-fine-tune gap a method closes, (method - scratch) / (finetune -
    scratch), on means. None when fine-tuning does not beat scratch: then the ratio means nothing."""
    return (method - scratch) / (finetune - scratch) if finetune > scratch else None


def format_gap(g):
    return 'not meaningful (fine-tune ≤ scratch)' if g is None else f'{100 * g:.1f}%'


def summarise(runs):
    """Per method: final top-1 per seed, mean, std, wall times,
    curve (test top-1 per epoch, mean over seeds); then what the seeds carry (carried)."""
    out = {}
    for m in STAGES:
        rs = [r for r in runs if r['stage'] == m]
        v = [r['metrics']['top1'] for r in rs]
        out[m] = {'seeds': [r['seed'] for r in rs], 'top1': v, 'mean': statistics.mean(v),
                  'std': statistics.stdev(v) if len(v) > 1 else None,
                  'wall_s': [r['wall_s'] for r in rs]}
        if m != 'ensemble':
            epochs, top1 = per_epoch(r['run_dir'] for r in rs)
            out[m]['curve'] = {'epoch': epochs, 'top1': [statistics.mean(t) for t in zip(*top1)]}
    gaps = {m: gap_closed(out[m]['mean'], out['scratch']['mean'], out['finetune']['mean'])
            for m in ('copy', 'distill')}
    dis = [100 * r['metrics']['disagreement'] for r in runs if r['stage'] == 'ensemble']
    return carried({'methods': out, 'gap_closed': gaps, 'disagreement_pct': dis})


def carried(s):
    """Summary s with what its seeds carry (tools/intervals.py): each transfer's share of the gap seed by seed and
    its interval ('shares'; None where a seed's fine-tuning does not beat its scratch run), each difference between
    two methods seed by seed and its interval ('differences', 'a - b'), and the order of the methods that every seed
    shows ('every_seed': from the lowest, '<' where every seed has the later one above, else '?')."""
    m = s['methods']
    top1 = {k: dict(zip(map(str, v['seeds']), v['top1'])) for k, v in m.items()}
    shares = {}
    for k in ('copy', 'distill'):
        per_seed = [gap_closed(top1[k][i], top1['scratch'][i], top1['finetune'][i]) for i in top1[k]]
        shares[k] = None if None in per_seed else {**interval(per_seed), 'per_seed': per_seed}
    differences = {f'{a} - {b}': interval([top1[a][i] - top1[b][i] for i in top1[a]])
                   for a in STAGES for b in STAGES if a != b and STAGES.index(a) > STAGES.index(b)}
    order = sorted(STAGES, key=lambda k: m[k]['mean'])
    chain = order[0]
    for lo, hi in zip(order, order[1:]):
        chain += f" {'<' if all(top1[hi][i] > top1[lo][i] for i in top1[hi]) else '?'} {hi}"
    return {**s, 'shares': shares, 'differences': differences, 'every_seed': chain}


def difference(s, a, b):
    """The interval of a - b (methods) over seeds, whichever order results.json stores it in."""
    d = s['differences']
    if f'{a} - {b}' in d:
        return d[f'{a} - {b}']
    iv = d[f'{b} - {a}']
    return {**iv, 'mean': -iv['mean'], 'low': None if iv['high'] is None else -iv['high'],
            'high': None if iv['low'] is None else -iv['low']}


def table(s):
    rows = ['| method | top-1 (%), mean ± std | per seed | gap closed | disagreement | '
            'wall time / seed | paper (ImageNet) |',
            '|---|---:|---|---:|---:|---:|---:|']
    for m in STAGES:
        r = s['methods'][m]
        per_seed = ' / '.join(f'{v:.2f}' for v in r['top1'])
        gap = ''
        paper = PAPER[m]
        if m in s['gap_closed']:
            gap = format_gap(s['gap_closed'][m])
            if s['shares'][m] is not None and s['shares'][m]['low'] is not None:
                gap += f" ({100 * s['shares'][m]['low']:.1f} to {100 * s['shares'][m]['high']:.1f})"
            paper_gap = gap_closed(PAPER[m], PAPER['scratch'], PAPER['finetune'])
            paper = f'{PAPER[m]} ({format_gap(paper_gap)})'
        disagreement = ''
        if m == 'ensemble':
            disagreement = mean_std(s['disagreement_pct']) + '%'
        rows.append(f"| {LABELS[m]} | {mean_std(r['top1'])} | {per_seed} | {gap} | "
                    f"{disagreement} | {statistics.mean(r['wall_s']) / 60:.1f} min | {paper} |")
    return '\n'.join(rows)


def budget_table(cfg, runs, prov):
    """What every training stage ran (reproduce.py gives all four the same budget), read from the command it was
    started with: its schedule, where --max-steps cut it and the lr there (share of the peak); and the wall time."""
    first = next(r for r in runs if r['stage'] in STAGES[:4])
    args = [str(a) for a in first['command']]
    given = dict(zip(args, args[1:]))
    epochs = float(given['--epochs'])
    warmup = float(given['--warmup-epochs'])
    reached = first['metrics']['epoch']
    schedule = SimpleNamespace(warmup_epochs=warmup, epochs=epochs, min_lr=0.0, min_lr_ratio=0.0)
    lr = lr_at(schedule, 1.0, reached)
    cells = [', '.join(map(str, cfg.seeds)), f'{epochs:g}', f'{warmup:g}',
             given.get('--blr', 'preset'), given.get('--batch-size', 'preset'),
             first['metrics']['step'], f'{reached / epochs:.0%}', f'{lr:.0%}',
             f"{sum(r['wall_s'] for r in runs) / 60:.1f}", cfg.jobs,
             prov.get('stage_threads') or '', f"{prov['wall_s'] / 60:.1f}"]
    return ('| seeds | epochs | warm-up (epochs) | blr | batch | steps a stage | of the schedule | '
            'lr at the last step (of the peak) | all stages (min) | at a time | threads a stage | '
            'reproduce.py (min) |\n'
            '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n'
            '| ' + ' | '.join(map(str, cells)) + ' |')


def plot(s, path, split='test', smoke=False):
    """Left: final top-1 per method: each seed a dot, the mean ± std a bar of error (points, not filled bars:
    the axis starts near the lowest number, and a bar's length would exaggerate the differences).
    Right: top-1 per epoch, mean over seeds; left out when each run was evaluated once (quick mode), since a
    curve of one point shows nothing. A smoke run (--quick) says so above its panels. Returns the figure."""
    from matplotlib.figure import Figure   # no pyplot: no global state, rendered by Agg
    curves = len(s['methods']['scratch']['curve']['epoch']) > 1
    fig = Figure(figsize=(11 if curves else 5.5, 4), layout='constrained')
    if curves:
        left, right = fig.subplots(1, 2)
    else:
        left = fig.subplots()
    n = len(s['methods']['scratch']['top1'])
    for i, m in enumerate(STAGES):
        r = s['methods'][m]
        left.scatter([i] * len(r['top1']), r['top1'], s=14, color=colour(m), alpha=0.5)
        left.errorbar(i + 0.15, r['mean'], yerr=r['std'] or 0.0, fmt='o', color=colour(m),
                      capsize=4)
        left.annotate(f"{r['mean']:.2f}", (i + 0.25, r['mean']), va='center', fontsize=8)
    left.set_xticks(range(len(STAGES)), [SHORT[m] for m in STAGES])   # the course's names
    left.set_xlim(-0.5, len(STAGES) - 0.2)
    seeds = f'each seed a dot, mean ± std over {n} seeds' if n > 1 else 'one seed'
    left.set(ylabel=f'{split} top-1 (%), final epoch',
             title=f'final top-1: {seeds}\n(the axis does not start at 0)')
    left.grid(axis='y', alpha=0.3)
    if smoke:
        fig.suptitle('a smoke run (--quick): every stage cut short,\n'
                     'so it shows that the code runs, not how the methods rank', fontsize=10)
    if curves:
        for m in STAGES[:4]:
            r = s['methods'][m]
            right.plot(r['curve']['epoch'], r['curve']['top1'], marker='o', color=colour(m),
                       label=LABELS[m])
        right.set(xlabel='epoch', ylabel=f'{split} top-1 (%)', xticks=r['curve']['epoch'],
                  title='during training (mean over seeds)\n(the axis does not start at 0)')
        right.grid(alpha=0.3)
        right.legend(fontsize=8)
    save_figure(fig, path, dpi=100)
    return fig

# -----------------------------------------------------------------------------
# Where the results go: checked before any stage runs, then written


# What a reproduction's numbers depend on: results made with other values are another reproduction's
SAME = ('data', 'seeds', 'teacher', 'quick', 'val_size', 'mae_epochs', 'epochs', 'blr',
        'batch_size', 'max_steps', 'fake_size', 'amp')


def check_results_dir(results_dir, cfg, teacher_sha256=None):
    """Refuse, before any stage runs, a --results-dir that cannot be written, or that holds results of another
    reproduction (another data set, preset, budget or teacher, by results.json) or files of unknown origin,
    unless --replace-results true: a reproduction replaces only its own results."""
    if cfg.replace_results:
        return check_out_dir(results_dir, '--results-dir')
    check_out_dir(results_dir, '--results-dir', 'results.json')
    path = os.path.join(results_dir, 'results.json')
    if not os.path.exists(path):
        return
    replace = 'pass --replace-results true to replace them'
    old = read_json(path, f'restore it (committed results: git checkout -- {path}), or {replace}',
                    {'config': dict})
    now = asdict(cfg)
    diff = [f"{flag(k)} {word(old['config'].get(k))} (here {word(now[k])})"
            for k in SAME if old['config'].get(k) != now[k]]
    if old.get('teacher_sha256') and teacher_sha256 and old['teacher_sha256'] != teacher_sha256:
        diff.append('another teacher')
    if diff:
        raise ConfigError(f"--results-dir {results_dir} holds another reproduction's results, "
                          f"made with {'; '.join(diff)}: "
                          f"choose another --results-dir, or {replace}")


def write_tables(results_dir, cfg, s, runs, prov):
    """TABLE.md and results.png in results_dir."""
    text = (f'# {cfg.data}: the tables of results.json\n\n{table(s)}\n\n'
            f'{budget_table(cfg, runs, prov)}\n')
    plot(s, os.path.join(results_dir, 'results.png'), 'validation' if cfg.val_size else 'test',
         cfg.quick)
    write_text(os.path.join(results_dir, 'TABLE.md'), text)


def write(results_dir, cfg, s, runs, root, prov):
    """results.json, TABLE.md, results.png and each stage's small files (log, per-epoch metrics, config,
    done.json; not its checkpoint) in results_dir/logs, replaced whole: never a mix of two runs' logs. prov: the
    command, commit, machine, threads a stage, wall time and teacher (a path and its sha256) of the run."""
    os.makedirs(results_dir, exist_ok=True)
    write_tables(results_dir, cfg, s, runs, prov)
    write_json(os.path.join(results_dir, 'results.json'),
               {**prov, 'config': asdict(cfg), 'summary': s, 'stages': runs, 'paper': PAPER})
    logs = os.path.join(results_dir, 'logs')
    shutil.rmtree(logs, ignore_errors=True)
    for r in runs:
        out = os.path.join(logs, os.path.relpath(r['run_dir'], root))
        os.makedirs(out, exist_ok=True)
        for f in ('log.txt', 'metrics.jsonl', 'config.json', 'done.json', 'ensemble.json'):
            src = os.path.join(r['run_dir'], f)
            if os.path.exists(src):
                shutil.copyfile(src, os.path.join(out, f))


def rewrite(results_dir, made=None):
    """TABLE.md and results.png again from results.json, after a change to how they are made: the numbers are
    the run's own (its run directories need not exist any more); what its seeds carry written into results.json, with
    `made` (util/files.page_commit: the commit and tree the report was made from) where given."""
    path = os.path.join(results_dir, 'results.json')
    fix = (f'restore it (committed results: git checkout -- {path}), '
           f'or make it again with python -m tools.reproduce')
    d = read_json(path, fix, {'config': dict, 'summary': dict, 'stages': list})
    # everything below reads the file's contents: a missing or mistyped entry is the file's fault
    try:
        d['summary'] = carried(d['summary'])   # what the seeds carry, from the numbers the file holds
        write_tables(results_dir, SimpleNamespace(**d['config']), d['summary'], d['stages'], d)
    except (KeyError, AttributeError, TypeError, ValueError, IndexError, StopIteration) as e:
        raise DamagedFile(f'{path} does not hold what reproduce.py writes '
                          f'({type(e).__name__}: {e}): {fix}') from None
    if made is not None:
        d['report'] = made
    write_json(path, d)
    print(f'written: {results_dir}/results.json (what its seeds carry), TABLE.md, results.png (from results.json)')


if __name__ == '__main__':
    if len(sys.argv) not in (2, 4) or sys.argv[2:] not in ([], ['--dirty', 'true'], ['--dirty', 'false']):
        sys.exit('usage: python -m tools.reproduce_report RESULTS_DIR [--dirty true] '
                 '(a directory reproduce.py wrote, with results.json)')
    # a report is made from committed code: refused first where it has uncommitted changes, unless --dirty true
    run_main(lambda: rewrite(sys.argv[1], page_commit(sys.argv[2:] == ['--dirty', 'true'])))
