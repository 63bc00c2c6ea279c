"""
A committed result replayed: each run of a page is started again from its recorded config (its script and flags, its
thread count) for its first steps, and the training losses it logs are compared with the ones its committed log.txt
holds. A change that moves a committed number (another random draw, another order of operations) moves these losses
first; tests/test_replay.py replays every committed page this way and names the page.

    python -m tools.replay results/fashion-mnist-quick                    # each run to its first logged line >= step 10
    python -m tools.replay results/fashion-mnist/logs --steps 200         # the reproduction's first 200 steps

A run is replayed as it ran: the same script, flags and seed (its output folder aside), OMP_NUM_THREADS as it had it
(the pages' runs had 1 thread each: a bf16 matmul sums in another order with 2), the same autocast. A bf16 run is
replayed only where this CPU runs bf16 (a CPU without it trains in fp32: other numbers), and a run whose teacher file
is not in the repository is not replayed; each is reported as skipped, with the reason.
"""
import argparse
import glob
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import NamedTuple

from util.files import cpu_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The largest difference between a replayed loss and the logged one that still counts as the same run. Both are
# written with 4 decimals (the replayed one averaged over the steps of the logged line): 1.5e-4 is their rounding.
# Measured on one AMD EPYC, its AVX-512 kernels against its AVX2 ones (ATEN_CPU_CAPABILITY=avx2), over the quick pages'
# first 100 steps: fp32 runs replay to the 4th decimal, and bf16 runs do to step 10; by step 100 a bf16 run's losses
# part by up to 0.008. Between two CPUs with bf16: of the 4 runs an Intel Xeon (AMX) made for the feature analysis,
# replayed on that AMD EPYC, 3 match to step 100 and one parts by 0.005 there; the variants' 60 runs, made on that Xeon
# with torch 2.15.0, replay on the EPYC with torch 2.14.1 to the 4th decimal through step 10 (REFERENCE.md, "The
# numbers are the code's"). So a line past step 10 is held to LATER where the torch release is not the run's, or, for
# bf16, the CPU is not the one its page records. What it guards: another draw of one classifier head (std 2e-5) moves the quick pages' fine-tuning at step
# 100 by 5e-4 (fp32) and 1e-3 (bf16).
TOLERANCE = 1.5e-4
LATER = 0.02
STEP = re.compile(r'step (\d+)/\d+ \| (.*?) \| lr')
AUTOCAST = re.compile(r'autocast (\S+)')
FLAGS_SET_HERE = ('--out-dir', '--max-steps', '--log-every', '--resume', '--overwrite')


class Run(NamedTuple):
    path: str          # the committed folder: config.json and log.txt
    script: str
    flags: list        # the recorded command line's flags, less FLAGS_SET_HERE
    threads: str       # OMP_NUM_THREADS it ran with
    losses: dict       # {step: {name: value}}: each line of its first launch
    autocast: str      # 'torch.bfloat16' | 'None' (fp32) ...: as its log says
    cpu: str           # the processor it ran on, where its page records it (done.json), else None
    torch: str         # the torch release it ran on ('2.14.1')


def logged(lines):
    """{step: {loss name: value}} of a launch's log lines ('step 100/1404 | ce 1.6828 attn 3.8 | lr ...'), and the
    autocast it states; only its first launch (a resumed run logs a second one after it)."""
    losses, autocast = {}, 'None'
    for line in lines:
        m = AUTOCAST.search(line)
        if m and not losses:
            autocast = m[1]
        m = STEP.search(line)
        if not m:
            continue
        step = int(m[1])
        if losses and step <= max(losses):
            break   # a second launch
        words = m[2].split()
        losses[step] = {k: float(v) for k, v in zip(words[::2], words[1::2])}
    return losses, autocast


