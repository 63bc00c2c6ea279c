"""The notebook's sentences against the code and the data they name: the token numbers of the patch figure, what
`auto` hands a copy student on each device (and attention_copy.py's docstring), what the teacher's output is, how
far the fine-tuned and the distilled maps are from the teacher's (features.json), the ensemble's two numbers and
the CKA of a fine-tuned against a distilled model (results.json, features.json), the budgets it tables, where it
first says which numbers are results, the loss plot and exercise 3 against the stored run; and (issue 71) where the
miniature differs from the paper (the summary, the README), the variants, the features figure's bottom row, the
untrained student's CKA, the terms defined where first used, the preset's reasons, exercise 4 and the sections' order."""
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
            given = attention_copy.copied(teacher, x, [0, 1], None, 'attn', implementation=implementation)
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
    reading = markdown("Section 1's two questions")
    assert f"its maps move {span(means)} nats (KL) from the teacher's in blocks 0-5" in reading, span(means)
    assert 'Fine-tuning does not keep the teacher\'s routing' in reading
    assert not re.search(r'(keeps|shares?) the teacher\'s routing', markdown('## 1. The idea') + reading)

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
    """What the paragraphs about the ensemble's two numbers (section 7) and a fine-tuned against a distilled model
    (section 8) get wrong."""
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
    text = markdown('A distilled partner adds') + ' ' + markdown("Section 1's two questions")
    assert ensemble_problems(text, f) == []
    assert 'pairs models of the same seed' in text and 'pairs different seeds' in text
    assert ensemble_problems(text.replace('0.51-0.82', '0.61-0.82'), f) != []       # the reader catches a change
    summary = markdown('## Summary')
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
    """The paragraph that names results and smoke runs comes before the first cell that trains anything; the table of
    budgets where two budgets are first compared: after the scripts' runs, right before the figure that sets this
    notebook's runs beside the committed reproduction's (issue 71: not before anything has trained)."""
    nb = cells()
    source = lambda c: ''.join(c['source'])
    said = next(i for i, c in enumerate(nb) if c['cell_type'] == 'markdown' and '**Results and smoke runs.**' in source(c))
    trains = next(i for i, c in enumerate(nb) if c['cell_type'] == 'code' and re.search(r'\btrain\(|= run\(', source(c)))
    runs = max(i for i, c in enumerate(nb) if c['cell_type'] == 'code' and re.search(r'^\w+ = run\(', source(c), re.M))
    table = next(i for i, c in enumerate(nb) if c['cell_type'] == 'code' and 'budgets(' in source(c))
    compared = next(i for i, c in enumerate(nb) if c['cell_type'] == 'code' and 'plot_curves(' in source(c))
    assert said < trains < runs < table < compared
    assert not any('plot_curves(' in source(c) or 'committed=' in source(c) for c in nb[:table] if c['cell_type'] == 'code')
    assert 'Only the committed reproduction is a result' in markdown('Only the committed reproduction is a result')


def test_every_budget_the_notebook_prints_is_in_both_tables():
    """The notebook's table (its stored output) and the README's have the same five budgets, and the hand-written
    loop's printed line names its budget."""
    from test_docs import BUDGET_NAMES
    table = next(''.join(o['data']['text/markdown']) for c in cells() if c['cell_type'] == 'code'
                 for o in c['outputs'] if 'text/markdown' in o.get('data', {}))
    rows = [r.split('|')[1].strip() for r in table.splitlines()[2:]]
    assert len(rows) == len(BUDGET_NAMES) and all(r.startswith(n) for r, n in zip(rows, BUDGET_NAMES)), rows
    assert "print(f'the hand-written loop, after {STEPS} steps" in code('by_hand = {')
    assert re.search(r'^STEPS, BATCH, LR, W, N_EVAL = ', code('def train('), re.M)
    assert 'BUDGET' not in code('budgets(')           # the table is the same in both modes: quick mode's row is QUICK

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

