"""The runs of tools/followup.sh, collected, and the page written from them: the follow-up's finding in miniature
("Attention Transfer Is Not Universally Effective for Vision Transformers", arXiv 2605.07191). Each run's test top-1 at
its end, per seed; each transfer's gain over the scratch baseline of its own student, and the matched student's gain
over the plain one, as the mean ± std over seeds of the per-seed differences (the same seed pairs the runs). Writes
followup.json, then followup.png and README.md from that json alone: every number the page states is one of the
json's (tests/test_followup.py recomputes them).
    python -m tools.followup --out results/fashion-mnist/followup            # collect, then the page
    python -m tools.followup --out results/fashion-mnist/followup --page-only true   # the page from followup.json
"""
import math
import os
import re
import textwrap
from dataclasses import dataclass
from statistics import mean

from matplotlib.figure import Figure

from tools.intervals import interval, paired, side
from tools.palette import PALETTE, SHORT, png
from tools.reproduce_report import records
from util.config import option
from util.files import DamagedFile, page_commit, read_bytes, read_json, replacing, write_json, write_text
from util.launch import parse_config, run_main

STUDENTS = ('plain', 'matched')
METHODS = ('scratch', 'copy', 'distill')
TRANSFERS = ('copy', 'distill')
# what tools/followup.sh's FAMILY gives the teacher (and the matched student): its flags, in words
FAMILIES = {'clip': "CLIP's LayerNorm before the blocks and QuickGELU",
            'dinov2': "DINOv2's layer scale (from 1e-5)"}
# what they do to what the maps route, in words (QuickGELU's largest distance from GELU: 0.0203)
ROUTING = {
    'clip': "The LayerNorm sets each token's scale before the first map routes it, and QuickGELU is "
            "within 0.021 of GELU everywhere, so the maps' inputs barely change.",
    'dinov2': "Layer scale multiplies what each block's attention and MLP add to the tokens by a "
              "learned factor per channel, from 1e-5, so it sets how much of each map's routing "
              'reaches the tokens.'}
FIX = 'run that seed again (tools/followup.sh), or move it away'
WIDTH = 118   # the page's lines, as the hand-written pages wrap theirs


@dataclass
class FollowupConfig:
    out: str = option('results/fashion-mnist/followup', "tools/followup.sh's OUT: the runs' records; "
                      'followup.json, followup.png and README.md are written there')
    family: str = option('clip', "the teacher's components (tools/followup.sh's FAMILY)", choices=tuple(FAMILIES))
    command: str = option('bash tools/followup.sh', 'the command the page gives to make it again')
    rival: str = option('', "the other family's OUT, whose teacher --family's was chosen against (their masked MSE "
                        "on the images both held out); '' = no choice stated")
    page_only: bool = option(False, 'only followup.png and README.md, from followup.json as it is')
    dirty: bool = option(False, 'make the page from code with uncommitted changes (the page records it); '
                                'otherwise such a tree is refused')

# -----------------------------------------------------------------------------
# Collect: the runs' records -> followup.json


def finite(value, path, what):
    """value if it is a finite number, else DamagedFile naming the file it was read from."""
    if type(value) not in (int, float) or not math.isfinite(value):
        raise DamagedFile(f'{path}: {what} is {value!r}, not a finite number: {FIX}')
    return value


def seeds(folder):
    """{seed: run folder} of the seed<k> folders under folder that hold a finished run (metrics.jsonl)."""
    if not os.path.isdir(folder):
        return {}
    found = {int(e[4:]): os.path.join(folder, e) for e in os.listdir(folder) if re.fullmatch(r'seed\d+', e)}
    return {k: found[k] for k in sorted(found) if os.path.exists(os.path.join(found[k], 'metrics.jsonl'))}


