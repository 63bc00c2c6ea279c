"""In-process unit tests of util/engine.py and util/launch.py (config parsing, schedule, optimiser groups, loss, AMP), and
the exactness of resume (finetune.py runs in subprocesses, compared tensor by tensor); util/run.py's EMA."""
import dataclasses
import math
import os
import re
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import finetune, read_metrics
from finetune import PRESETS, FinetuneConfig
from util.launch import parse_config
from util.config import ConfigError
from util.engine import build_optimizer, lr_at, soft_cross_entropy
from util.launch import amp_dtype
from vit import create_model

DEFAULTS = dataclasses.asdict(FinetuneConfig())


# -----------------------------------------------------------------------------
# 1. parse_config


def test_preset_applies_by_data():
    cfg = parse_config(FinetuneConfig, PRESETS, argv=['--data', 'fake'])
    for k, v in PRESETS['fake'].items():
        assert getattr(cfg, k) == v, k
    # fields the preset does not name keep the dataclass defaults
    for k in ('blr', 'seed', 'data_dir', 'smoothing', 'weight_decay', 'init'):
        assert k not in PRESETS['fake']
        assert getattr(cfg, k) == DEFAULTS[k], k
    assert cfg.data == 'fake'


def test_command_line_overrides_preset_in_any_order():
    # flags placed before and after --data both win over the preset
    cfg = parse_config(FinetuneConfig, PRESETS,
                       argv=['--depth', '3', '--data', 'fake', '--batch-size', '8', '--blr', '0.5'])
    assert (cfg.depth, cfg.batch_size, cfg.blr) == (3, 8, 0.5)
    assert isinstance(cfg.depth, int) and isinstance(cfg.batch_size, int) and isinstance(cfg.blr, float)
    assert cfg.patch_size == PRESETS['fake']['patch_size'] and cfg.img_size == PRESETS['fake']['img_size']


def test_defaults_without_data_flag():
    # no presets: exactly the dataclass's defaults
    assert dataclasses.asdict(parse_config(FinetuneConfig, {}, argv=[])) == DEFAULTS
    # with presets, the default --data's preset is applied
    cfg = parse_config(FinetuneConfig, PRESETS, argv=[])
    assert cfg.data == DEFAULTS['data']
    for k, v in PRESETS[DEFAULTS['data']].items():
        assert getattr(cfg, k) == v, k


def test_bool_and_optional_values():
    cfg = parse_config(FinetuneConfig, PRESETS, argv=['--data', 'fake', '--resume', 'true', '--global-pool',
                                                       'TRUE', '--overwrite', 'false', '--embed-dim', '96'])
    assert cfg.resume is True and cfg.global_pool is True and cfg.overwrite is False
    assert cfg.embed_dim == 96 and isinstance(cfg.embed_dim, int)
    # Optional[int] takes `none`, and that overrides the preset's value too
    cfg = parse_config(FinetuneConfig, PRESETS, argv=['--data', 'fake', '--depth', 'none', '--embed-dim', 'None'])
    assert cfg.depth is None and cfg.embed_dim is None


@pytest.mark.parametrize('argv, words', [
    (['--no-such-key', '1'], ['--no-such-key']),
    (['--epochs', 'abc'], ['--epochs', 'abc']),
    (['--resume', 'maybe'], ['--resume', 'maybe']),
    (['--depth', '2.5'], ['--depth', '2.5']),
])
def test_bad_flags_exit_with_a_message(argv, words):
    with pytest.raises(SystemExit) as e:
        parse_config(FinetuneConfig, PRESETS, argv=['--data', 'fake', *argv])
    msg = e.value.code
    assert isinstance(msg, str) and msg, f'exit code {msg!r}: expected a message (non-zero exit)'
    assert 'error' in msg
    for w in words:
        assert w in msg, (w, msg)
    assert '\n' not in msg.strip()


# -----------------------------------------------------------------------------
# 2. lr_at


