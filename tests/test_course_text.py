"""The notebook's sentences against the code and the data they name: the token numbers of the patch figure, what
`auto` hands a copy student on each device (and attention_copy.py's docstring), what the teacher's output is, how
far the fine-tuned and the distilled maps are from the teacher's (features.json), the ensemble's two numbers and
the CKA of a fine-tuned against a distilled model (results.json, features.json), the budgets it tables, where it
first says which numbers are results, the loss plot and exercise 3 against the stored run."""
import json
import os
import re
import statistics

import numpy as np
import pytest
import torch

from conftest import ROOT
from test_claims import feature_claims
from test_features_page import span

NOTEBOOK = os.path.join(ROOT, 'tutorial.ipynb')
RESULTS = os.path.join(ROOT, 'results', 'fashion-mnist')


def cells():
    with open(NOTEBOOK, encoding='utf-8') as f:
        return json.load(f)['cells']


def markdown(start):
    """The text of the markdown cell that starts with `start`, its lines joined."""
    return next(' '.join(''.join(c['source']).split()) for c in cells()
                if c['cell_type'] == 'markdown' and ''.join(c['source']).startswith(start))


def code(marker):
    return next(''.join(c['source']) for c in cells() if c['cell_type'] == 'code' and marker in ''.join(c['source']))


def stored_numbers():
    text = ''.join(''.join(o.get('text', '')) for c in cells() if c['cell_type'] == 'code' for o in c['outputs'])
    return json.loads(re.search(r'^KEY_NUMBERS (.*)$', text, re.M)[1])


def features():
    with open(os.path.join(RESULTS, 'features', 'features.json')) as f:
        return json.load(f)['result']


def kl_per_block(r, method):
    """{seed's model: [KL to the teacher's maps per block, the mean over heads]} of one method's models."""
    return {k: [statistics.fmean(h) for h in r['kl'][k]] for k, m in r['models'].items() if m['method'] == method}

# -----------------------------------------------------------------------------
# Token numbers: the patch figure numbers its tiles as the maps number their tokens


def test_the_patch_figure_numbers_tiles_as_the_maps_number_tokens():
    """Token 0 is the class token (vit.py puts it first), so tile i of the figure is token i + 1."""
    import vit
    model = vit.VisionTransformer(img_size=28, patch_size=4, embed_dim=8, depth=1, num_heads=2).eval()
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        tokens = torch.cat([model.cls_token, model.patch_embed(x)], 1) + model.pos_embed
        assert torch.equal(tokens[:, 0], model.cls_token[:, 0] + model.pos_embed[:, 0])   # token 0: the class token
    figure = code("tiles = rearrange(img")
    assert 'a.set_title(str(i + 1)' in figure and 'tokens 1-49' in figure
    assert 'numbers the patches 1-49' in markdown('## 2. A Vision Transformer, by hand')
    assert 'tokens 1-49 are the patches, numbered as in the patch figure' in markdown('### A whole attention map')

# -----------------------------------------------------------------------------
# What a copy student is handed: the teacher's map on a CPU (auto: eager), its q and k on CUDA (auto: sdpa)


def test_auto_hands_over_the_map_on_a_cpu_and_q_k_on_cuda():
    import attention_copy
    import vit
    from util.checkpoints import build_from_checkpoint
    from util.launch import attn_implementation
    assert attn_implementation('auto', torch.device('cpu'))[0] == 'eager'
    assert attn_implementation('auto', torch.device('cuda'))[0] == 'sdpa'
    teacher = build_from_checkpoint(os.path.join(ROOT, 'teachers', 'fashion-mnist-mae.pt'), img_size=28).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        for implementation, handed in (('eager', {'attn'}), ('sdpa', {'q', 'k'})):
            vit.set_attn_implementation(teacher, implementation)
            given = attention_copy.copied(teacher, x, [0, 1], None, 'attn')
            assert all(set(g) == handed for g in given.values()), (implementation, given[0].keys())
    text = markdown('`attention_copy.py` trains such a student')
    assert ('On a CPU `auto` runs `eager`: the teacher writes its map out and hands it over' in text and
            'On CUDA `auto` runs `sdpa`: the teacher hands over its `q` and `k`' in text)
    doc = ' '.join(attention_copy.__doc__.split())
    assert ('With eager (what auto runs on a CPU) the teacher hands over its map' in doc and
            'With sdpa (what auto runs on CUDA) it hands over its q_t and k_t' in doc), doc

# -----------------------------------------------------------------------------
# The teacher's output is its class token's: the checks of section 3 and exercise 2 compare it