# -----------------------------------------------------------------------------
# Where the miniature differs from the paper (issue 71): the summary and the README against results.json,
# variants.json and the paper's table; the hypothesis marked as one, with its evidence


def variants():
    with open(os.path.join(RESULTS, 'variants', 'variants.json')) as f:
        return json.load(f)


def differences_from_the_paper():
    """The numbers the summary sets beside the paper's: each method's share of the gap here and there, copy given the
    teacher's values, and the committed models' top-1 under noise and rotation (copy, distillation, scratch)."""
    from tools.reproduce_report import PAPER
    with open(os.path.join(RESULTS, 'results.json')) as f:
        here = {k: v['mean'] for k, v in json.load(f)['summary']['methods'].items()}
    way = lambda t, k: 100 * (t[k] - t['scratch']) / (t['finetune'] - t['scratch'])
    v = variants()
    shifted = lambda s: tuple(v['shifted'][s][k]['mean'] for k in ('copy', 'distill', 'scratch'))
    return {'distill': way(here, 'distill'), 'copy': way(here, 'copy'), 'paper_distill': way(PAPER, 'distill'),
            'paper_copy': way(PAPER, 'copy'), 'values': v['runs']['copy-v']['gap'], 'noise': shifted('noise'),
            'rotate': shifted('rotate')}


def summary_problems(text, d):
    """What the summary's 'where the miniature differs' says that its data do not."""
    said = [f"Distillation gets {d['distill']:.1f}% of the way from scratch to fine-tuning",
            f"the paper's gets {d['paper_distill']:.0f}%",
            f"Copy gets {d['copy']:.1f}% of the way; the paper's gets {d['paper_copy']:.1f}%",
            f"instead of its maps gets {d['values']:.1f}%",
            'Under noise both transferred students fall far below scratch (copy {:.1f}% and distillation {:.1f}% '
            'against {:.1f}%)'.format(*d['noise']),
            'Under rotation copy falls below scratch too ({0:.1f}% against {2:.1f}%); distillation falls below it on '
            'the means only ({1:.1f}% against {2:.1f}%)'.format(*d['rotate'])]
    out = [f'not said: {s}' for s in said if s not in text]
    if not d['values'] > d['copy']:
        out.append("the values do not help copy more than its maps")
    if not max(d['noise'][:2]) < d['noise'][2] - 10:
        out.append('under noise the transferred students are not far below scratch')
    if not max(d['rotate'][:2]) < d['rotate'][2]:
        out.append('under rotation the transferred students are not below scratch on the means')
    if not d['distill'] < d['paper_distill'] and d['copy'] < d['paper_copy']:
        out.append('the miniature does not fall short of the paper')
    return out


def test_the_summary_says_where_the_miniature_differs_from_the_paper():
    text, d = markdown('## Summary'), differences_from_the_paper()
    assert '**Where the miniature differs from the paper.**' in text
    assert summary_problems(text, d) == []
    assert summary_problems(text.replace(f"{d['values']:.1f}%", '38.1%'), d) != []      # the reader catches a change
    # one hypothesis for copy's miss, marked as one, pointing at the evidence that exists
    hypothesis = text[text.index('*A hypothesis, not tested:*'):]
    assert '(results/fashion-mnist/VALIDATION.md#teacher)' in hypothesis
    assert '(results/fashion-mnist/variants/README.md)' in hypothesis
    with open(os.path.join(RESULTS, 'VALIDATION.md'), encoding='utf-8') as f:
        even = next(r for r in f.read().splitlines() if r.startswith('| even maps (the control) |'))
    assert re.search(r'\| [−-]\d+\.\d+% \|', even), f'copying even maps ends above scratch: {even}'
    assert 'Copying even maps ends below scratch' in hypothesis and 'values help copy more than' in hypothesis