def collect(cfg):
    """Every recorded run's final top-1 ({arm: {seed: top-1}}, arm: method-student), the teacher's record, how long it
    all took, and what the runs were: their commit, their machine, whether any was cut short (--max-steps)."""
    logs = os.path.join(cfg.out, 'logs')
    runs, configs, wall = {}, [], 0.0
    for method in METHODS:
        for student in STUDENTS:
            arm = f'{method}-{student}'
            found = seeds(os.path.join(logs, arm))
            if not found:
                raise DamagedFile(f'{os.path.join(logs, arm)} holds no finished run of tools/followup.sh: {FIX}')
            runs[arm] = {str(k): finite(records(d)[-1].get('top1'), d, "its last record's top1")
                         for k, d in found.items()}
            configs += [os.path.join(d, 'config.json') for d in found.values()]
    teacher = os.path.join(logs, 'teacher', 'seed0')
    mse = finite(records(teacher)[-1].get('mse'), teacher, "its last record's mse")
    configs.append(os.path.join(teacher, 'config.json'))
    for path in configs:
        wall += finite(float(read_bytes(os.path.join(os.path.dirname(path), 'wall_s.txt'), FIX)), path, 'its time')
    made = [read_json(p, FIX) for p in configs]
    taught = sorted({c['teacher_sha256'] for c in made if c.get('teacher_sha256')})
    if len(taught) > 1:   # a teacher re-made while the runs went on: their numbers are not one experiment's
        raise DamagedFile(f'the transfer runs in {logs} trained from {len(taught)} teacher files (sha256 '
                          f"{', '.join(t[:12] for t in taught)}): move the runs of the old one away and run "
                          f'tools/followup.sh again')
    machine = os.path.join(cfg.out, 'machine.txt')
    return {'choice': choice(cfg, mse, made[-1]) if cfg.rival else None, 'other': other(cfg),
            'family': cfg.family, 'components': FAMILIES[cfg.family], 'command': cfg.command,
            'machine': read_bytes(machine, FIX).decode().strip() if os.path.exists(machine) else 'not recorded',
            'git_commit': sorted({c.get('git_commit', 'unknown') for c in made}),
            'cut_short': any(c.get('max_steps', 0) for c in made),
            'val_size': made[0].get('val_size', 0),
            'teacher': {'held_out_mse': mse, 'epochs': made[-1]['epochs'], 'sha256': taught},
            'wall_s': wall, 'runs': runs}


def choice(cfg, mse, config):
    """{family: the teacher's masked MSE on the training images it held out} of --family's teacher and the other
    family's (in --rival), and how many they held out: what FAMILY was chosen on, before any transfer ran."""
    rival = next(f for f in FAMILIES if f != cfg.family)
    teacher = os.path.join(cfg.rival, 'logs', 'teacher', 'seed0')
    again = f'make it (STOP=teacher FAMILY={rival} bash tools/followup.sh), or leave --rival out'
    if not os.path.exists(os.path.join(teacher, 'metrics.jsonl')):
        raise DamagedFile(f'{teacher} holds no teacher of tools/followup.sh: {again}')
    theirs = read_json(os.path.join(teacher, 'config.json'), again)
    if theirs.get('val_size') != config.get('val_size') or not config.get('val_size'):
        raise DamagedFile(f"{teacher}: its teacher held out {theirs.get('val_size')} training images, this one "
                          f"{config.get('val_size')}: no comparison; {again}")
    return {'val_size': config['val_size'],
            'mse': {cfg.family: mse, rival: finite(records(teacher)[-1].get('mse'), teacher, "its last record's mse")}}


def other(cfg):
    """The other family's interaction per transfer, where its runs were collected (its followup.json), and its page
    from --out's: each page states both teachers' headline. None without --rival or before its runs are collected."""
    path = os.path.join(cfg.rival, 'followup.json') if cfg.rival else None
    if not path or not os.path.exists(path):
        return None
    again = f'collect it again (python -m tools.followup --out {cfg.rival})'
    theirs = read_json(path, f'{again}, or move it away')
    try:
        return {'components': theirs['components'], 'interaction': theirs['summary']['interaction'],
                'page': os.path.relpath(os.path.join(cfg.rival, 'README.md'), cfg.out)}
    except (KeyError, TypeError) as e:
        raise DamagedFile(f'{path} holds no interaction ({type(e).__name__}: {e}): {again}') from None


