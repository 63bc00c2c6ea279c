"""--average-maps: what copy hands its student and what distillation pulls it toward is the teacher's map averaged
over the images of the batch or over the queries of an image, exactly; a copy student keeps its averaging when it is
loaded again; where averaging means nothing (the teacher's q, k or v) the flag is refused in one line."""
from types import SimpleNamespace

import pytest
import torch

import attention_copy
import attention_distill
from attention_copy import CopyModel, copied, load_copy_model
from attention_distill import DistillConfig, attention_cross_entropy, distill_loss_fn
from conftest import TINY, run_in_process, student_of
from util.launch import on_device
from vit import VisionTransformer, set_attn_implementation


TEACHER = dict(img_size=32, patch_size=8, num_classes=0, embed_dim=48, depth=3, num_heads=4)
LAYERS = [0, 2]


def make_teacher(implementation):
    torch.manual_seed(0)
    teacher = VisionTransformer(**TEACHER).requires_grad_(False).eval()
    for block in teacher.blocks:                # sharp maps, each image's and each query's its own
        block.attn.qkv.weight.mul_(6)
    return set_attn_implementation(teacher, implementation)


def mean_maps(teacher, x, over):
    """The rule written out, from the teacher's own maps: one image's mean, or one query's, repeated."""
    p = {i: t.softmax(-1) for i, t in teacher.attention(x, LAYERS).items()}      # (B, H, N, N)
    if over == 'batch':
        return {i: torch.stack([m.sum(0) / len(m)] * len(m)) for i, m in p.items()}
    return {i: torch.stack([m.sum(2) / m.shape[2]] * m.shape[2], 2) for i, m in p.items()}


@pytest.mark.parametrize('implementation', ['eager', 'sdpa'])
@pytest.mark.parametrize('over', ['batch', 'queries'])
def test_copy_hands_over_the_mean_map(over, implementation):
    teacher, x = make_teacher(implementation), torch.randn(5, 3, 32, 32)
    given, expected = copied(teacher, x, LAYERS, None, 'attn', over), mean_maps(teacher, x, over)
    own = {i: t.softmax(-1) for i, t in teacher.attention(x, LAYERS).items()}
    for i in LAYERS:
        assert torch.allclose(given[i]['attn'], expected[i], atol=1e-6)
        assert (given[i]['attn'] - own[i]).abs().max() > 0.1          # not the maps as they were
    if over == 'batch':
        assert torch.equal(given[0]['attn'][0], given[0]['attn'][4])   # every image the same map
    else:
        assert torch.equal(given[0]['attn'][:, :, 0], given[0]['attn'][:, :, 7])   # every query the same row
    student = student_of(DistillConfig(img_size=32, teacher='t.pt'), teacher, 10, LAYERS, no_qk=True).eval()
    with torch.no_grad():   # the classifier of teacher + student routes its values by those maps
        direct = student(x, inject={i: {'attn': expected[i]} for i in LAYERS})
        assert torch.allclose(CopyModel(teacher, student, LAYERS, average=over)(x), direct, atol=1e-5)


# an average is made of maps: a run that averages is on eager (teacher.written_out, test_averaged_maps_are_written_out)
@pytest.mark.parametrize('over, implementation', [('none', 'eager'), ('none', 'sdpa'), ('batch', 'eager'),
                                                  ('queries', 'eager')])