def test_lr_schedule():
    cfg = FinetuneConfig(epochs=10, warmup_epochs=2.0, min_lr=1e-6)
    peak = 1e-3
    assert lr_at(cfg, peak, 0.0) == 0.0
    for e in (0.25, 0.5, 1.0, 1.5, 1.99):   # linear in the warm-up
        assert lr_at(cfg, peak, e) == pytest.approx(peak * e / 2.0, rel=1e-12)
    assert lr_at(cfg, peak, 2.0) == pytest.approx(peak, rel=1e-12)
    after = [lr_at(cfg, peak, 2.0 + 8.0 * i / 200) for i in range(201)]
    assert all(a > b for a, b in zip(after, after[1:])), 'not strictly decreasing after warm-up'
    assert after[-1] == pytest.approx(cfg.min_lr, rel=1e-9)
    assert lr_at(cfg, peak, 6.0) == pytest.approx((peak + cfg.min_lr) / 2, rel=1e-9)   # half-way
    assert lr_at(cfg, peak, 12.0) == pytest.approx(cfg.min_lr, rel=1e-9)               # stays there
    # no warm-up: the peak at once
    assert lr_at(dataclasses.replace(cfg, warmup_epochs=0.0), peak, 0.0) == pytest.approx(peak, rel=1e-12)


# -----------------------------------------------------------------------------
# 3. build_optimizer


def test_optimizer_groups_weight_decay_and_layer_decay():
    model = create_model('vit_tiny', img_size=32, patch_size=8, num_classes=10, depth=2, embed_dim=48,
                         num_heads=3)
    model.blocks[0].norm2.bias.requires_grad_(False)      # a frozen parameter is left out
    cfg = FinetuneConfig(layer_decay=0.5, weight_decay=0.05)
    opt = build_optimizer(cfg, model, lr=1e-3)
    seen = {}
    for g in opt.param_groups:
        for p in g['params']:
            assert id(p) not in seen, 'a parameter appears in two groups'
            seen[id(p)] = g
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(seen) == {id(p) for p in trainable.values()}
    for name, p in trainable.items():
        g = seen[id(p)]
        no_wd = p.ndim <= 1 or name in ('cls_token', 'pos_embed')
        assert g['weight_decay'] == (0.0 if no_wd else cfg.weight_decay), name
        if name.startswith(('patch_embed', 'cls_token', 'pos_embed')):
            want = 0.5 ** 3
        elif name.startswith('blocks.0.'):
            want = 0.5 ** 2
        elif name.startswith('blocks.1.'):
            want = 0.5 ** 1
        else:   # norm, head
            want = 1.0
        assert g['lr_scale'] == pytest.approx(want), name
    # the 3-D tokens are exempt by name, the 2-D / 4-D weights are not
    assert seen[id(model.cls_token)]['weight_decay'] == 0.0 and seen[id(model.pos_embed)]['weight_decay'] == 0.0
    assert seen[id(model.patch_embed.proj.weight)]['weight_decay'] == cfg.weight_decay
    assert seen[id(model.head.weight)]['weight_decay'] == cfg.weight_decay


# -----------------------------------------------------------------------------
# 4. soft_cross_entropy


@pytest.mark.parametrize('smoothing', [0.0, 0.1, 0.3])
def test_soft_cross_entropy_matches_cross_entropy(smoothing):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 10, generator=g) * 3
    y = torch.randint(0, 10, (16,), generator=g)
    ref = F.cross_entropy(logits, y, label_smoothing=smoothing)
    soft = soft_cross_entropy(logits, F.one_hot(y, 10).float(), smoothing)
    hard = soft_cross_entropy(logits, y, smoothing)
    torch.testing.assert_close(soft, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hard, ref, rtol=1e-5, atol=1e-6)


def test_soft_cross_entropy_is_linear_in_mixed_targets():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 5, generator=g)
    y1, y2 = torch.randint(0, 5, (8,), generator=g), torch.randint(0, 5, (8,), generator=g)
    mixed = 0.7 * F.one_hot(y1, 5).float() + 0.3 * F.one_hot(y2, 5).float()
    ref = 0.7 * F.cross_entropy(logits, y1) + 0.3 * F.cross_entropy(logits, y2)
    torch.testing.assert_close(soft_cross_entropy(logits, mixed, 0.0), ref, rtol=1e-5, atol=1e-6)


# -----------------------------------------------------------------------------
# 5. AMP


def test_amp_dtype():
    cpu = torch.device('cpu')
    assert amp_dtype('off', cpu) is None
    assert amp_dtype('bf16', cpu) is torch.bfloat16
    assert amp_dtype('fp16', cpu) is torch.float16
    assert amp_dtype('auto', cpu) in (None, torch.bfloat16)
    for bad in ('fp32', 'BF16', ''):   # refused once, by argparse's choices for --amp, before amp_dtype
        with pytest.raises(SystemExit, match=r"^error: --amp: invalid choice: .*'auto', 'bf16', 'fp16', 'off'"):
            parse_config(FinetuneConfig, argv=['--data', 'fake', '--amp', bad])
    assert issubclass(ConfigError, ValueError)