def test_the_readme_says_where_the_miniature_differs_too():
    """Its first lines say which transfer matches fine-tuning in the paper (distillation only), its Results what does
    not hold here: copy's share, copy given the values, the shifts where both students fall below scratch."""
    from tools.reproduce_report import PAPER
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
        text = f.read()
    first = ' '.join(text.split('\n\n')[1].split())
    assert 'Distilled, it matches fine-tuning the teacher; copied, it gets most of the way' in first
    assert PAPER['distill'] == PAPER['finetune'] and PAPER['scratch'] < PAPER['copy'] < PAPER['finetune']
    assert len(re.findall(r'match(?:es)? fine-tuning', first)) == 1
    d, flat = differences_from_the_paper(), ' '.join(text.split())
    for said in (f"closes {d['values']:.1f}%, more than with the maps",
                 'under noise both transferred students fall far below scratch (copy {:.1f} and distillation {:.1f} '
                 'against {:.1f})'.format(*d['noise']),
                 'Under rotation copy falls below scratch too ({0:.1f} against {2:.1f}); distillation falls below it on '
                 'the means only ({1:.1f} ±'.format(*d['rotate']),
                 f"Distillation closes {d['distill']:.1f}% of the scratch-to-fine-tune gap (95% interval over seeds",
                 "where the paper's closes all of it;", 'A hypothesis, not tested'):
        assert said.lower() in flat.lower(), said
    assert "(the paper's copy closes" not in flat, "our distillation set beside the paper's copy"


def test_the_section_on_the_papers_other_questions_holds_on_variants_json():
    v, text = variants(), markdown('## 9. The paper\'s other questions')
    shifts = [s for s in v['shifted'] if s != 'none']
    mean = lambda s, k: v['shifted'][s][k]['mean']
    assert all(max(mean(s, 'copy'), mean(s, 'distill')) < mean(s, 'finetune') for s in shifts)
    # behind scratch beyond the seeds' spread: mean + std below scratch's mean - std
    r = lambda s, k: v['shifted'][s][k]
    apart = {(s, k) for s in shifts for k in ('copy', 'distill')
             if r(s, k)['mean'] + r(s, k)['std'] < r(s, 'scratch')['mean'] - r(s, 'scratch')['std']}
    assert 'Both transferred students fall behind fine-tuning under every shift but rotation.' in text
    assert "Beyond the seeds' spread they fall behind scratch only under noise (both) and rotation (copy)." in text
    behind_finetune = {(s, k) for s in shifts for k in ('copy', 'distill')
                       if r(s, k)['mean'] + r(s, k)['std'] < r(s, 'finetune')['mean'] - r(s, 'finetune')['std']}
    assert {(s, k) for s in shifts for k in ('copy', 'distill')} - behind_finetune == {('rotate', 'distill')}
    assert apart == {('noise', 'copy'), ('noise', 'distill'), ('rotate', 'copy')}, apart
    heads4, whole = v['runs']['distill-heads4'], v['baselines']['distill']
    assert 'Four of 8 heads match all 8' in text and abs(heads4['mean'] - whole['mean']) <= max(heads4['std'], whole['std'])


