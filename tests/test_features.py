"""tools/features.py against mathematics: linear CKA's invariances, its value for independent features and its
fall with the sample count, a direct HSIC formula, the batched statistics against the whole computation; the
attention distance of maps worked out by hand; prediction agreement on hand-made predictions; the block-by-block
run against the models' own forward; and the command end to end on tiny trained models."""
import copy
import json
import math
import os
import re
import shlex
import statistics

import pytest
import torch

from attention_copy import CopyModel
from conftest import ROOT, TINY, finetune, run_script
from ensemble import load_model
from tools.features import PRESETS, CKAStats, FeaturesConfig, analyse, linear_cka, load
from tools.features_controls import draws, group_pairs, method_seed, prediction_values, resampled
from tools.features_maps import attention_distance, blocks, map_agreement, runner
from util.launch import parse_config
from vit import VisionTransformer

torch.set_num_threads(1)   # a small, shared machine

# -----------------------------------------------------------------------------
# Linear CKA


def gaussian(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_cka_is_one_under_rotation_scale_and_shift():
    x = gaussian(300, 12)
    q, _ = torch.linalg.qr(gaussian(12, 12, seed=1))                       # a random orthogonal matrix
    for y in (x @ q, -3.7 * x, x + 50 * gaussian(1, 12, seed=2), x):
        assert linear_cka(x, y) == pytest.approx(1, abs=1e-10)
    assert linear_cka(x, gaussian(300, 12, seed=3)) < 0.2


def expected_independent_cka(n, d1, d2):
    """Independent standard Gaussian X (n, d1), Y (n, d2), centred: with m = n - 1 degrees of freedom,
    E||Xc^T Yc||_F^2 = d1 d2 m, and Xc^T Xc is Wishart(m, I_d1) with E W_aa^2 = m^2 + 2m, E W_ab^2 = m, so
    E||Xc^T Xc||_F^2 = d1 m^2 + d1 (d1 + 1) m. The ratio of the expectations (the denominators concentrate as
    n grows): CKA ~ sqrt(d1 d2) / m / sqrt((1 + (d1 + 1) / m) (1 + (d2 + 1) / m)), falling as 1 / n."""
    m = n - 1
    return math.sqrt(d1 * d2) / m / math.sqrt((1 + (d1 + 1) / m) * (1 + (d2 + 1) / m))


def test_cka_of_independent_features_is_near_zero_and_falls_as_one_over_n():
    d1, d2, repeats, means = 6, 10, 300, {}
    g = torch.Generator().manual_seed(0)
    for n in (200, 400, 800, 1600):
        values = [linear_cka(torch.randn(n, d1, generator=g, dtype=torch.float64),
                             torch.randn(n, d2, generator=g, dtype=torch.float64)) for _ in range(repeats)]
        means[n] = statistics.fmean(values)
        # the mean of 300 has a standard error of about 1% of it (measured): 5% is five of them
        assert means[n] == pytest.approx(expected_independent_cka(n, d1, d2), rel=0.05), n
    slope = math.log(means[1600] / means[200]) / math.log(1600 / 200)
    assert slope == pytest.approx(-1, abs=0.05)


def test_cka_equals_the_hsic_formula():
    """HSIC(K, L) = tr(K H L H) / (n - 1)^2 with K = X X^T, L = Y Y^T, H = I - 11^T / n; CKA = HSIC(K, L) /
    sqrt(HSIC(K, K) HSIC(L, L)) (Kornblith et al. 2019, eq. 2-4), computed with the n x n matrices."""
    n = 60
    x = gaussian(n, 5)
    y = torch.tanh(x @ gaussian(5, 8, seed=1)) + 0.5 * gaussian(n, 8, seed=2)
    h = torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n
    hsic = lambda k, l: torch.trace(k @ h @ l @ h) / (n - 1) ** 2
    k, l = x @ x.T, y @ y.T
    want = (hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l))).item()
    assert 0.2 < want < 0.95
    assert linear_cka(x, y) == pytest.approx(want, rel=1e-10)
    assert linear_cka(x.float(), y.float()) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize('batch', [1000, 333, 64, 7])
