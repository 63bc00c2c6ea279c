"""The checks of the notebook's exercises 4 and 5 (tools/tutorial.py) on a small ViT: each passes the asked
computation, and stops (an AssertionError in a sentence) a wrong answer and the retyping of the code the notebook
shows where that is not what the exercise asks; each waits for a prediction before it runs the learner's code; and the
notebook's exercise cells call them as their text says (the code they ask for is not on the page)."""
import json
import os
import re

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from conftest import ROOT
import vit
from tools.tutorial import check_batch_mean, check_fused_copy

NOTEBOOK = os.path.join(ROOT, 'tutorial.ipynb')


@pytest.fixture(scope='module')
def pair():
    """A teacher of 4 heads and a student of 2 (N = 17 tokens, d = 8 and 16: no q, k or v looks like a map) and a
    batch; the student's block-0 input and attention, the teacher's block-0 q and k, and section 3's copy by hand,
    each student head routed by the mean of its pair of teacher maps (exercise 4's grouped heads)."""
    torch.manual_seed(0)
    shape = dict(img_size=16, patch_size=4, embed_dim=32, depth=3)
    teacher = vit.VisionTransformer(**shape, num_heads=4, num_classes=0).eval()
    student = vit.VisionTransformer(**shape, num_heads=2, num_classes=0).eval()
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        tokens = torch.cat([student.cls_token.expand(len(x), -1, -1), student.patch_embed(x)], 1) + student.pos_embed
        h = student.blocks[0].norm1(tokens)
        qk = teacher.internals(x, [0])[0]
        A = teacher.attention(x, [0])[0].softmax(-1)                          # (B, 4, N, N)
        pairs = A.unflatten(1, (2, 2)).mean(2)                                # (B, 2, N, N): the groups' means
    attn = student.blocks[0].attn
    return dict(teacher=teacher, x=x, h=h, attn=attn, q=qk['q'], k=qk['k'], A=A,
                reference=copy_attention(h, attn, pairs), held=A.numel())


def values(h, attn):
    return rearrange(attn.qkv(h), 'b n (three h d) -> three b h n d', three=3, h=attn.num_heads)[2]   # (B, H, N, d)


def copy_attention(h, attn, A_teacher):
    """Section 3's copy, as the notebook shows it: the map written out, A_T @ V_S."""
    return attn.proj(rearrange(A_teacher @ values(h, attn), 'b h n d -> b n (h d)'))

# -----------------------------------------------------------------------------
# Exercise 4: copy through the fused call