def test_the_follow_ups_section_holds_on_followup_json():
    """What the notebook's section on the follow-up, and the README's paragraph, say of its miniature is what
    followup.json has: no failure, every transfer above its scratch on the means (beyond the spread but for the
    matched copy student), the two students level within the spread, the components lifting scratch beyond it and so
    leaving the matched student the smaller gain, the interaction below 0 beyond it; the teacher's size as its record
    has it."""
    with open(os.path.join(RESULTS, 'followup', 'followup.json')) as f:
        result = json.load(f)
    from tools.intervals import side
    s, text = result['summary'], markdown('**What a map hands over.**')
    gains, matched = s['gains'], s['matched_minus_plain']
    assert 'Here the failure does not show.' in text and s['failure_reproduced'] == {'copy': False, 'distill': False}
    assert {arm: side(g) for arm, g in gains.items()} == {'copy-plain': 'above', 'distill-plain': 'above',
                                                          'copy-matched': 'undecided', 'distill-matched': 'above'}
    assert ('The plain student ends above its own scratch run after copy and after distillation' in text
            and 'so does the matched student after distillation, while after copy its seeds do not decide' in text)
    assert 'Whether the matched student ends above or below the plain one, the seeds do not decide' in text
    assert side(matched['copy']) == side(matched['distill']) == 'undecided'
    assert 'The components lift training from scratch instead' in text
    assert side(matched['scratch']) == 'above'
    assert all(gains[f'{m}-matched']['mean'] < gains[f'{m}-plain']['mean'] for m in ('copy', 'distill'))
    # the interaction: below 0 beyond the spread for both methods, by the points the text says
    interaction = s['interaction']
    assert side(interaction['copy']) == side(interaction['distill']) == 'below'
    assert (f"the matched student gains {-interaction['copy']['mean']:.2f} points less after copy, "
            f"{-interaction['distill']['mean']:.2f} after distillation") in text
    with open(os.path.join(RESULTS, 'followup', 'logs', 'teacher', 'seed0', 'config.json')) as f:
        teacher = json.load(f)
    assert f"({teacher['depth']} blocks of {teacher['embed_dim']} dimensions)" in text
    assert f"pre-trained for {teacher['epochs']} epochs" in text
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:   # the README's paragraph on it too
        readme = ' '.join(next(p for p in f.read().split('\n\n') if '**When transfer fails' in p).split())
    for said in ('The failure does not show at this scale.',
                 f"gains {gains['copy-plain']['mean']:+.2f} (copy) and {gains['distill-plain']['mean']:+.2f} "
                 '(distillation) points over its scratch run',
                 f"is {interaction['copy']['mean']:.2f} (copy) and {interaction['distill']['mean']:.2f} (distillation) "
                 "points, below 0 beyond the seeds' spread",
                 f"lift training from scratch by {matched['scratch']['mean']:+.2f} points"):
        assert said in readme, said


def test_the_second_teachers_paragraphs_hold_on_its_followup_json():
    """The teacher with DINOv2's layer scale, in the notebook's section and the README: no failure after distillation,
    both students above their scratch runs there and the interaction below 0, each beyond the spread; after copy no
    gain, no interaction and no failure decided; layer scale not lifting scratch beyond the spread."""
    with open(os.path.join(RESULTS, 'followup-dinov2', 'followup.json')) as f:
        s = json.load(f)['summary']
    from tools.intervals import side
    text = markdown('**What a map hands over.**')
    gains, interaction, matched = s['gains'], s['interaction'], s['matched_minus_plain']
    assert s['failure_reproduced'] == {'copy': None, 'distill': False}
    assert {arm: side(g) for arm, g in gains.items()} == {'copy-plain': 'undecided', 'distill-plain': 'above',
                                                          'copy-matched': 'undecided', 'distill-matched': 'above'}
    assert (side(interaction['copy']), side(interaction['distill']), side(matched['scratch'])) == \
        ('undecided', 'below', 'undecided')
    for said in ('After distillation the failure does not show with it either.',
                 f"Both students gain (plain {gains['distill-plain']['mean']:+.2f}, matched "
                 f"{gains['distill-matched']['mean']:+.2f} points)",
                 f"the matched student gains {-interaction['distill']['mean']:.2f} points less",
                 f"After copy the seeds decide neither student's gain (plain {gains['copy-plain']['mean']:+.2f}, "
                 f"matched {gains['copy-matched']['mean']:+.2f}), nor the interaction "
                 f"({interaction['copy']['mean']:+.2f}), nor the failure",
                 f"Layer scale does not lift training from scratch here ({matched['scratch']['mean']:.2f}, not "
                 'decided)'):
        assert said in text, said
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
        readme = ' '.join(next(p for p in f.read().split('\n\n') if '**When transfer fails' in p).split())
    assert (f"After distillation the failure does not show with it either, and the interaction is "
            f"{interaction['distill']['mean']:.2f} points, below 0 beyond the seeds' spread. After copy the seeds "
            f"decide neither (interaction {interaction['copy']['mean']:+.2f}).") in readme