def test_distillation_pulls_toward_the_mean_map(over, implementation):
    teacher, x = make_teacher(implementation), torch.randn(5, 3, 32, 32)
    cfg = DistillConfig(img_size=32, teacher='t.pt', average_maps=over)
    torch.manual_seed(1)
    student = set_attn_implementation(student_of(cfg, teacher, 10, LAYERS), implementation)
    student.load_state_dict(teacher.state_dict(), strict=False)   # the teacher's own maps: far from their mean
    _, parts = distill_loss_fn(cfg, teacher, LAYERS, None, implementation)(student, x, torch.arange(5))
    target = {i: t.softmax(-1) for i, t in teacher.attention(x, LAYERS).items()} if over == 'none' else \
        mean_maps(teacher, x, over)
    _, own = student(x, keep={i: ('logits',) for i in LAYERS})
    expected = sum(attention_cross_entropy(target[i].log(), own[i]['logits']) for i in LAYERS)
    assert torch.allclose(parts['attn'], expected, rtol=1e-4), (parts['attn'], expected)
    if over != 'none':   # and not the maps as they were
        maps = teacher.attention(x, LAYERS)
        assert (sum(attention_cross_entropy(maps[i], own[i]['logits']) for i in LAYERS) - expected).abs() > 0.05


@pytest.fixture(scope='module')
def teacher_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('teacher') / 'teacher.pt'
    torch.manual_seed(0)
    teacher = VisionTransformer(**{**TEACHER, 'num_classes': 10})
    torch.save({'model': teacher.state_dict(), 'arch': teacher.arch}, path)
    return path


def run(monkeypatch, module, out, teacher, *args):
    return run_in_process(monkeypatch, module, *TINY, '--out-dir', out, '--teacher', teacher, '--max-steps', '1',
                          '--amp', 'off', '--layers', '0,2', *args)


def test_a_copy_student_is_loaded_with_its_averaging(monkeypatch, tmp_path, teacher_file):
    out = tmp_path / 'copy'
    assert run(monkeypatch, attention_copy, out, teacher_file, '--average-maps', 'queries') is None
    model = load_copy_model(str(out / 'checkpoint.pt'))
    assert model.average == 'queries'
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        direct = model.student(x, inject={i: {'attn': m} for i, m in mean_maps(model.teacher, x, 'queries').items()})
        assert torch.allclose(model(x), direct, atol=1e-5)
    # scored again (ensemble.py, evaluate.py), it stays on eager where auto would pick sdpa
    monkeypatch.setattr('util.launch.AUTO_ATTN', {'cpu': ('sdpa', 'as on CUDA')})
    cfg = SimpleNamespace(attn_implementation='auto', amp='off', batch_size=2)
    (placed,), _, said = on_device([model], cfg, [(torch.randn(3, 32, 32), 0)] * 2)
    assert placed.implementation == 'eager' and said.startswith('eager'), said
    with torch.no_grad():
        assert torch.allclose(placed(x), direct, atol=1e-5)


@pytest.mark.parametrize('module', [attention_copy, attention_distill])
@pytest.mark.parametrize('transfer', ['q', 'k', 'v'])
def test_averaging_anything_but_the_map_is_refused_in_one_line(monkeypatch, tmp_path, teacher_file, module,
                                                               transfer):
    msg = run(monkeypatch, module, tmp_path / 'run', teacher_file, '--transfer', transfer, '--average-maps', 'batch')
    assert msg == 'error: --average-maps batch: only with --transfer attn', msg
    assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('module', [attention_copy, attention_distill])
def test_averaged_maps_are_written_out(monkeypatch, tmp_path, teacher_file, module):
    """An average is made of maps: auto picks eager wherever it would pick sdpa (a CUDA device, faked here), an
    explicit sdpa is refused in one line."""
    msg = run(monkeypatch, module, tmp_path / 'sdpa', teacher_file, '--average-maps', 'batch',
              '--attn-implementation', 'sdpa')
    assert msg.startswith('error: --average-maps batch: writes the maps out'), msg
    assert not (tmp_path / 'sdpa').exists()
    monkeypatch.setattr('util.launch.AUTO_ATTN', {'cpu': ('sdpa', 'as on CUDA')})
    assert run(monkeypatch, module, tmp_path / 'auto', teacher_file, '--average-maps', 'queries') is None
    log = (tmp_path / 'auto' / 'log.txt').read_text()
    assert 'attention: eager (--attn-implementation auto on cpu: --average-maps queries' in log, log
