"""tools/features.py: its streamed CKA is the definition (checked against a second formula, the centred n x n Gram
matrices, in float64); on the shipped models it gives what block outputs made apart (forward_tokens) give, and the
top-1 util/engine.evaluate gives; its groups pair what its docstring says; it refuses in one line, writing nothing.
The full re-make of the committed numbers (results/fashion-mnist/features/) runs on a GPU (`gpu`: seconds there),
by the command the page names."""
import json
import os
import re
import shlex
import statistics
from types import SimpleNamespace

import pytest
import torch

from attention_copy import CopyModel, copied
from conftest import ROOT, run_in_process
from data import build_eval_set
from ensemble import load_models
from test_features_page import REMADE
from test_pages import flat
from tools import features
from util.checkpoints import build_from_checkpoint
from util.datafiles import FASHION_MNIST_SYSTEM_DIR
from util.engine import evaluate
from util.launch import parse_config

FEATURES = os.path.join(ROOT, 'results', 'fashion-mnist', 'features')
MODELS = os.path.join(FEATURES, 'models')
TEACHER = 'teachers/fashion-mnist-mae.pt'   # a copy student records its teacher by this path from the root


def centred_gram(x):
    """H X X^T H (n, n) in float64, H = I - 1 1^T / n: the Gram matrix of the samples, centred."""
    k = x.double() @ x.double().T
    return k - k.mean(0) - k.mean(1, keepdim=True) + k.mean()


def gram_cka(k, l):
    """Linear CKA as Kornblith et al. define it, HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) of centred Gram
    matrices: <HKH, HLH>_F / (||HKH||_F ||HLH||_F)."""
    return ((k * l).sum() / (k.norm() * l.norm())).item()