def test_distillation_leads_copy_on_the_means_not_on_every_seed():
    """'Distillation's mean leads copy's from the first epoch on ..., though not on seed 1': per seed, from the logs."""
    first = {m: {k: json.loads(open(os.path.join(RESULTS, 'logs', m, f'seed{k}', 'metrics.jsonl')).readline())['top1']
                 for k in range(3)} for m in ('copy', 'distill')}
    behind = [k for k in range(3) if first['distill'][k] <= first['copy'][k]]
    text = markdown("Copy has the teacher's maps from its first step")
    assert behind == [1], behind
    k = behind[0]
    assert (f"though not on seed {k} ({first['distill'][k]:.1f}% against {first['copy'][k]:.1f}% after epoch 1)"
            in text)
    assert 'Distillation leads copy from the first epoch on' not in text


def test_the_features_bottom_row_is_read_as_features_json_has_it():
    """The distilled heads read as far as the teacher's in the blocks they were taught (within the stated pixels, every
    seed), block 5 not; copy's given heads are the teacher's; scratch's read farther, by the stated means."""
    r = features()
    t = np.array(r['attention_distance'][r['teacher']])                   # (blocks, heads), pixels
    text = markdown("Section 1's two questions")
    bound = float(re.search(r"each distilled head reads as far as the teacher's head, within ([\d.]+)\s+pixels",
                            text)[1])
    for k, m in r['models'].items():
        d = np.abs(np.array(r['attention_distance'][k]) - t)
        if m['method'] == 'distill':
            assert m['maps_distilled'] == [0, 1, 2, 3, 4] and d[:5].max() < bound < d[5].max(), (k, d.max(1))
        if m['method'] == 'copy':
            assert d[m['maps_given']].max() < 1e-4, k
    assert 'In blocks 0-4 each distilled head' in text and 'block 5, not distilled, has its own' in text
    per_block = lambda method: [np.mean([r['attention_distance'][k][i] for k, m in r['models'].items()
                                         if m['method'] == method]) for i in range(r['depth'])]
    ranged = lambda v: f'{min(v):.1f}-{max(v):.1f}'
    assert (f"Scratch's heads read farther ({ranged(per_block('scratch'))} pixels a block; the teacher's "
            f"{ranged(per_block('teacher'))})") in text
    assert min(per_block('scratch')) > max(per_block('teacher'))


def test_the_cka_of_an_untrained_student_is_read_where_it_is_printed():
    """The notebook's CKA cell prints the teacher against the untrained student; the text after it quotes that
    number, computed again here as the cell computes it (the seed-0 student, the first 256 test images, block 2)."""
    import vit
    from tools.tutorial import fashion_mnist
    from util.checkpoints import build_from_checkpoint
    teacher = build_from_checkpoint(os.path.join(ROOT, 'teachers', 'fashion-mnist-mae.pt'), img_size=28).eval()
    torch.manual_seed(0)
    student = vit.VisionTransformer(img_size=28, patch_size=4, embed_dim=64, depth=6, num_heads=8, num_classes=10).eval()
    x, _ = fashion_mnist(256)
    with torch.no_grad():
        T, S = (m.forward_tokens(x, depth=3)[0].flatten(0, 1).double() for m in (teacher, student))
    T, S = T - T.mean(0), S - S.mean(0)
    value = ((S.T @ T).norm() ** 2 / ((T.T @ T).norm() * (S.T @ S).norm())).item()
    assert 'torch.manual_seed(0)\nstudent = vit.VisionTransformer(**SHAPE, num_classes=10)' in code('def copy_attention(')
    assert "('fresh', student)" in code('def cka(')
    assert f'Even the untrained student scores {value:.2f}' in markdown('Even the untrained student scores')


