"""The numbers are the code's: every committed result is replayed. Each run of each committed page is started again
from its recorded config (tools/replay.py) for its first steps, and the training losses it logs must be those its
committed log.txt holds. A change that moves a committed number (another random draw, another order of operations)
fails here and names the page: make the page again, and say so. A bf16 page is replayed only where this CPU runs
bf16, and a run whose teacher is not in the repository not at all; each is skipped with the reason."""
import os

import pytest

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
    run = replay.Run('x', 'finetune.py', [], '1', {1: {'ce': 2.3025}, 100: {'ce': 1.5592}}, 'None', None)
    assert replay.report(run, [(1, 'ce', 2.3025, 2.3026), (100, 'ce', 1.5592, 1.55925)])[0]
    same, lines = replay.report(run, [(1, 'ce', 2.3025, 2.3025), (100, 'ce', 1.5592, 1.5597)])
    assert not same and lines[1].endswith('<- moved')