def test_the_teacher_outputs_its_class_token():
    from util.checkpoints import build_from_checkpoint
    teacher = build_from_checkpoint(os.path.join(ROOT, 'teachers', 'fashion-mnist-mae.pt'), img_size=28).eval()
    assert not teacher.global_pool and isinstance(teacher.head, torch.nn.Identity)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(teacher(x), teacher.norm(teacher.forward_tokens(x)[0])[:, 0])
    text = markdown('### Tokens: patch embedding')
    assert "No classifier reads the class token's output" in text
    assert "its output, `teacher(x)`, is the class token's features" in text
    assert "Both checks compare `teacher(x)`, the class token's output" in markdown('A whole model takes maps per layer')
    assert 'teacher(x)' in code("same(\"teacher vs its twin") and 'teacher(x)' in code('def wrong_maps')

# -----------------------------------------------------------------------------
# The maps: the distilled students keep the teacher's, the fine-tuned models move away (features.json)


def test_the_distilled_maps_are_the_teachers_and_the_fine_tuned_move_away():
    r = features()
    taught = {tuple(m['maps_distilled']) for m in r['models'].values() if m['method'] == 'distill'}
    assert taught == {(0, 1, 2, 3, 4)}, taught
    distilled = kl_per_block(r, 'distill')
    assert len(distilled) == 3 and max(v for kl in distilled.values() for v in kl[:5]) <= 0.02
    tuned = kl_per_block(r, 'finetune')
    means = [statistics.fmean(kl[i] for kl in tuned.values()) for i in range(r['depth'])]
    assert min(v for kl in tuned.values() for v in kl) > 0.02, 'the text says fine-tuning moves away'
    said = 'at most 0.02 nats (KL) from the teacher\'s in blocks 0-4, on each of the 3 seeds'
    assert said in markdown('Copy has the teacher\'s maps from its first step')
    ensemble = markdown('## 7. Ensemble')
    assert f"its maps are {span(means)} nats (KL) from the teacher's in blocks 0-5" in ensemble, span(means)
    assert 'Fine-tuning does not keep the teacher\'s routing' in ensemble
    assert not re.search(r'(keeps|shares?) the teacher\'s routing', markdown('## 1. The idea') + ensemble)

# -----------------------------------------------------------------------------
# The ensemble's two numbers, and a fine-tuned against a distilled model (results.json, features.json)


def ensemble_facts():
    with open(os.path.join(RESULTS, 'results.json')) as f:
        m = json.load(f)['summary']['methods']
    c = feature_claims()
    g = c['g']
    block = lambda a, b: [s['mean'] for s in g(a, b)['tokens']]
    return {'same_seed': (m['ensemble']['mean'], m['ensemble']['mean'] - m['finetune']['mean']),
            'cross_seed': (c['fd']['top1_ensemble']['mean'], c['fd']['gain']['mean']),
            'interval': c['fd']['gain']['interval'], 'ff_gain': c['ff']['gain']['mean'],
            'fd': block('finetune', 'distill'), 'ff': block('finetune', 'finetune'), 'dd': block('distill', 'distill'),
            'pairs': len(g('finetune', 'distill')['pairs'])}


def ensemble_problems(text, f):
    """What a paragraph about the ensemble's two numbers and a fine-tuned against a distilled model gets wrong."""
    out = []
    (top_s, gain_s), (top_c, gain_c), (lo, hi) = f['same_seed'], f['cross_seed'], f['interval']
    for said in (f'{top_s:.2f}, {gain_s:+.2f} over fine-tuning', f'{top_c:.2f}, {gain_c:+.2f}',
                 f'within the analysis\'s 95% interval ({lo:+.2f} to {hi:+.2f})',
                 'In every block, a fine-tuned and a distilled model are less alike',
                 f'less alike (CKA {span(f["fd"])}) than two seeds of either ({span(f["ff"])} and {span(f["dd"])})'):
        out += [] if said in text else [f'not said: {said}']
    if not lo <= gain_s <= hi:
        out.append(f'{gain_s:+.2f} is outside {lo:+.2f} to {hi:+.2f}')
    if not all(a < min(b, c) for a, b, c in zip(f['fd'], f['ff'], f['dd'])):
        out.append('a fine-tuned and a distilled model are not less alike than two seeds of either in every block')
    return out


def test_the_notebook_reconciles_the_ensembles_two_numbers():
    f = ensemble_facts()
    text = markdown('So the two questions of section 1')
    assert ensemble_problems(text, f) == []
    assert 'pairs models of the same seed' in text and 'pairs different seeds' in text
    assert ensemble_problems(text.replace('0.51-0.82', '0.61-0.82'), f) != []       # the reader catches a change
    summary = markdown('## 8. At scale')
    assert (f"it adds about what a second fine-tuned seed adds ({f['cross_seed'][1]:+.2f} against "
            f"{f['ff_gain']:+.2f})") in summary
    assert abs(f['cross_seed'][1] - f['ff_gain']) < 0.1 and '+0.21' not in summary