def test_each_term_is_defined_where_it_is_first_used():
    """class token, MAE, the gap, blr and a fused call: the first time the notebook's prose names each, it says what
    it is; and no exercise of another course is called 'its Exercise 2' beside the notebook's own."""
    prose = ' '.join(' '.join(''.join(c['source']).split()) for c in cells() if c['cell_type'] == 'markdown')
    for term, defined in ((r'class token', "**class token**, one extra learned token put in front"),
                          (r'\bMAE\b', '(MAE: a ViT that learns, without labels, to paint in the patches hidden from it)'),
                          (r'\bgap\b', 'the gap, the points by which fine-tuning beats scratch'),
                          (r'\bblr\b', 'The base learning rate, `blr` (`--blr`), sets the peak'),
                          (r'\bfused\b', 'one fused call (one GPU kernel for all of')):
        first = re.search(term, prose).start()
        at = prose.find(defined)
        assert at >= 0 and at <= first <= at + len(defined), (term, prose[first - 80:first + 80])
    assert 'Its Exercise 2' not in prose


def test_the_presets_choices_each_have_a_reason():
    """8 heads, layers 0-4 and w = 3 each get one line of reason, and the runs it cites say so."""
    with open(os.path.join(RESULTS, 'VALIDATION.md'), encoding='utf-8') as f:
        validation = ' '.join(f.read().split())
    heads = re.search(r"the 8-head teacher's students closed ([\d.]+)% \(copy\) and ([\d.]+)% \(distillation\) of the "
                      r"gap, against ([\d.]+)% and ([\d.]+)% with the 4-head teacher", validation)
    assert heads and float(heads[1]) > float(heads[3]) and float(heads[2]) > float(heads[4])
    assert ('It has 8 heads of 8 numbers: with 4 heads of 16, both students got less of the way from scratch to '
            'fine-tuning on held-out images') in markdown('On ImageNet, with a ViT-L/16')
    copy_text = markdown('`attention_copy.py` trains such a student')
    assert 'copies layers 0-4: on held-out images, copying or distilling all 6 closed less of the gap' in copy_text
    weight = {w: float(re.search(rf'\| attention loss weight {w} \| ([\d.]+) ', validation)[1]) for w in (1, 10)}
    at_3 = float(re.search(r'\| attention loss weight 1 \| [\d.]+ \([\d.]+%\) \| ([\d.]+) \([\d.]+%\) at 3', validation)[1])
    assert max(weight.values()) < at_3 and "with `w = 3` (the paper's; 1 and 10 did worse here)" in copy_text


def test_exercise_4_checks_the_fused_copy_against_section_3s():
    """The learner's fused copy is compared with section 3's copy_attention on block 0 (the maps written out and
    averaged in pairs, for a student of 4 heads), given the teacher's own q and k of that block; the train loop's
    steps are the loop's again (no exercise steps it)."""
    cell = code('def copy_fused(h, attn, q_t, k_t):\n    # your code')
    assert 'check_fused_copy(copy_fused, PREDICTION_4' in cell and 'teacher.internals(x, [0])[0]' in cell
    assert 'reference=copy_attention(h0, attn, pairs)' in cell and 'unflatten(1, (4, 2)).mean(2)' in cell
    assert 'def copy_attention(h, attn, A_teacher):' in code('def copy_attention(')
    assert re.search(r'def train\(method, weight=W\):', code('def train(')) and 'for step in range(STEPS):' in code('def train(')