def summarise(runs):
    """What the page states, from the runs alone, each over seeds with its interval (tools/intervals.py): each arm's
    top-1; each transfer's gain over its own student's scratch, seed by seed; the matched student against the plain
    one, per method; per transfer the interaction, the matched student's gain less the plain student's, seed by seed
    (the follow-up's claim: the components make the transfer); and whether the follow-up's failure shows: True where
    the intervals carry it (the plain student's gain below 0, the matched student's above), False where either carries
    the other side, else None (the seeds do not decide it)."""
    arms = {arm: interval(top1.values()) for arm, top1 in runs.items()}
    gains = {f'{m}-{s}': paired(runs[f'{m}-{s}'], runs[f'scratch-{s}']) for m in TRANSFERS for s in STUDENTS}
    each = {f'{m}-{s}': {k: v - runs[f'scratch-{s}'][k] for k, v in runs[f'{m}-{s}'].items()
                         if k in runs[f'scratch-{s}']} for m in TRANSFERS for s in STUDENTS}   # per seed
    interaction = {m: paired(each[f'{m}-matched'], each[f'{m}-plain']) for m in TRANSFERS}
    matched = {m: paired(runs[f'{m}-matched'], runs[f'{m}-plain']) for m in METHODS}
    failure = {}
    for m in TRANSFERS:
        plain, like = side(gains[f'{m}-plain']), side(gains[f'{m}-matched'])
        failure[m] = True if (plain, like) == ('below', 'above') else \
            False if 'above' == plain or 'below' == like else None
    return {'arms': arms, 'gains': gains, 'interaction': interaction, 'matched_minus_plain': matched,
            'failure_reproduced': failure}

# -----------------------------------------------------------------------------
# The figure and the page, from followup.json


def pm(s):
    """'85.06 ± 0.17' (one seed: '85.06')."""
    return f"{s['mean']:.2f}" if s['std'] is None else f"{s['mean']:.2f} ± {s['std']:.2f}"


def signed(s):
    """'+1.20 ± 0.30' points: a difference."""
    return f"{s['mean']:+.2f}" if s['std'] is None else f"{s['mean']:+.2f} ± {s['std']:.2f}"


def where(s, above='above', below='below'):
    """Where a difference lies against 0 as its 95% interval over seeds says ('above: 95% interval +0.90 to
    +2.10'): above or below where the whole interval lies there, else not decided by the seeds."""
    word = {'above': above, 'below': below}.get(side(s), 'not decided by the seeds')
    return word if s['low'] is None else f"{word}: 95% interval {s['low']:+.2f} to {s['high']:+.2f}"


def plot(result, path):
    """Each arm's test top-1 per seed (dots) and mean (bar): the plain student hollow, the matched one filled, in the
    methods' colours."""
    fig = Figure(figsize=(7, 4.2), layout='constrained')
    ax = fig.subplots()
    for i, method in enumerate(METHODS):
        for j, student in enumerate(STUDENTS):
            x = i + (j - 0.5) * 0.35
            top1 = list(result['runs'][f'{method}-{student}'].values())
            face = PALETTE[method] if student == 'matched' else 'none'
            ax.scatter([x] * len(top1), top1, s=24, facecolors=face, edgecolors=PALETTE[method])
            ax.scatter(x, mean(top1), marker='_', s=400, color=PALETTE[method])
    ticks = [i + (j - 0.5) * 0.35 for i in range(len(METHODS)) for j in range(len(STUDENTS))]
    ax.set_xticks(ticks, [f'{SHORT[m]}\n{s}' for m in METHODS for s in STUDENTS], fontsize=8)
    ax.set(ylabel='top-1 (%): each seed a dot, the mean a bar',
           xlabel="plain: a plain ViT student (hollow); matched: the teacher's components (filled)")
    ax.set_title(f"students of an MAE teacher with {result['components']}\n"
                 '(the y axis does not start at 0)', fontsize=10)
    with replacing(path) as f:
        f.write(png(fig, dpi=200))
    return fig