def test_batched_statistics_equal_the_whole_computation(batch):
    """Three streams of 1000 samples with far-off means (a residual stream's can be large), in batches with a
    ragged last one: every pair's CKA is linear_cka's on all the samples at once, in either order."""
    x = gaussian(1000, 8) + 1e4
    streams = {'x': x.float(), 'y': (x @ gaussian(8, 5, seed=1) + gaussian(1000, 5, seed=2) - 3e3).float(),
               'z': (gaussian(1000, 3, seed=3) + 0.3 * x[:, :3]).float()}
    stats = CKAStats()
    for i in range(0, 1000, batch):
        stats.update({k: v[i:i + batch] for k, v in streams.items()})
    assert stats.n == 1000
    for a, b in (('x', 'y'), ('y', 'x'), ('x', 'z'), ('z', 'y'), ('x', 'x')):
        assert stats.cka(a, b) == pytest.approx(linear_cka(streams[a], streams[b]), rel=1e-9, abs=1e-12), (a, b)

def test_a_resample_of_the_batches_is_the_cka_of_those_batches():
    """The bootstrap's CKA of a resample (batch 0 twice, batch 1 never, batch 2 once) is linear_cka on exactly those
    samples stacked; all ones give the whole computation's."""
    x = gaussian(300, 6) + 100
    streams = {'x': x.float(), 'y': (torch.tanh(x - 100) @ gaussian(6, 4, seed=1) + gaussian(300, 4, seed=2)).float()}
    stats = CKAStats(keep=True)
    for i in range(0, 300, 100):
        stats.update({k: v[i:i + 100] for k, v in streams.items()})
    got = resampled(stats, [('x', 'y'), ('y', 'x')], torch.tensor([[2., 0., 1.], [1., 1., 1.]]))
    pick = lambda v: torch.cat([v[:100], v[:100], v[200:]])
    assert got['x', 'y'][0].item() == pytest.approx(linear_cka(pick(streams['x']), pick(streams['y'])), rel=1e-5)
    assert got['y', 'x'][1].item() == pytest.approx(stats.cka('x', 'y'), rel=1e-5)
    counts = draws(3, 50, seed=0)
    assert counts.shape == (50, 3) and (counts.sum(1) == 3).all() and torch.equal(counts, draws(3, 50, seed=0))


def test_pairs_of_methods_take_seeds_apart():
    names = ['teacher', 'scratch-0', 'scratch-1', 'distill-0', 'distill-1', 'distill-2']
    assert method_seed('distill-2') == ('distill', 2) and method_seed('teacher') == ('teacher', None)
    assert method_seed('my-model') == ('my-model', None)
    assert group_pairs(names, 'distill', 'distill') == [('distill-0', 'distill-1'), ('distill-0', 'distill-2'),
                                                         ('distill-1', 'distill-2')]
    assert group_pairs(names, 'scratch', 'distill') == [('scratch-0', 'distill-1'), ('scratch-0', 'distill-2'),
                                                        ('scratch-1', 'distill-0'), ('scratch-1', 'distill-2')]
    assert group_pairs(names, 'teacher', 'scratch') == [('teacher', 'scratch-0'), ('teacher', 'scratch-1')]
    assert group_pairs(['a-0', 'b-0'], 'a', 'b') == [('a-0', 'b-0')]   # one seed each: the only pair there is
    assert group_pairs(['teacher'], 'teacher', 'teacher') == []

# -----------------------------------------------------------------------------
# Attention maps


def patch_centres(grid, p):
    return [((r + 0.5) * p, (c + 0.5) * p) for r in range(grid) for c in range(grid)]