def test_the_streamed_cka_is_the_definition():
    """Uneven batches, features of three widths with a large mean; a rotated, scaled, shifted copy has CKA 1."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=g) + 500                                # (n, 8)
    y = x @ torch.randn(8, 5, generator=g) + torch.randn(300, 5, generator=g)  # related to x, and noise
    z = torch.randn(300, 3, generator=g)                                       # unrelated
    q = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))[0]
    turned = (3 * x.double() @ q - 7).float()                                  # x rotated, scaled, shifted
    streams = [x, y, z, turned]
    gram = features.Gram()
    for part in torch.cat(streams, 1).split([1, 99, 200]):
        gram.add(part)
    cka = gram.cka([s.shape[1] for s in streams])
    for i in range(4):
        for j in range(4):
            want = gram_cka(centred_gram(streams[i]), centred_gram(streams[j]))
            assert cka[i][j] == pytest.approx(want, abs=1e-9), (i, j)
    assert cka[0][3] == pytest.approx(1, abs=1e-6) and cka[0][1] > 0.5 > cka[0][2]


@pytest.fixture(scope='module')
def subset():
    """The tool on 4 shipped models and the teacher, the first 40 test images in batches of 16, blocks 0 and 5."""
    names = ['scratch-0', 'copy-0', 'distill-0', 'distill-1']
    argv = ['--teacher', TEACHER, '--images', '40', '--batch-size', '16', '--blocks', '5', '0',
            '--models', *(os.path.join(MODELS, f'{n}.pt') for n in names)]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        cfg = parse_config(features.FeaturesConfig, argv=argv)
        models, _, _ = load_models(cfg.models, TEACHER)
        r = features.analyse(cfg, torch.device('cpu'))
    finally:
        os.chdir(cwd)
    return r, {'teacher': build_from_checkpoint(TEACHER, num_classes=0).eval(), **dict(zip(names, models))}


def test_on_the_shipped_models_the_tool_gives_what_block_outputs_made_apart_give(subset):
    r, models = subset
    test_set = build_eval_set(SimpleNamespace(data='fashion-mnist', data_dir='./data', val_size=0, img_size=28))[0]
    x = torch.stack([test_set[i][0] for i in range(40)])                    # (40, 3, 28, 28)
    labels = torch.tensor([test_set[i][1] for i in range(40)])

    def tokens(m, depth):   # (40, N, D) after block depth - 1, as the model runs (a copy student: given the maps)
        if isinstance(m, CopyModel):
            given = copied(m.teacher, x, m.layers, m.heads, m.transfer, m.average, m.implementation)
            return m.student.forward_tokens(x, inject=given, depth=depth)[0]
        return m.forward_tokens(x, depth=depth)[0]
    with torch.no_grad():
        out = {(k, i): tokens(m, i + 1) for k, m in models.items() for i in (0, 5)}
    grams = {(key, 'tokens'): centred_gram(t.flatten(0, 1)) for key, t in out.items()}   # (40 * 50,) ^ 2
    grams |= {(key, 'class_token'): centred_gram(t[:, 0]) for key, t in out.items()}
    assert r['blocks'] == [0, 5] and len(r['cka']) == 10
    for p in r['cka']:
        for kind in features.KINDS:
            for n, i in enumerate(r['blocks']):
                want = gram_cka(grams[(p['a'], i), kind], grams[(p['b'], i), kind])
                assert p[kind][n] == pytest.approx(want, abs=1e-6), (p['a'], p['b'], kind, i)
    plan = SimpleNamespace(device=torch.device('cpu'), dtype=None, world=1)
    loader = [(x, labels)]
    for k, m in models.items():
        top1 = evaluate(m, loader, plan)['top1'] if k != 'teacher' else None
        assert r['models'][k]['top1'] == pytest.approx(top1, abs=1e-4), k


def test_groups_pair_models_of_different_seeds_and_spread_over_their_pairs(subset):
    r = subset[0]
    assert {(g['a'], g['b']): g['pairs'] for g in r['groups']} == {
        ('teacher', 'scratch'): [['teacher', 'scratch-0']], ('teacher', 'copy'): [['teacher', 'copy-0']],
        ('teacher', 'distill'): [['teacher', 'distill-0'], ['teacher', 'distill-1']],
        ('scratch', 'distill'): [['scratch-0', 'distill-1']],    # not scratch-0 with copy-0 or distill-0: one seed
        ('copy', 'distill'): [['copy-0', 'distill-1']], ('distill', 'distill'): [['distill-0', 'distill-1']]}
    cka = {(p['a'], p['b']): p for p in r['cka']}
    for g in r['groups']:
        for kind in features.KINDS:
            for n, s in enumerate(g[kind]):
                values = [cka[tuple(p)][kind][n] for p in g['pairs']]
                assert s['mean'] == pytest.approx(statistics.fmean(values)) and s['min'] == min(values)
                assert s['std'] == (statistics.stdev(values) if len(values) > 1 else 0.0)


def test_a_run_writes_its_record_and_tables(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    argv = ['--teacher', TEACHER, '--images', '8', '--blocks', '0', '--out-dir', tmp_path / 'out', '--dirty', 'true',
            '--models', os.path.join(MODELS, 'scratch-0.pt'), os.path.join(MODELS, 'scratch-1.pt')]
    assert run_in_process(monkeypatch, features, *argv) is None
    record = json.loads((tmp_path / 'out' / 'features.json').read_text())
    assert record['command'] == shlex.join(['python', '-m', 'tools.features', *map(str, argv)])
    assert record['config']['images'] == record['result']['images'] == 8
    assert (tmp_path / 'out' / 'TABLE.md').read_text() == features.tables(record['result'])


def test_bad_input_is_one_line_and_nothing_is_written(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    (tmp_path / 'features.json').write_text('{"mine": 1}')
    model = os.path.join(MODELS, 'scratch-0.pt')
    said = run_in_process(monkeypatch, features, '--teacher', TEACHER, '--models', model, '--out-dir', tmp_path)
    assert 'features.json exists and is not an earlier result' in said and '--out-dir' in said, said
    assert (tmp_path / 'features.json').read_text() == '{"mine": 1}' and not (tmp_path / 'TABLE.md').exists()
    said = run_in_process(monkeypatch, features, '--teacher', TEACHER, '--models', model, '--blocks', '6',
                          '--out-dir', tmp_path / 'new', '--dirty', 'true')
    assert said.startswith('error: --blocks 6: the models have blocks 0 to 5'), said
    assert not (tmp_path / 'new').exists()
    said = run_in_process(monkeypatch, features, '--models', model, model)
    assert '--teacher' in said and 'required' in said, said


def page_command():
    """The flags of the command the page says makes the top-1 and CKA tables again."""
    with open(os.path.join(FEATURES, 'README.md'), encoding='utf-8') as f:
        return shlex.split(re.search(REMADE, flat(f.read()))[1])[3:]   # after python -m tools.features


def test_the_page_names_a_command_of_the_tool_on_the_committed_models():
    with open(os.path.join(FEATURES, 'features.json')) as f:
        committed = json.load(f)['config']
    cfg = parse_config(features.FeaturesConfig, argv=page_command())
    assert (cfg.teacher, cfg.models, cfg.images, cfg.blocks) == (committed['teacher'], committed['models'], 0, [])


@pytest.mark.gpu
@pytest.mark.skipif(not any(map(os.path.isdir, (os.path.join(ROOT, 'data'), FASHION_MNIST_SYSTEM_DIR))),
                    reason='apt-get install dataset-fashion-mnist')
def test_the_page_command_makes_the_committed_numbers_again(monkeypatch, tmp_path):
    """Every pair's CKA per block within 1e-5 and every top-1 of the committed features.json, and so TABLES.md's
    top-1 and CKA tables digit for digit (the first run was on a CPU: this one on a GPU, fp32)."""
    monkeypatch.chdir(ROOT)
    argv = page_command()
    argv[argv.index('--out-dir') + 1] = str(tmp_path)
    assert run_in_process(monkeypatch, features, *argv) is None
    assert remade_problems(str(tmp_path)) == []


def remade_problems(out_dir, tolerance=1e-5):
    """How the re-made features.json and TABLE.md in out_dir differ from the committed ones (the same pairs, each
    CKA within `tolerance`, the same top-1 to two digits, the same tables)."""
    with open(os.path.join(FEATURES, 'features.json')) as f:
        old = json.load(f)['result']
    with open(os.path.join(out_dir, 'features.json')) as f:
        new = json.load(f)['result']
    problems = [f"{k} top-1 {new['models'][k]['top1']} where {m['top1']}" for k, m in old['models'].items()
                if m['top1'] is not None and f"{m['top1']:.2f}" != f"{new['models'][k]['top1']:.2f}"]
    made = {(p['a'], p['b']): p for p in new['cka']}
    problems += [f"{p['a']} {p['b']} {kind} block {i}: {made[p['a'], p['b']][kind][i]} where {v}"
                 for p in old['cka'] for kind in features.KINDS for i, v in enumerate(p[kind])
                 if abs(made[p['a'], p['b']][kind][i] - v) > tolerance]
    with open(os.path.join(FEATURES, 'TABLES.md'), encoding='utf-8') as f:
        committed = f.read()
    with open(os.path.join(out_dir, 'TABLE.md'), encoding='utf-8') as f:
        problems += [f'TABLES.md has no table {t[:60]!r}' for t in f.read().split('\n\n') if t.startswith('|')
                     and t.strip() not in committed]
    return problems