def table(result):
    """The page's table, in Markdown: each student's scratch, copy and distillation top-1, each transfer's gain over
    its own student's scratch, and the matched student against the plain one (the notebook shows it too)."""
    arms, gains, matched = (result['summary'][k] for k in ('arms', 'gains', 'matched_minus_plain'))
    lines = ['| student | scratch | copy (gain over scratch) | distillation (gain over scratch) |',
             '|---|---:|---:|---:|']
    for student in STUDENTS:
        cells = [pm(arms[f'scratch-{student}'])]
        cells += [f"{pm(arms[f'{m}-{student}'])} ({signed(gains[f'{m}-{student}'])})" for m in TRANSFERS]
        lines.append(f"| {student} | {' | '.join(cells)} |")
    lines.append(f"| matched − plain | {' | '.join(signed(matched[m]) for m in METHODS)} |")
    return '\n'.join(lines)


def findings(result):
    """What the runs say, one fact a sentence, as Markdown bullets: per transfer, the interaction (the follow-up's
    claim), each student's gain over its own scratch run, the matched student against the plain one, and whether the
    follow-up's failure shows; the components' effect on scratch training; the other teacher's interaction, where its
    runs were collected."""
    s = result['summary']
    gains, matched, interaction = s['gains'], s['matched_minus_plain'], s['interaction']
    lines = []
    for m in TRANSFERS:
        plain, like = gains[f'{m}-plain'], gains[f'{m}-matched']
        verdict = {True: 'shows here', False: 'does not show here',
                   None: 'is not decided by these seeds'}[s['failure_reproduced'][m]]
        said = [f'The interaction is {signed(interaction[m])} points ({where(interaction[m])}).',
                f'The plain student ends {signed(plain)} points against its scratch run ({where(plain)}).',
                f'The matched student ends {signed(like)} points against its own ({where(like)}).',
                f'Their top-1 differs by {signed(matched[m])} points, matched against plain '
                f'({where(matched[m])}).',
                "The follow-up's failure (the plain student below its scratch run, the matched one above its "
                f'own) {verdict}.']
        lines.append(f'- **{SHORT[m].capitalize()}**. ' + ' '.join(said))
    scratch = matched['scratch']
    lines.append(f'- **Scratch**. The components alone move training from scratch by {signed(scratch)} points '
                 f"({where(scratch, 'up', 'down')}). The follow-up finds they do not help it.")
    theirs = result.get('other')
    if theirs:
        copy, distill = (theirs['interaction'][m] for m in TRANSFERS)
        lines.append(f"- **The other teacher** ([its page]({theirs['page']})). "
                     f"With {theirs['components']}, the interaction is {signed(copy)} points after copy "
                     f'({where(copy)}). After distillation it is {signed(distill)} points ({where(distill)}).')
    return lines


def paragraph(sentences):
    """Sentences as one paragraph, wrapped as the hand-written pages wrap theirs."""
    return textwrap.fill(' '.join(sentences), WIDTH, break_on_hyphens=False)