def _run_finetune_main(monkeypatch, out_dir, *args):
    import finetune as ft
    monkeypatch.setattr(sys, 'argv', ['finetune.py', '--data', 'fake', '--fake-size', '128', '--max-steps', '2',
                                      '--num-workers', '0', '--out-dir', str(out_dir), *args])
    ft.main()
    return torch.load(os.path.join(str(out_dir), 'checkpoint.pt'), map_location='cpu', weights_only=False)


@pytest.mark.parametrize('amp, scaled', [('fp16', True), ('bf16', False), ('off', False)])
def test_grad_scaler_only_with_fp16(monkeypatch, tmp_path, amp, scaled):
    ck = _run_finetune_main(monkeypatch, tmp_path / amp, '--amp', amp)
    assert ck['step'] == 2
    if scaled:
        assert 'scale' in ck['scaler'], ck['scaler']
        assert math.isfinite(ck['scaler']['scale']) and ck['scaler']['scale'] > 0
    else:
        assert ck['scaler'] == {}, f'--amp {amp} should have a disabled GradScaler: {ck["scaler"]}'
    assert math.isfinite(read_metrics(tmp_path / amp)[-1]['loss'])
    with open(tmp_path / amp / 'log.txt') as f:
        head = next(line for line in f if ' | autocast ' in line)     # the set-up line, before any step
    want = {'fp16': 'torch.float16', 'bf16': 'torch.bfloat16', 'off': 'None'}[amp]
    assert head.rstrip().endswith(f'autocast {want}'), head


def test_the_output_starts_at_once_and_shows_the_first_steps(monkeypatch, capsys, tmp_path):
    """The first line says what runs, before the data is loaded; the log gives the schedule and where --max-steps
    cuts it, and the 1st and 10th steps of a launch whatever --log-every says."""
    _run_finetune_main(monkeypatch, tmp_path, '--batch-size', '8', '--max-steps', '12', '--log-every', '100')
    first = capsys.readouterr().out.splitlines()[0]
    lines = (tmp_path / 'log.txt').read_text().splitlines()
    assert first == (f'finetune.py | --data fake | model vit_tiny (2 blocks, 192 wide, 3 heads), 32 px images in '
                        f'8 px patches | 1 epoch(s) at batch 8, cut after 12 steps (--max-steps) | {tmp_path} | '
                        f'loading the data'), first
    assert 'schedule: 16 steps an epoch x 1 epoch(s) = 16 steps, warm-up 1 epoch(s); this run stops at step 12 ' \
           '(--max-steps: the lr follows the 16-step schedule)' in lines
    steps = [int(m[1]) for m in map(re.compile(r'step (\d+)/12 ').search, lines) if m]
    assert steps == [1, 10, 12], lines
    assert 'first step' in next(line for line in lines if 'step 1/12' in line)


def test_the_progress_line_gives_the_speed_since_the_last_line_beside_the_mean(monkeypatch):
    """Each progress line after the first: the images of the steps since the previous line over the time between the
    two, beside the mean since the model was ready (timm's pair), from the exact step counts (not from rounded
    means: an interval differenced from two of them came out negative)."""
    from types import SimpleNamespace
    from util import engine
    lines = []
    cfg = SimpleNamespace(warmup_epochs=0, epochs=1, min_lr_ratio=0, min_lr=0)
    plan = SimpleNamespace(world=1, run_dir=SimpleNamespace(log=lines.append))
    run = SimpleNamespace(cfg=cfg, plan=plan, lr=1e-3, running={}, since_log=1, metrics={}, t_start=100.0,
                          t_log=100.0, done_at_log=0, step=0, steps_done=0, total_steps=1000, steps_per_epoch=1000,
                          eff_batch=8)
    times = {1: 101.0, 10: 102.5, 60: 112.5}   # steps done -> the clock at their line
    for steps, now in times.items():
        run.step = run.steps_done = steps
        monkeypatch.setattr(engine.time, 'time', lambda: now)
        engine.log_progress(run)
    assert 'first step 1.0 s' in lines[0]
    said = [tuple(map(int, re.search(r'\| (\d+) img/s \((\d+) since the start\)', line).groups())) for line in lines[1:]]
    assert said == [(round(9 * 8 / 1.5), round(10 * 8 / 2.5)), (round(50 * 8 / 10), round(60 * 8 / 12.5))]


# -----------------------------------------------------------------------------
# 6. Resume is exact