def test_attention_distance_of_maps_worked_out_by_hand():
    grid, p, heads = 4, 7, 3
    n = 1 + grid * grid
    centres = patch_centres(grid, p)
    identity = torch.eye(n).expand(2, heads, n, n)
    assert torch.allclose(attention_distance(identity, p), torch.zeros(heads), atol=1e-6)
    # uniform: every patch reads every patch alike, itself included: the mean distance between two centres
    pairs = [math.dist(a, b) for a in centres for b in centres]
    uniform = torch.full((2, heads, n, n), 1 / n)
    assert torch.allclose(attention_distance(uniform, p), torch.full((heads,), sum(pairs) / len(pairs)), atol=1e-5)
    # half of each row on the class token: renormalised over the patches, the same distance
    half = uniform.clone()
    half[..., 0], half[..., 1:] = 0.5, 0.5 / (n - 1)
    assert torch.allclose(attention_distance(half, p), attention_distance(uniform, p), atol=1e-5)
    # every query reads patch 5 only, behind 2 register tokens: its mean distance to patch 5
    first = 3
    to_five = torch.zeros(1, heads, first + grid * grid, first + grid * grid)
    to_five[..., first + 5] = 1
    want = statistics.fmean(math.dist(c, centres[5]) for c in centres)
    assert torch.allclose(attention_distance(to_five, p, first), torch.full((heads,), want), atol=1e-5)


def test_map_agreement_is_the_kl_to_the_teachers_maps():
    t, s = gaussian(2, 4, 9, 9).float() * 3, gaussian(2, 4, 9, 9, seed=1).float()
    ce, kl = map_agreement(t, t)
    assert torch.allclose(kl, torch.zeros(4), atol=1e-5) and (ce > 0).all()
    ce, kl = map_agreement(t, s)
    p, logq = t.softmax(-1), s.log_softmax(-1)
    assert torch.allclose(kl, (p * (p.log() - logq)).sum(-1).mean((0, 2)), atol=1e-5)
    assert torch.allclose(ce, -(p * logq).sum(-1).mean((0, 2)), atol=1e-5) and (kl > 0).all()
    # 4 teacher heads against 2: each student head against the mean map of its pair of teacher heads
    mean_map = p.reshape(2, 2, 2, 9, 9).mean(2)                             # (B, 2, N, N)
    _, kl = map_agreement(t, mean_map.log())
    assert torch.allclose(kl, torch.zeros(2), atol=1e-5)

# -----------------------------------------------------------------------------
# Predictions


def test_prediction_agreement_on_hand_made_predictions():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    pred_a = torch.tensor([0, 0, 1, 2, 1, 1, 1, 0, 2, 2])   # wrong on 2, 3, 7
    pred_b = torch.tensor([0, 1, 1, 2, 1, 1, 0, 1, 2, 2])   # wrong on 1, 2, 3, 6
    onehot = lambda pred, c: c * torch.nn.functional.one_hot(pred, 3).float()
    logits = {'a': onehot(pred_a, 5), 'b': onehot(pred_b, 3)}
    # every image once; then image 7 counted twice and image 0 never
    w = torch.ones(2, 10, dtype=torch.float64)
    w[1, 7], w[1, 0] = 2, 0
    v = {k: x.tolist() for k, x in prediction_values(logits, labels, 'a', 'b', w).items()}
    assert v['top1_a'][0] == pytest.approx(70) and v['top1_b'][0] == pytest.approx(60)
    assert v['disagreement'][0] == pytest.approx(0.3)      # images 1, 6, 7 (on 2 and 3 both say the same)
    assert v['both_wrong'][0] == pytest.approx(0.2)        # images 2 and 3
    assert v['b_wrong_given_a_wrong'][0] == pytest.approx(2 / 3) and v['a_wrong_given_b_wrong'][0] == pytest.approx(2 / 4)
    # a is the surer (logit 5 against 3): where they differ the mean of probabilities follows a, as good as a alone
    assert v['top1_ensemble'][0] == pytest.approx(70) and v['gain'][0] == pytest.approx(0)
    # the resample: 10 images, a wrong on 2, 3, 7, 7; b on 1, 2, 3, 6; they differ on 1, 6, 7, 7
    assert v['disagreement'][1] == pytest.approx(0.4) and v['both_wrong'][1] == pytest.approx(0.2)
    assert v['b_wrong_given_a_wrong'][1] == pytest.approx(2 / 4) and v['top1_a'][1] == pytest.approx(60)