def fused(h, attn, q_t, k_t):   # the asked computation: each map applied to its group's value head, then averaged
    v = values(h, attn).repeat_interleave(q_t.shape[1] // attn.num_heads, 1)
    out = F.scaled_dot_product_attention(q_t, k_t, v).unflatten(1, (attn.num_heads, -1)).mean(2)
    return attn.proj(rearrange(out, 'b h n d -> b n (h d)'))


def retyped(h, attn, q_t, k_t):   # section 3's copy_attention, its maps made from q_t and k_t and averaged in pairs
    A = (q_t @ k_t.transpose(-2, -1) / q_t.shape[-1] ** 0.5).softmax(-1)
    return copy_attention(h, attn, A.unflatten(1, (attn.num_heads, -1)).mean(2))


def fused_first_of_each_group(h, attn, q_t, k_t):   # a wrong answer: one teacher head of each pair, not their mean
    out = F.scaled_dot_product_attention(q_t[:, ::2], k_t[:, ::2], values(h, attn))
    return attn.proj(rearrange(out, 'b h n d -> b n (h d)'))


def fused_mean_of_q_and_k(h, attn, q_t, k_t):   # a wrong answer: the pair's q and k averaged, not their maps
    q, k = (t.unflatten(1, (attn.num_heads, -1)).mean(2) for t in (q_t, k_t))
    return attn.proj(rearrange(F.scaled_dot_product_attention(q, k, values(h, attn)), 'b h n d -> b n (h d)'))


def fused_own_qk(h, attn, q_t, k_t):   # a wrong answer: the student's own queries and keys, not the teacher's
    q, k, v = rearrange(attn.qkv(h), 'b n (three h d) -> three b h n d', three=3, h=attn.num_heads)
    return attn.proj(rearrange(F.scaled_dot_product_attention(q, k, v), 'b h n d -> b n (h d)'))


def fused_without_proj(h, attn, q_t, k_t):   # a wrong answer: the heads concatenated, never projected
    v = values(h, attn).repeat_interleave(q_t.shape[1] // attn.num_heads, 1)
    out = F.scaled_dot_product_attention(q_t, k_t, v).unflatten(1, (attn.num_heads, -1)).mean(2)
    return rearrange(out, 'b h n d -> b n (h d)')


def check_4(pair, answer, prediction):
    with torch.no_grad():
        check_fused_copy(answer, prediction, pair['h'], pair['attn'], pair['q'], pair['k'], pair['reference'])


def test_exercise_4_passes_the_fused_copy(pair, capsys):
    check_4(pair, fused, pair['held'])
    shown = capsys.readouterr().out
    assert 'the fused copy vs A_T @ V_S' in shown and f"holds {pair['held']:,} numbers" in shown and '(right)' in shown
    check_4(pair, fused, 1000)                              # a wrong prediction is told, not stopped
    assert '(not 1,000)' in capsys.readouterr().out


def by_rows_and_a_fused_call(h, attn, q_t, k_t):   # a map written out a row at a time, a fused call beside it
    v = values(h, attn).repeat_interleave(q_t.shape[1] // attn.num_heads, 1)
    F.scaled_dot_product_attention(q_t, k_t, v)
    rows = [(q_t[:, :, i:i + 1] @ k_t.transpose(-2, -1) / q_t.shape[-1] ** 0.5).softmax(-1) @ v
            for i in range(q_t.shape[2])]
    out = torch.cat(rows, 2).unflatten(1, (attn.num_heads, -1)).mean(2)
    return attn.proj(rearrange(out, 'b h n d -> b n (h d)'))


@pytest.mark.parametrize('answer, said', [(retyped, 'wrote out an N x N map'),
                                          (by_rows_and_a_fused_call, 'or rows of one'), (fused_own_qk, 'they differ'),
                                          (fused_without_proj, 'they differ'),
                                          (fused_first_of_each_group, 'they differ'),
                                          (fused_mean_of_q_and_k, 'they differ')])
def test_exercise_4_stops_the_retyped_copy_and_a_wrong_one(pair, answer, said):
    with pytest.raises(AssertionError, match=said):
        check_4(pair, answer, pair['held'])


@pytest.mark.parametrize('prediction, verdict', [
    ('{held}', 'right'), ('{held:,}', 'right'), ('{held:.2e}', 'right'), ('7 thousand', 'right'),
    ('6.9 Thousand', 'right'),
    ('8 thousand', "not 8 thousand"), (7000, 'right'), (1000, 'not 1,000'),
    ('lots', "'lots' is no count this check reads")])
def test_exercise_4_reads_a_count_as_a_learner_writes_it(pair, capsys, prediction, verdict):
    """A count in words or digits, to the digits it is written with (B x H x N x N = 6,936 here); what is no count
    is told, not a crash in int()."""
    if isinstance(prediction, str):
        prediction = prediction.format(held=pair['held'])
    assert pair['held'] == 6936
    check_4(pair, fused, prediction)
    assert f'({verdict}' in capsys.readouterr().out


def test_exercise_4_stops_a_copy_without_the_fused_call(pair):
    """A copy that writes no map, not even a row of one, but never calls the fused kernel is not what the exercise
    asks."""
    def values_alone(h, attn, q_t, k_t):     # each token its own value: no routing, no map, no fused call
        return attn.proj(rearrange(values(h, attn), 'b h n d -> b n (h d)'))
    with pytest.raises(AssertionError, match='never calls F.scaled_dot_product_attention'):
        check_4(pair, values_alone, pair['held'])


def test_exercise_4_waits_for_a_prediction_and_for_the_code(pair, capsys):
    ran = []
    check_4(pair, lambda *a: ran.append(1), None)
    assert ran == [] and 'write your prediction first (PREDICTION_4)' in capsys.readouterr().out
    check_4(pair, lambda *a: None, pair['held'])
    assert 'fill in copy_fused' in capsys.readouterr().out

# -----------------------------------------------------------------------------
# Exercise 5: the batch-averaged map


def mean_map(logits):   # the asked computation: the maps' mean over the batch, for every image
    A = logits.softmax(-1)
    return A.mean(0, keepdim=True).expand_as(A)


def check_5(pair, answer, prediction):
    with torch.no_grad():
        check_batch_mean(answer, prediction, pair['teacher'], pair['x'])


def mean_map_in_place(logits):   # the asked computation, its softmax written over the logits it was given
    logits.sub_(logits.amax(-1, keepdim=True)).exp_()
    logits /= logits.sum(-1, keepdim=True)
    return logits.mean(0, keepdim=True).expand_as(logits)


def test_exercise_5_passes_the_batch_mean(pair, capsys):
    check_5(pair, mean_map_in_place, 'more')   # in place on what it is given: judged on its own copy
    assert ': more (right)' in capsys.readouterr().out
    check_5(pair, mean_map, 'more')
    shown = capsys.readouterr().out
    assert 'the same in all 3 layers' in shown and ': more (right)' in shown
    check_5(pair, mean_map, 'less')
    assert "(not 'less')" in capsys.readouterr().out


@pytest.mark.parametrize('said', ['More', ' more ', 'MORE'])
def test_exercise_5_reads_a_word_in_any_case(pair, capsys, said):
    check_5(pair, mean_map, said)
    assert '(right)' in capsys.readouterr().out


@pytest.mark.parametrize('answer', [
    lambda l: l.softmax(-1),                                                  # section 3's maps, retyped: not averaged
    lambda l: l.softmax(-1).roll(-1, dims=0),                                 # exercise 2's solution, retyped
    lambda l: l.mean(0, keepdim=True).expand_as(l).softmax(-1),               # the logits averaged
    lambda l: l.softmax(-1).mean(2, keepdim=True).expand_as(l),               # the queries averaged (the other control)
], ids=['not averaged', 'rolled', 'mean of logits', 'over queries'])
def test_exercise_5_stops_the_retyped_maps_and_a_wrong_mean(pair, answer):
    with pytest.raises(AssertionError, match='they differ'):
        check_5(pair, answer, 'more')


def test_exercise_5_waits_for_a_prediction_and_for_the_code(pair, capsys):
    ran = []
    check_5(pair, lambda l: ran.append(1), None)
    assert ran == [] and 'write your prediction first (PREDICTION_5)' in capsys.readouterr().out
    check_5(pair, lambda l: None, 'more')
    assert 'fill in batch_mean_map' in capsys.readouterr().out

# -----------------------------------------------------------------------------
# The notebook's cells: the exercises ask for code that is not on the page, a prediction first


def cells():
    with open(NOTEBOOK, encoding='utf-8') as f:
        return [(c['cell_type'], ''.join(c['source']), c) for c in json.load(f)['cells']]


@pytest.mark.parametrize('n, name, check', [(4, 'copy_fused', 'check_fused_copy'),
                                            (5, 'batch_mean_map', 'check_batch_mean')])
def test_the_exercise_cells_ask_for_a_prediction_and_code_not_on_the_page(n, name, check):
    nb = cells()
    prompt = next(s for kind, s, _ in nb if kind == 'markdown' and s.startswith(f'**{n}. '))
    assert f'`PREDICTION_{n}`' in prompt and 'predict' in prompt.lower()
    exercise = next(s for kind, s, _ in nb if kind == 'code' and f'def {name}(' in s and '# your code' in s)
    assert re.search(rf'^PREDICTION_{n} = None', exercise, re.M) and 'return None' in exercise and check in exercise
    solution = next(c for kind, s, c in nb if kind == 'code' and s.startswith(f'#@title Solution to exercise {n}'))
    assert solution['metadata'].get('jupyter', {}).get('source_hidden') and solution['metadata'].get('cellView') == 'form'
    # the answer is nowhere on the page before its solution: no other cell defines it or makes its key call
    key = {4: 'repeat_interleave', 5: '.mean(0, keepdim=True)'}[n]
    shown = [s for kind, s, c in nb if kind == 'code' and c is not solution]
    assert not any(key in s for s in shown), f'exercise {n}: its solution ({key}) is on the page'

# -----------------------------------------------------------------------------
# The image a learner brings (the notebook's cell after section 2's entropies): read as the data are


def test_an_image_file_of_the_datas_size_reads_as_the_data(tmp_path):
    """Test image 0 saved as a 28 x 28 PNG reads back as fashion_mnist gives it (pixel for pixel: within fp32
    rounding, far below one grey level of 1 / 255 = 0.011 after normalising); enlarged, it
    reads back close to it (resized with antialiasing); grey repeated in 3 channels, as data.py repeats it."""
    from PIL import Image
    from tools.tutorial import MEAN, STD, fashion_mnist, image_as_data, test_image
    x, _ = fashion_mnist(1)
    test_image(0, 28).save(tmp_path / 'same.png')
    assert (image_as_data(tmp_path / 'same.png') - x).abs().max() < 1e-6
    big = image_as_data(test_image(0))                                 # 112 px, as the cell's stand-in
    assert big.shape == (1, 3, 28, 28) and torch.equal(big[:, 0], big[:, 2])
    assert (big - x).abs().mean() * STD < 0.05, 'the enlarged image does not read back close to the data'
    # any size and shape: the shorter side to 28, the centre cut square; inverted on request
    Image.new('RGB', (90, 50), (255, 255, 255)).save(tmp_path / 'wide.jpg')
    white = image_as_data(tmp_path / 'wide.jpg')
    assert white.shape == (1, 3, 28, 28) and torch.allclose(white * STD + MEAN, torch.ones(1), atol=1e-6)
    assert torch.allclose(image_as_data(tmp_path / 'wide.jpg', invert=True) * STD + MEAN, torch.zeros(1), atol=1e-6)


def test_a_file_that_is_no_image_is_one_line_naming_it(tmp_path):
    from tools.tutorial import image_as_data
    from util.errors import DataError
    (tmp_path / 'notes.png').write_text('not an image')
    with pytest.raises(DataError, match='notes.png'):
        image_as_data(tmp_path / 'notes.png')


def test_the_maps_of_your_image_share_one_colour_scale_with_its_bar(monkeypatch):
    """The own-image panels: one colour scale for every layer (a nearly even layer looks flat beside a peaked one),
    a colour bar, each panel's range in its title; and the notebook's cell draws them that way."""
    import matplotlib
    matplotlib.use('Agg')
    from tools import tutorial
    drawn = []
    monkeypatch.setattr(tutorial, 'show', drawn.append)
    torch.manual_seed(0)
    even = torch.full((49,), 1 / 50)
    reads = {0: even + 0.002 * torch.randn(49), 1: even + 0.02 * torch.rand(49)}   # nearly even; peaked
    tutorial.plot_reads(torch.rand(28, 28), reads, even=1 / 50)
    fig, = drawn
    overlays = [im for ax in fig.axes for im in ax.get_images() if im.get_cmap().name == 'magma']
    low, high = min(r.min().item() for r in reads.values()), max(r.max().item() for r in reads.values())
    assert len(overlays) == 2 and all(im.get_clim() == pytest.approx((low, high)) for im in overlays)
    assert overlays[0].colorbar is not None or overlays[1].colorbar is not None, 'no colour bar'
    titles = [ax.get_title() for ax in fig.axes if ax.get_images() and ax.get_images()[-1] in overlays]
    for title, read in zip(titles, reads.values()):
        assert f'{read.min():.4f} to {read.max():.4f}' in title, title
    cell = next(s for kind, s, _ in cells() if kind == 'code' and s.startswith('IMAGE, INVERT'))
    assert 'plot_reads(' in cell and 'imshow' not in cell, 'the cell draws its panels by itself, each its own scale'