RESUME_ARGS = ['--batch-size', '32', '--epochs', '2', '--amp', 'off']   # 256 images: 8 steps per epoch


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    """The uninterrupted 2-epoch run for a number of loader workers and extra flags (made once per module)."""
    runs = {}

    def get(workers, *extra):
        if (workers, extra) not in runs:
            out = tmp_path_factory.mktemp('resume') / f'A{workers}'
            finetune(out, *RESUME_ARGS, '--num-workers', workers, *extra)
            runs[workers, extra] = out
        return runs[workers, extra]
    return get


def _load(out_dir):
    return torch.load(os.path.join(str(out_dir), 'checkpoint.pt'), map_location='cpu', weights_only=False)


def assert_same_weights(a, b, what):
    """The model's weights, and the EMA's where the run keeps one (its count of updates too), equal."""
    a, b = ({**ck['model'], **{f'ema {k}': v for k, v in (ck['ema'] or {}).items()}}
            for ck in (a, b))
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, (f'{what}: {len(differ)} tensors differ from the uninterrupted run, e.g. {differ[:3]} (max '
                        f'abs diff {max((a[k] - b[k]).abs().max().item() for k in differ):.3g})')


# drop-path and MixUp draw from the training process's RNG, which a loader with no workers must leave alone
RANDOM = ('--drop-path', '0.1', '--mixup', '0.8')
# the augmentation a data set held in memory gets on its device (the fake images are held): crop, RandAugment, erasing
AUGMENTED = ('--crop-pad', '4', '--randaug', 'rand-m9-mstd0.5-inc1', '--reprob', '0.25', *RANDOM)


# each a run stopped (mid-epoch: step 5; at the epoch's end: 8) and resumed: the loader's workers kept, changed,
# or none (the training process's RNG drawn from), the augmentation on the device and the EMA
@pytest.mark.parametrize('stop_at, workers, resume_workers, extra', [
    (8, 1, 1, ()), (5, 1, 1, ()), (5, 2, 0, RANDOM), (8, 0, 1, RANDOM), (5, 0, 0, (*AUGMENTED, '--ema', '0.9'))],
    ids=['epoch-boundary-1-worker', 'mid-epoch-1-worker', 'mid-epoch-2-workers-then-none-drop-path-mixup',
         'epoch-boundary-none-then-1-worker-drop-path-mixup', 'mid-epoch-augmented-on-the-device-ema'])
def test_resume_is_exact(uninterrupted, tmp_path, stop_at, workers, resume_workers, extra):
    a_dir, out = uninterrupted(workers, *extra), tmp_path / 'B'
    finetune(out, *RESUME_ARGS, '--num-workers', workers, '--max-steps', stop_at, *extra)
    assert _load(out)['step'] == stop_at
    finetune(out, *RESUME_ARGS, '--num-workers', resume_workers, '--resume', 'true', *extra)
    a, b = _load(a_dir), _load(out)
    assert a['step'] == b['step'] == 16
    assert_same_weights(a, b, f'resumed at step {stop_at} with {resume_workers} workers after {workers}')
    ma, mb = read_metrics(a_dir)[-1], read_metrics(out)[-1]
    assert (ma['step'], ma['top1'], ma['loss']) == (mb['step'], mb['top1'], mb['loss'])


