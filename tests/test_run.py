"""util/run.py's finite check: a run that diverges keeps its last finite checkpoint, says which value was not finite
at which step, and goes on from it with a lower lr; one that diverges before any checkpoint says there is none."""
import json

import torch

from conftest import TINY, run_in_process
import finetune


def test_a_run_that_diverges_keeps_a_finite_checkpoint_and_goes_on_with_a_lower_lr(tmp_path, monkeypatch):
    """From step 3 the loss is scaled by 1e30: the weights stay finite (AdamW's step is exp_avg / sqrt(inf) = 0)
    but the optimizer's second moment is inf. The checkpoint of step 2 was kept, that of step 4 was written with
    inf in it and called 'the last good checkpoint' once the loss went NaN, and the advised lower --blr refused.
    (A higher --blr is allowed too, and diverges again from the same checkpoint: nothing is lost.)"""
    calls, plain = [0], finetune.soft_cross_entropy   # the fine-tuning loss's cross-entropy

    def blowing_up(*args, **kw):
        calls[0] += 1
        return plain(*args, **kw) * (1e30 if calls[0] >= 3 else 1)
    monkeypatch.setattr(finetune, 'soft_cross_entropy', blowing_up)
    out, args = tmp_path / 'run', [*TINY, '--amp', 'off', '--save-every', '2', '--log-every', '100']
    msg = run_in_process(monkeypatch, finetune, *args, '--out-dir', out)
    assert msg and 'optimizer' in msg and 'is inf at step 4' in msg and 'the last finite checkpoint (step 2)' in msg
    assert str(out / 'checkpoint.pt') in msg, msg
    ck = torch.load(out / 'checkpoint.pt', weights_only=True)
    assert ck['step'] == 2 and all(v.isfinite().all() for s in ck['optimizer']['state'].values()
                                   for v in s.values() if torch.is_tensor(v))
    monkeypatch.setattr(finetune, 'soft_cross_entropy', plain)
    assert run_in_process(monkeypatch, finetune, *args, '--out-dir', out, '--resume', 'true', '--blr', '5e-4') is None
    config = json.loads((out / 'config.json').read_text())
    resume = config['resumes'][-1]
    assert resume['changed']['blr'] == [1e-3, 5e-4] and resume['after_divergence']['step'] == 4
    assert 'diverged' not in config                             # allowed once, from the checkpoint kept
    msg = run_in_process(monkeypatch, finetune, *args, '--out-dir', out, '--resume', 'true', '--blr', '1e-4')
    assert msg and '--blr 0.0005 -> 0.0001' in msg, msg         # without a divergence, the lr is the run's


def test_a_divergence_before_any_checkpoint_says_there_is_none(monkeypatch, tmp_path):
    """--weight-decay 1e308 diverges at once: the line advised a resume, with no checkpoint to resume."""
    msg = run_in_process(monkeypatch, finetune, *TINY, '--weight-decay', '1e308', '--out-dir', tmp_path / 'r')
    assert msg and 'the run diverged and stopped; no checkpoint was written yet' in msg, msg
    assert not (tmp_path / 'r' / 'checkpoint.pt').exists() and '--resume' not in msg, msg