# -----------------------------------------------------------------------------
# Models block by block


def tiny_vit(seed, **arch):
    torch.manual_seed(seed)
    return VisionTransformer(**{**dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=4,
                                       num_classes=5), **arch}).eval()


@torch.no_grad()
def test_blocks_are_the_models_own_computation():
    x = torch.randn(3, 3, 16, 16)
    for model in (tiny_vit(0), tiny_vit(0, global_pool=True),
                  CopyModel(tiny_vit(1, num_classes=0), tiny_vit(2, no_qk_layers=(0, 1)), [0, 1])):
        vit, given = runner(model)
        out = list(blocks(vit, x, given(x)))
        assert len(out) == 3
        assert torch.allclose(vit.forward_head(out[-1][0]), model(x), atol=1e-5)
        for i, (tokens, logits) in enumerate(out):
            assert torch.allclose(tokens, vit.forward_tokens(x, given(x), depth=i + 1)[0], atol=1e-5)
            assert torch.allclose(logits.softmax(-1).sum(-1), torch.ones(3, 4, 17), atol=1e-5)
        if isinstance(model, CopyModel):   # its copied layers' maps are the teacher's; its last, its own
            maps = model.teacher.attention(x, [0, 1])
            for i in (0, 1):
                assert torch.allclose(out[i][1].softmax(-1), maps[i].softmax(-1), atol=1e-6)
            own = vit.forward_tokens(x, given(x), keep={2: ('logits',)})[1][2]['logits']
            assert torch.allclose(out[2][1], own, atol=1e-5)


def test_a_twin_of_the_teacher_matches_it_everywhere():
    """The teacher against an exact copy of itself: CKA 1 in every block, KL 0, the same distances, never a
    different prediction; against another model, less."""
    teacher = tiny_vit(0)
    models = {'teacher': teacher, 'twin': copy.deepcopy(teacher), 'other': tiny_vit(3)}
    loader = [(torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))) for _ in range(3)]
    r = analyse(models, loader, torch.device('cpu'))
    assert r['images'] == 24 and r['depth'] == 3
    twin = next(p for p in r['cka'] if {p['a'], p['b']} == {'teacher', 'twin'})
    other = next(p for p in r['cka'] if {p['a'], p['b']} == {'teacher', 'other'})
    assert twin['tokens'] == pytest.approx([1] * 3, abs=1e-9) and twin['class_token'] == pytest.approx([1] * 3)
    assert max(other['tokens']) < 0.99
    assert all(h == pytest.approx(0, abs=1e-5) for layer in r['kl']['twin'] for h in layer)
    assert min(h for layer in r['kl']['other'] for h in layer) > 0
    assert torch.allclose(*(torch.tensor(r['attention_distance'][k]) for k in ('twin', 'teacher')), atol=1e-5)
    pair = next(g['predictions'] for g in r['groups'] if (g['a'], g['b']) == ('teacher', 'twin'))
    assert pair['disagreement']['mean'] == 0 and pair['b_wrong_given_a_wrong']['mean'] == pytest.approx(1)


def test_a_method_whose_seeds_are_twins_has_a_control_of_one():
    """Seeds 0 and 1 of method a are one model: their seed-to-seed control is CKA 1 in every block and under every
    resample, and they never disagree; method b's seeds differ, and are less alike."""
    models = {'teacher': tiny_vit(0), 'a-0': tiny_vit(1), 'b-0': tiny_vit(2), 'b-1': tiny_vit(3)}
    models['a-1'] = copy.deepcopy(models['a-0'])
    loader = [(torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))) for _ in range(4)]
    r = analyse(models, loader, torch.device('cpu'), resamples=30)
    g = {(x['a'], x['b']): x for x in r['groups']}
    assert list(g) == [('teacher', 'a'), ('teacher', 'b'), ('a', 'a'), ('a', 'b'), ('b', 'b')]
    assert g['a', 'b']['pairs'] == [['a-0', 'b-1'], ['a-1', 'b-0']]
    for s in g['a', 'a']['tokens']:
        assert s['mean'] == pytest.approx(1) and s['interval'] == pytest.approx([1, 1]) and s['std'] == 0
    assert all(s['mean'] < 0.99 and s['interval'][0] <= s['interval'][1] for s in g['b', 'b']['tokens'])
    p = g['a', 'a']['predictions']
    assert p['disagreement']['mean'] == 0 and p['disagreement']['interval'] == [0, 0] and p['gain']['mean'] == 0
    assert 'predictions' not in g['teacher', 'a'] or r['models']['teacher']['top1'] is not None
    assert r['bootstrap']['cka_units'] == 4 and r['models']['b-1']['method'] == 'b' and r['models']['b-1']['seed'] == 1