def test_the_readme_reconciles_them_too():
    f = ensemble_facts()
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as fh:
        text = ' '.join(next(p for p in fh.read().split('\n\n') if '**"Its own features"' in p).split())
    lo, hi = f['interval']
    for said in ('In every block, a fine-tuned and a distilled model are less alike',
                 f'less alike ({span(f["fd"])}) than two seeds of either ({span(f["ff"])} and {span(f["dd"])})',
                 f"The reproduction's {f['same_seed'][1]:+.2f} above comes from pairs of the same seed",
                 f"95% interval for the gain ({lo:+.2f} to {hi:+.2f})"):
        assert said in text, said
    assert lo <= f['same_seed'][1] <= hi

# -----------------------------------------------------------------------------
# Results and smoke runs; every budget the notebook prints is in the tables


def test_the_notebook_says_what_is_a_result_before_it_trains():
    """The paragraph that names results and smoke runs comes before the first cell that trains anything."""
    nb = cells()
    said = next(i for i, c in enumerate(nb) if c['cell_type'] == 'markdown'
                and '**Results and smoke runs.**' in ''.join(c['source']))
    trains = next(i for i, c in enumerate(nb) if c['cell_type'] == 'code' and re.search(r'\btrain\(|= run\(',
                                                                                         ''.join(c['source'])))
    table = next(i for i, c in enumerate(nb) if c['cell_type'] == 'code' and 'budgets(' in ''.join(c['source']))
    assert said < table < trains
    assert 'Only the committed reproduction is a result' in markdown('## 5. Training what you built')


def test_every_budget_the_notebook_prints_is_in_both_tables():
    """The notebook's table (its stored output) and the README's have the same five budgets, and the hand-written
    loop's printed line names its budget."""
    from test_docs import BUDGET_NAMES
    table = next(''.join(o['data']['text/markdown']) for c in cells() if c['cell_type'] == 'code'
                 for o in c['outputs'] if 'text/markdown' in o.get('data', {}))
    rows = [r.split('|')[1].strip() for r in table.splitlines()[2:]]
    assert len(rows) == len(BUDGET_NAMES) and all(r.startswith(n) for r, n in zip(rows, BUDGET_NAMES)), rows
    assert "print(f'the hand-written loop, after {STEPS} steps" in code('by_hand = {')
    budget = code("if MODE == 'quick':")
    assert re.search(r'^STEPS, BATCH, LR, W, N_EVAL = ', budget, re.M) and 'STEPS, BATCH' not in code('def train(')

# -----------------------------------------------------------------------------
# The hand-written loop's figure, and exercise 3, against the stored run


def test_the_loss_plot_reads_as_its_text_says():
    n = stored_numbers()
    ce = n['by_hand_cross_entropy']
    assert ce['copy'] < ce['distillation'] < ce['scratch'], "the text says copy's falls fastest, scratch's slowest"
    assert n['by_hand_attention']['scratch_last'] > np.log(50), "the text says scratch's rises above ln N"
    text = markdown('Left, the cross-entropy on each batch')
    assert "Copy's falls fastest and scratch's slowest" in text and 'rises above `ln N`' in text


def test_exercise_3_gives_scratch_to_the_last_digit():
    n = stored_numbers()
    assert n['weight_0_same_as_scratch'] is True
    assert n['weight_0']['top1'] == n['by_hand_top1']['scratch']
    assert n['weight_0']['attention_last'] == n['by_hand_attention']['scratch_last']
    assert 'It is scratch, to the last digit' in markdown('**3. Change the loop')
    assert "return train('distillation', weight=0)" in code('#@title Solution to exercise 3')


@pytest.mark.parametrize('start', ['**1. Do the patches', '**2. Whose routing?**', '**3. Change the loop'])
def test_each_exercise_has_an_expected_result(start):
    text = markdown(start)
    assert '*Expect*' in text or 'What to expect' in text


def test_the_loop_and_the_smoke_ensemble_read_as_their_text_says():
    """'Sixty steps', '32 new images' (the loop's budget), and the one-seed ensemble's 'partner far behind'."""
    from test_docs import notebook_loop
    steps, batch, _, _ = notebook_loop()
    assert 'Sixty steps show which way the losses move' in markdown('Sixty steps') and steps == 60
    assert f'Each step sees {batch} new images' in markdown('Left, the cross-entropy on each batch')
    top1 = stored_numbers()['top1']
    assert top1['finetune'] - top1['distill'] > 5, "the text calls this run's distilled partner far behind"
    assert 'a partner far behind' in markdown('That is a smoke number')
