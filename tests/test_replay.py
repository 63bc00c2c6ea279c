"""The numbers are the code's: every committed result is replayed. Each run of each committed page is started again
from its recorded config (tools/replay.py) for its first steps, and the training losses it logs must be those its
committed log.txt holds. A change that moves a committed number (another random draw, another order of operations)
fails here and names the page: make the page again, and say so. A bf16 page is replayed only where this CPU runs
bf16, and a run whose teacher is not in the repository not at all; each is skipped with the reason."""
import json
import os

import pytest
import torch

from conftest import ROOT
from tools import replay

# page: the step its runs are replayed to (their first logged line at or after it). The reproduction and the quick
# pages to step 100, where a head drawn otherwise shows; every other page's runs to step 10: seconds each
PAGES = {
    'results/fashion-mnist/logs': 100,
    'results/fashion-mnist-quick/logs': 100,
    'results/fashion-mnist-quick-fp32/logs': 100,
    'results/fashion-mnist/variants/logs': 10,
    'results/fashion-mnist/features/models/logs': 10,
    'results/fashion-mnist/followup/logs': 10,
    'results/fashion-mnist/followup-dinov2/logs': 10,
    'results/fashion-mnist/validation/copy-schedule': 10,
}
RUNS = [(page, run) for page in PAGES for run in replay.runs_of(os.path.join(ROOT, page))]


def test_every_page_has_runs_to_replay():
    assert all(any(p == page for p, _ in RUNS) for page in PAGES)


@pytest.mark.parametrize('page, run', RUNS, ids=[os.path.relpath(r.path, ROOT) for _, r in RUNS])
def test_a_committed_run_is_what_the_code_makes(page, run, tmp_path):
    result = replay.replay(run, PAGES[page], str(tmp_path / 'run'))
    if isinstance(result, str) and not result.startswith('FAILED'):
        pytest.skip(result)
    same, lines = replay.report(run, result)
    assert same, f'{page}: the code no longer makes this committed result; make the page again:\n' + '\n'.join(lines)


def test_a_log_is_read_as_its_first_launch_logged_it():
    lines = ['lr 0.002 | 1 process(es) on cpu | autocast torch.bfloat16',
             'epoch   0.00 step 1/160 | ce 2.3025 | lr 0.00e+00 | first step',
             'epoch   0.01 step 10/160 | ce 2.2947 attn 3.9084 | lr 1.92e-04 | 91 img/s',
             'resumed at step 5',
             'epoch   0.01 step 6/160 | ce 2.1 | lr 1.92e-04 | 91 img/s']
    assert replay.logged(lines) == ({1: {'ce': 2.3025}, 10: {'ce': 2.2947, 'attn': 3.9084}}, 'torch.bfloat16')


def test_a_moved_loss_fails_and_a_rounded_one_does_not():
    here = torch.__version__.split('+')[0]   # made on this torch: held to the tight tolerance at every step
    run = replay.Run('x', 'finetune.py', [], '1', {1: {'ce': 2.3025}, 100: {'ce': 1.5592}}, 'None', None, here)
    assert replay.report(run, [(1, 'ce', 2.3025, 2.3026), (100, 'ce', 1.5592, 1.55925)])[0]
    same, lines = replay.report(run, [(1, 'ce', 2.3025, 2.3025), (100, 'ce', 1.5592, 1.5597)])
    assert not same and lines[1].endswith('<- moved')


def test_the_notebooks_stored_runs_are_what_the_code_makes(tmp_path):
    """tutorial.ipynb's four training runs, replayed: each command the stored copy printed, on the same slice of
    Fashion-MNIST (tools/tutorial.write_slice) with the threads the stored copy says it trained with, run to its end;
    its final test top-1 must be the stored copy's key number, to the hundredth. Where this machine is not the one that
    stored them (another processor, torch or precision: a short run's bf16 numbers move by points), skipped, saying
    so; tests/test_tutorial.py then holds them to their tolerance."""
    import re
    import subprocess
    import sys
    import nbformat
    from test_tutorial import NOTEBOOK, key_numbers, outputs
    from tools import tutorial
    from util.files import cpu_name
    from util.launch import amp_dtype
    nb = nbformat.read(NOTEBOOK, as_version=4)
    text = ''.join(o.text for o in outputs(nb, 'stream'))
    stored, (cpu, threads, precision) = key_numbers(nb), re.search(r'the runs train on (.+) \((\d+) threads\), '
                                                                   r'(autocast \w+|fp32)', text).groups()
    amp = amp_dtype('auto', torch.device('cpu'))
    here = (cpu_name(), torch.__version__.split('+')[0], 'autocast ' + str(amp).split('.')[-1] if amp else 'fp32')
    if here != (cpu, stored['torch'], precision):
        pytest.skip(f'stored on {cpu}, torch {stored["torch"]}, {precision}; here {", ".join(here)}')
    commands = re.findall(r'^python (\S+\.py) (--data .*--out-dir runs/tutorial/(\w+) .*)$', text, re.M)
    assert sorted(name for *_, name in commands) == sorted(stored['top1'])
    data = None
    for script, flags, name in commands:
        flags = flags.split()
        given = dict(zip(flags, flags[1:]))
        if data is None:   # runs/tutorial/fashion-mnist-<train>-<test>
            n_train, n_test = map(int, re.search(r'(\d+)-(\d+)$', given['--data-dir']).groups())
            data = tutorial.write_slice(n_train, n_test, str(tmp_path))
        flags[flags.index('--data-dir') + 1], flags[flags.index('--out-dir') + 1] = data, str(tmp_path / name)
        done = subprocess.run([sys.executable, script, *flags], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, 'OMP_NUM_THREADS': threads}, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        top1 = json.loads((tmp_path / name / 'metrics.jsonl').read_text().splitlines()[-1])['top1']
        assert round(top1, 2) == stored['top1'][name], \
            f'tutorial.ipynb: {name} ends at {top1:.2f}, the stored copy at {stored["top1"][name]}: re-store it'