def page(result):
    """README.md's text: every number from result (followup.json), none written by hand; one fact a sentence."""
    n = result['summary']['arms']['scratch-plain']['n']
    split = (f"{result['val_size']} training images held out (the validation split)" if result['val_size']
             else 'the 10,000 test images')
    teacher = result['teacher']
    claim = [
        'The follow-up "Attention Transfer Is Not Universally Effective for Vision Transformers" (arXiv 2605.07191) '
        "reports that a student without its teacher's architectural components fails to take the teacher's "
        'attention.',
        'It reports that the same components, randomly initialised, make the transfer work again.',
        'Its claim is an interaction: the matched student gains from the teacher, the plain one does not.',
        'It publishes no list of the components, and no code.',
        "Which parts of a family count as its components here is this project's reading of that family's code "
        '(REFERENCE.md, the teachers by name).']
    setup = [
        f"Here the teacher is an MAE ViT with {result['components']}.",
        ROUTING[result['family']],
        f"It was pre-trained by `mae_pretrain.py` as the shipped teacher was, {teacher['epochs']} epochs, with those "
        'components added.',
        f"Its masked MSE on the images it held out is {teacher['held_out_mse']:.4f}.",
        f"Its file's sha256 is {', '.join(teacher['sha256']) or 'not recorded'}."]
    if result['choice']:
        (family, mse), (rival, theirs) = result['choice']['mse'].items()
        which = 'the lower, the better teacher' if mse < theirs else 'not the lower'
        setup += [f'The first teacher was chosen before any transfer ran, on the {result["choice"]["val_size"]} '
                  'training images both teachers held out: the lower masked MSE there.',
                  f"This teacher's masked MSE there is {mse:.4f} ({which}); the teacher with {FAMILIES[rival]}, made "
                  f'the same way, {theirs:.4f}.',
                  'So this teacher was the first.' if mse < theirs else
                  'So the other teacher was the first; this one was run second, for what its components do to the '
                  'routing.']
    setup += [
        "The teacher's maps go to two students, by copy and by distillation.",
        'The plain student is a plain ViT (`--student-arch plain`).',
        "The matched student has the teacher's components, randomly initialised "
        '(`--student-arch teacher`).',
        'Each student also trains from scratch (`finetune.py`, built the same way): '
        'the baseline of its transfers.',
        f"The budget is the committed reproduction's: 3 epochs, blr 4e-3, {n} seeds.",
        f'Every number is top-1 (%) on {split} after the last epoch.',
        '± is the standard deviation over seeds; for a difference, over the per-seed differences.',
        "The interaction is the matched student's gain over its scratch run less the plain student's, "
        'seed by seed.',
        'A difference is called above or below 0 only where its 95% interval over seeds lies wholly there '
        '(tools/intervals.py).']
    lines = ['# When attention transfer fails: the follow-up in miniature', '', paragraph(claim), '',
             paragraph(setup), '']
    if result['cut_short']:
        lines += ['**Its runs were cut short (`--max-steps`): this page checks the pipeline and is not a result.**', '']
    lines += ['Make it again (one core a run; a run already recorded is skipped):', '',
              f"    {result['command']}",
              f"    # measured: {result['machine']}; commit {', '.join(result['git_commit'])}; "
              f"{result['wall_s'] / 3600:.1f} h of runs", '',
              "![each arm's top-1 per seed and its mean](followup.png)", '', table(result),
              '', '## What it says', '']
    lines += [textwrap.fill(line, WIDTH, subsequent_indent='  ', break_on_hyphens=False) for line in findings(result)]
    lines += ['', 'The numbers: [`followup.json`](followup.json); each run\'s log, metrics, config and wall time: '
              '[`logs/`](logs/).', '']
    return '\n'.join(lines)


def main():
    cfg = parse_config(FollowupConfig, {})
    made = page_commit(cfg.dirty)   # refused first: a page is made from committed code
    path = os.path.join(cfg.out, 'followup.json')
    if not cfg.page_only:
        result = collect(cfg)   # a damaged file: one line naming it (run_main)
        write_json(path, {**result, 'summary': summarise(result['runs']), 'page': made})
    result = read_json(path, 'run python -m tools.followup without --page-only to collect it')
    plot(result, os.path.join(cfg.out, 'followup.png'))
    write_text(os.path.join(cfg.out, 'README.md'), page(result))
    print(f"written: {path}, followup.png, README.md ({result['wall_s'] / 3600:.2f} h of runs)")


if __name__ == '__main__':
    run_main(main)