def test_figure_1_draws_real_maps_in_the_transferred_blocks_one_way(monkeypatch):
    """The paper's Figure 1 redrawn (section 1): its maps are the shipped teacher's on test image 0 (worked out again
    here), copy's student routes its transferred blocks with those very maps, and each side's arrows run one way,
    from the frozen teacher, in the transferred blocks only (the preset's 0-4 of 6)."""
    import matplotlib
    matplotlib.use('Agg')
    import torch
    from matplotlib.patches import ArrowStyle
    from tools import tutorial
    from util.checkpoints import build_from_checkpoint
    drawn = []
    monkeypatch.setattr(tutorial, 'show', drawn.append)
    tutorial.draw_methods()
    fig, = drawn
    maps, transferred, head = tutorial.methods_maps()
    assert sorted(transferred) == [0, 1, 2, 3, 4]
    teacher = build_from_checkpoint(os.path.join(ROOT, 'teachers', 'fashion-mnist-mae.pt'), img_size=28).eval()
    with torch.no_grad():
        logits = teacher.attention(tutorial.image_as_data(tutorial.test_image(0)), range(6))
    for side, method in zip(fig.axes, ('copy', 'distill')):
        images = [im.get_array() for im in side.get_images()]                     # teacher's 6, then the student's
        assert len(images) == 12
        for i in range(6):
            real = logits[i][0, head[i]].double().softmax(-1).numpy()
            assert abs(images[i] - real).max() < 1e-5, (method, i)
            if method == 'copy' and i in transferred:
                assert abs(images[6 + i] - real).max() < 1e-5, i                   # routed by the teacher's map
        arrows = [t.arrow_patch for t in side.texts if getattr(t, 'arrow_patch', None)]
        assert len(arrows) == len(transferred)
        assert all(isinstance(a.get_arrowstyle(), ArrowStyle.CurveB) for a in arrows), 'an arrow back to the teacher'


def test_the_sections_come_in_the_order_they_are_read():
    """Ensemble, features, the paper's other questions and the summary each a section of its own, in that order; the
    maps' KL stated only after the figure that draws it; the variants figure in its own section."""
    nb = cells()
    at = lambda test: next(i for i, c in enumerate(nb) if test(c, ''.join(c['source'])))
    heading = lambda h: at(lambda c, s: c['cell_type'] == 'markdown' and s.startswith(h))
    order = [heading(h) for h in ('## 7. Ensemble', '## 8. Are the features its own?', "## 9. The paper's other questions",
                                  '## 10. At scale', '## Summary', '## Exercises')]
    assert order == sorted(order), order
    figure = at(lambda c, s: c['cell_type'] == 'code' and 'plot_features(' in s)
    kl = at(lambda c, s: c['cell_type'] == 'markdown' and 'nats (KL) from the teacher\'s in blocks 0-5' in s)
    variants_figure = at(lambda c, s: c['cell_type'] == 'code' and 'variants.png' in s)
    assert order[1] < figure < kl < order[2] < variants_figure < order[3]


def test_exercises_4_and_5_ran_in_the_stored_copy():
    """Each solution ran: the stored outputs hold its check's line, and no error."""
    nb = cells()
    for n, said in ((4, 'the fused copy vs A_T @ V_S'), (5, "your mean maps vs --average-maps batch's")):
        solution = next(c for c in nb if c['cell_type'] == 'code' and
                        ''.join(c['source']).startswith(f'#@title Solution to exercise {n}'))
        printed = ''.join(''.join(o.get('text', '')) for o in solution.get('outputs', []))
        assert said in printed and '(right)' in printed, n
        assert not [o for o in solution.get('outputs', []) if o['output_type'] == 'error'], n


def test_section_2_and_the_summary_state_the_teachers_entropy_as_a_share_of_an_even_maps():
    """'85-95% of an even map's entropy': the lowest and highest layer mean of the teacher's row entropy over ln N, on
    the notebook's 256 test images, computed here from the teacher (fp32); and fig-5's axis starts at 0."""
    from tools.tutorial import fashion_mnist
    from util import checkpoints
    teacher = checkpoints.build_from_checkpoint(os.path.join(ROOT, 'teachers', 'fashion-mnist-mae.pt')).eval()
    x, _ = fashion_mnist(256)
    with torch.no_grad():
        maps = teacher.attention(x, range(teacher.depth))
    share = [(-(l.softmax(-1) * l.log_softmax(-1)).sum(-1).mean()).item() / np.log(l.shape[-1]) for l in maps.values()]
    stated = f"{min(share):.0%}-{max(share):.0%} of an even map's entropy".replace('%-', '-')
    assert stated in markdown('### How much structure is there to hand over?'), stated
    assert stated in markdown('## Summary'), stated
    figure = code("ent_random = {i: entropy(l)")
    assert 'ylim=(0,' in figure and 'does not start at 0' not in figure