# -----------------------------------------------------------------------------
# The command, end to end


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """A tiny teacher, three scratch models, a copy and two distilled students of it (the fake preset, 3 steps)."""
    d = tmp_path_factory.mktemp('features')
    finetune(d / 'teacher', '--max-steps', '3')
    finetune(d / 'scratch', '--max-steps', '3', '--seed', '1')
    finetune(d / 'scratch2', '--max-steps', '3', '--seed', '2')
    finetune(d / 'scratch3', '--max-steps', '3', '--seed', '3')
    for script, name, seed in (('attention_copy.py', 'copy', 0), ('attention_distill.py', 'distill', 0),
                               ('attention_distill.py', 'distill2', 1)):
        p = run_script(script, *TINY, '--out-dir', d / name, '--teacher', d / 'teacher' / 'checkpoint.pt',
                       '--max-steps', '3', '--layers', '0', '--seed', seed)
        assert p.returncode == 0, f'{script} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}'
    return d


def test_the_command_end_to_end(runs, tmp_path):
    teacher = str(runs / 'teacher' / 'checkpoint.pt')
    models = [str(runs / n / 'checkpoint.pt') for n in ('scratch', 'copy', 'distill', 'teacher', 'distill2', 'scratch2',
                                                         'scratch3')]
    # the teacher's classifier and a third scratch model stand in for two fine-tuned seeds
    names = ['scratch-0', 'copy-0', 'distill-0', 'finetune-0', 'distill-1', 'finetune-1', 'scratch-1']
    p = run_script('-m', 'tools.features', *TINY, '--teacher', teacher, '--models', *models, '--names', *names,
                   '--batch-size', '24', '--resamples', '20', '--out-dir', tmp_path / 'out')
    assert p.returncode == 0, f'tools.features failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}'
    assert 'teacher vs copy' in p.stdout
    assert sorted(os.listdir(tmp_path / 'out')) == ['TABLES.md', 'features.json', 'features.png']
    with open(tmp_path / 'out' / 'features.json') as f:
        r = json.load(f)['result']
    assert r['images'] == 64 and list(r['models']) == ['teacher', *names]
    assert r['models']['copy-0']['maps_given'] == [0] and r['models']['distill-0']['maps_given'] == []
    assert r['models']['distill-1']['maps_distilled'] == [0] and r['models']['copy-0']['maps_distilled'] == []
    assert r['bootstrap']['resamples'] == 20 and r['bootstrap']['cka_units'] == 3   # batches of 24, 24, 16
    # the tables show each group's numbers: a pair's mean CKA per block, the copy student's given maps
    tables = (tmp_path / 'out' / 'TABLES.md').read_text()
    g = {(x['a'], x['b']): x for x in r['groups']}
    cka = ' | '.join(f"{s['mean']:.2f}" + (f" ±{s['std']:.2f}" if s['std'] else '') for s in g['teacher', 'distill']['tokens'])
    assert f'| teacher vs distill | 2 | {cka} |' in tables
    assert re.search(r'^\| copy \| given \| [\d.]+ \|$', tables, re.M)
    fd = g['distill', 'finetune']['predictions']
    assert f"| distill vs finetune | 2 | {fd['top1_a']['mean']:.2f} / {fd['top1_b']['mean']:.2f} |" in tables
    # in its copied layer the copy student used the teacher's maps: KL 0, the teacher's distances
    assert r['kl']['copy-0'][0] == pytest.approx([0] * r['models']['copy-0']['heads'], abs=1e-5)
    assert r['attention_distance']['copy-0'][0] == pytest.approx(r['attention_distance']['teacher'][0], abs=1e-5)
    assert all(0 <= v <= 1 + 1e-9 for pair in r['cka'] for v in pair['tokens'] + pair['class_token'])
    # each top-1 is what the model's own forward pass gives on the same images, in fp32
    cfg = parse_config(FeaturesConfig, PRESETS, [*TINY, '--teacher', teacher, '--models', *models, '--names', *names])
    _, _, loader = load(cfg, torch.device('cpu'))
    with torch.no_grad():
        for name, path in zip(names, models):
            model, _, _ = load_model(path, teacher)
            correct = sum((model(x).argmax(-1) == y).sum().item() for x, y in loader)
            assert r['models'][name]['top1'] == pytest.approx(100 * correct / 64)