def read_run(path, threads='1'):
    """The committed run in folder `path` (its config.json's command, its log.txt's losses)."""
    with open(os.path.join(path, 'config.json')) as f:
        config = json.load(f)
    argv = config['argv']
    flags, i = [], 1
    while i < len(argv):
        takes = i + 1 < len(argv) and not argv[i + 1].startswith('--')
        if argv[i] not in FLAGS_SET_HERE:
            flags += argv[i:i + 1 + takes]
        i += 1 + takes
    with open(os.path.join(path, 'log.txt')) as f:
        losses, autocast = logged(f)
    done, cpu = os.path.join(path, 'done.json'), None
    if os.path.exists(done):
        with open(done) as f:
            done = json.load(f)
        threads = done.get('stage_threads') or threads
        cpu = done.get('machine', '').split(',')[0] or None
    return Run(path, config.get('script') or os.path.basename(argv[0]), flags, threads, losses, autocast, cpu,
               config.get('torch', '').split('+')[0])


def runs_of(page):
    """Every run committed under folder `page`, in order: folders holding config.json and log.txt."""
    found = sorted(glob.glob(os.path.join(page, '**', 'config.json'), recursive=True))
    return [read_run(os.path.dirname(p)) for p in found if os.path.exists(os.path.join(os.path.dirname(p), 'log.txt'))]


def missing_input(run):
    """Why `run` cannot be replayed here (a teacher or --init file not in the repository), else None."""
    for flag in ('--teacher', '--init'):
        if flag in run.flags:
            source = run.flags[run.flags.index(flag) + 1]
            if os.sep in source and not os.path.exists(os.path.join(ROOT, source)):
                return f'its {flag} {source} is not in the repository'
    return None


def replay(run, steps, work, env=None):
    """Run `run` again (in folder `work`) to its first logged line at or after step `steps`, logging every step. Returns
    [(step, loss name, logged, replayed)] for each of its logged lines up to there, the replayed value averaged over
    the same steps as the logged one; or a string saying why it was not replayed."""
    why = missing_input(run)
    if why:
        return why
    last = min((s for s in run.losses if s >= steps), default=max(run.losses))
    command = [sys.executable, run.script, *run.flags, '--out-dir', work, '--max-steps', str(last),
               '--log-every', '1']
    env = {**os.environ, **(env or {}), 'OMP_NUM_THREADS': run.threads, 'PYTHONUNBUFFERED': '1'}
    lines = []
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as p:
        for line in p.stdout:
            lines.append(line)
            m = STEP.search(line)
            if m and int(m[1]) == last:   # what it is replayed for is logged: its evaluation is not waited for
                p.kill()
                break
        p.wait()
    if not (m and int(m[1]) == last):
        return f'FAILED (exit {p.returncode}): {"".join(lines[-20:])}'
    replayed, autocast = logged(lines)
    if autocast != run.autocast:
        return f'logged under autocast {run.autocast}; this machine runs {autocast}'
    rows, before = [], 0
    for step in sorted(s for s in run.losses if s <= last):
        for name, value in run.losses[step].items():
            window = [replayed[s][name] for s in range(before + 1, step + 1)]
            rows.append((step, name, value, sum(window) / len(window)))
        before = step
    return rows


def tolerance(run, step):
    """How far a replayed loss of `run` at logged step `step` may lie from the logged one (TOLERANCE, LATER)."""
    same_torch = run.torch in ('', importlib.metadata.version('torch').split('+')[0])
    if step <= 10 or same_torch and (run.autocast == 'None' or run.cpu == cpu_name()):
        return TOLERANCE
    return LATER


def report(run, result):
    """(whether it matches, its lines for the terminal)."""
    where = os.path.relpath(run.path, ROOT)
    if isinstance(result, str):
        return not result.startswith('FAILED'), [f'{where}: not replayed: {result}']
    moved = [abs(a - b) > tolerance(run, s) for s, _, a, b in result]
    lines = [f'{where}: step {s} {name} logged {a:.4f} replayed {b:.4f}' + ('  <- moved' if m else '')
             for (s, name, a, b), m in zip(result, moved)]
    return not any(moved), lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('pages', nargs='+', help='a page folder (results/fashion-mnist-quick) or a run folder')
    parser.add_argument('--steps', type=int, default=10, help='replay to the first logged line at or after it')
    args = parser.parse_args()
    same = True
    for page in args.pages:
        for run in runs_of(page):
            with tempfile.TemporaryDirectory() as work:
                ok, lines = report(run, replay(run, args.steps, os.path.join(work, 'run')))
            same &= ok
            print('\n'.join(lines), flush=True)
    sys.exit(0 if same else 1)


if __name__ == '__main__':
    main()