def test_a_folder_resumes_exactly_whatever_its_loader_workers(tmp_path):
    """A folder of images keeps the per-image pipeline in loader workers (each image augmented from its own seed):
    stopped mid-epoch with 2 workers and resumed with none, it ends as the uninterrupted run with 2."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (('train', 128), ('val', 16)):
        for c in range(4):
            os.makedirs(tmp_path / 'images' / split / f'c{c}')
            for i in range(n // 4):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    tmp_path / 'images' / split / f'c{c}' / f'{i}.png')
    folder = ['--data', 'folder', '--data-dir', tmp_path / 'images', '--img-size', '32', '--patch-size', '8',
              '--batch-size', '16', '--epochs', '2', '--amp', 'off', *RANDOM]
    finetune(tmp_path / 'A', *folder, '--num-workers', 2)
    finetune(tmp_path / 'B', *folder, '--num-workers', 2, '--max-steps', 5)
    finetune(tmp_path / 'B', *folder, '--num-workers', 0, '--resume', 'true')
    a, b = _load(tmp_path / 'A'), _load(tmp_path / 'B')
    assert a['step'] == b['step'] == 16
    assert_same_weights(a, b, 'a folder resumed at step 5 with no workers after 2')


@pytest.mark.parametrize('workers, resume_workers, extra', [(0, 0, RANDOM), (1, 0, RANDOM)],
                         ids=['no-workers-drop-path-mixup', '1-worker-then-none-drop-path-mixup'])
def test_killed_run_resumes_to_the_same_result(uninterrupted, tmp_path, workers, resume_workers, extra):
    """SIGKILL a run at some point after its second checkpoint (--save-every 3), resume it (with another number
    of loader workers, drop-path and MixUp on): the result equals the uninterrupted run's, wherever the kill landed."""
    import signal
    import subprocess
    import time
    from conftest import ROOT, TINY, sub_env
    out = tmp_path / 'killed'
    args = [*TINY, '--out-dir', str(out), *RESUME_ARGS, '--save-every', '3', '--log-every', '1', *extra]
    p = subprocess.Popen([sys.executable, 'finetune.py', *args, '--num-workers', str(workers)], cwd=ROOT,
                         env=sub_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        ck = out / 'checkpoint.pt'
        if ck.exists() and torch.load(ck, weights_only=True)['step'] >= 6:
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, 'the run ended before it could be killed'
    killed_at = _load(out)['step']
    assert 6 <= killed_at < 16
    finetune(out, *RESUME_ARGS, '--num-workers', resume_workers, '--save-every', '3', '--resume', 'true', *extra)
    a, b = _load(uninterrupted(workers, *extra)), _load(out)
    assert b['step'] == 16
    assert_same_weights(a, b, f'killed at step {killed_at}, resumed with {resume_workers} workers after {workers}')
    assert read_metrics(uninterrupted(workers, *extra))[-1]['top1'] == read_metrics(out)[-1]['top1']


# -----------------------------------------------------------------------------
# 7. The EMA


def test_the_ema_is_averaged_models_and_resumes_from_either():
    """util/run.EMA (its count of updates a Python int) gives torch's AveragedModel EMA bit for bit, update after update,
    buffers too, and the float64 rule: the first update copies, each later one w <- decay w + (1 - decay) w_model;
    the state_dict of either loads into the other, each going on as the other would have."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    from util.run import EMA
    decay = 0.9
    torch.manual_seed(0)
    model = create_model('vit_tiny', img_size=32, patch_size=8, num_classes=10, depth=2, embed_dim=48,
                         num_heads=3)
    model.register_buffer('running', torch.randn(5))       # a ViT has no buffer: one to average too

    def averaged():
        return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ours, theirs = EMA(model, decay), averaged()
    rule = None
    for step in range(5):
        with torch.no_grad():
            for t in (*model.parameters(), *model.buffers()):
                t.add_(torch.randn_like(t))
        weights = {k: v.double() for k, v in model.state_dict().items()}
        if rule is None:
            rule = weights
        else:
            rule = {k: decay * rule[k] + (1 - decay) * weights[k] for k in rule}
        ours.update_parameters(model)
        theirs.update_parameters(model)
        mine, torch_s = ours.state_dict(), theirs.state_dict()
        assert mine.keys() == torch_s.keys() and mine['n_averaged'].item() == step + 1
        assert all(torch.equal(mine[k], torch_s[k]) for k in mine), f'update {step + 1}'
        for k, v in rule.items():
            torch.testing.assert_close(mine[f'module.{k}'].double(), v, rtol=1e-6, atol=1e-6)
    again, other = EMA(model, decay), averaged()
    again.load_state_dict(theirs.state_dict())
    other.load_state_dict(ours.state_dict())
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            t.add_(torch.randn_like(t))
    for ema in (ours, theirs, again, other):
        ema.update_parameters(model)
    states = [ema.state_dict() for ema in (ours, theirs, again, other)]
    assert all(torch.equal(s[k], states[0][k]) for s in states for k in states[0])


def test_blr_0_keeps_the_weights_as_loaded_after_the_warm_up_too(depth2_run, tmp_path):
    """--blr 0 was exempt from "the lr never rises": with --min-lr 1e-2 the cosine rose from 0 to 1e-2 and trained
    the weights meant to stay as loaded. A peak of 0 ends at 0, and the start log says so."""
    out, _ = depth2_run
    p = finetune(tmp_path / 'r', '--init', out / 'checkpoint.pt', '--blr', '0', '--min-lr', '1e-2', '--warmup-epochs',
                 '0', '--max-steps', '3', '--amp', 'off')
    assert 'lr 0 = blr 0 x effective batch 32 / 256 at its peak, 0 at the end |' in p.stdout
    src = torch.load(out / 'checkpoint.pt', weights_only=True)['model']
    got = torch.load(tmp_path / 'r' / 'checkpoint.pt', weights_only=True)['model']
    assert src.keys() == got.keys() and all(torch.equal(src[k], got[k]) for k in src)