def test_bad_input_is_one_line_and_writes_nothing(runs, tmp_path):
    teacher = str(runs / 'teacher' / 'checkpoint.pt')
    out = tmp_path / 'out'
    for args, says in ((['--models', tmp_path / 'missing.pt'], "no checkpoint '.*missing.pt'"),
                       (['--models', runs / 'scratch' / 'checkpoint.pt', '--names', 'teacher'], '--names'),
                       (['--models', runs / 'copy' / 'checkpoint.pt', '--teacher',
                         runs / 'scratch' / 'checkpoint.pt'], 'copy student: the teacher .* has sha256'),
                       (['--models', runs / 'distill' / 'checkpoint.pt', '--teacher',   # measured against maps
                         runs / 'scratch' / 'checkpoint.pt'], 'distilled student: the teacher .* has sha256')):
        p = run_script('-m', 'tools.features', *TINY, '--teacher', teacher, *args, '--out-dir', out)
        lines = p.stderr.strip().splitlines()
        assert p.returncode != 0 and len(lines) == 1 and lines[0].startswith('error: '), p.stderr
        assert re.search(says, lines[0]), lines[0]
        assert not out.exists()
    finetune(tmp_path / 'six', '--max-steps', '1', '--num-heads', '6')   # more heads than the teacher's 3: einops
    p = run_script('-m', 'tools.features', *TINY, '--teacher', teacher, '--models', tmp_path / 'six' / 'checkpoint.pt',
                   '--out-dir', out)
    assert p.returncode != 0 and p.stderr.strip().splitlines() == [p.stderr.strip()], p.stderr[-2000:]
    assert "the teacher's 3 heads are no multiple of six 6 heads" in p.stderr and not out.exists()
    out.mkdir()
    (out / 'TABLES.md').write_text('mine\n')
    p = run_script('-m', 'tools.features', *TINY, '--teacher', teacher, '--models', runs / 'scratch' / 'checkpoint.pt',
                   '--out-dir', out)
    assert p.returncode != 0 and 'no features.json' in p.stderr and (out / 'TABLES.md').read_text() == 'mine\n'

# -----------------------------------------------------------------------------
# The committed results


PAGE = os.path.join(ROOT, 'results', 'fashion-mnist', 'features', 'README.md')


@pytest.mark.skipif(not os.path.isfile(PAGE), reason='no committed results')
def test_the_committed_command_parses_and_its_models_load():
    command = re.search(r'`(python -m tools\.features [^`]+)`', open(PAGE).read())[1]
    cfg = parse_config(FeaturesConfig, PRESETS, shlex.split(command)[3:])
    assert cfg.out_dir == 'results/fashion-mnist/features'
    for path in cfg.models:
        ckpt = torch.load(os.path.join(ROOT, path), weights_only=True)
        assert set(ckpt) <= {'model', 'arch', 'config', 'script', 'epoch', 'step', 'metrics', 'teacher',
                             'distilled_from'}, path
        cwd = os.getcwd()
        try:
            os.chdir(ROOT)   # the copy student records its teacher relative to the repository's root
            model, arch, _ = load_model(path, cfg.teacher)
        finally:
            os.chdir(cwd)
        assert arch['num_classes'] == 10
