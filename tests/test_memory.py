"""util/memory.py: a run's size is checked on its model built on the meta device (its shapes, no memory) by the resolve
step, which then throws it away: the run builds its model on the CPU after its seed. The model counted is the model the
run trains, for fine-tuning, a transfer's student and an MAE (its decoder too); a size no machine holds is refused from
it, before anything is allocated."""
import math
import os

import pytest
import torch

from attention_distill import DistillConfig
from conftest import TINY, random_vit, run_script
from finetune import FinetuneConfig, build_model
import mae_pretrain
from teacher import build_student
from util import memory
from util.launch import parse_config
from vit import MOST, VisionTransformer, model_arch

TEACHER = os.path.join(os.path.dirname(__file__), '..', 'teachers', 'fashion-mnist-mae.pt')


def test_each_script_checks_the_size_of_the_model_it_trains(monkeypatch):
    """Fine-tuning from scratch, a transfer's student, an MAE: the count the resolve step checked (on the meta device)
    is that of the model the run builds and trains, its classifier aside (counted once the data's classes are read);
    an MAE's decoder is counted too."""
    checked = []
    monkeypatch.setattr(memory, 'too_big', lambda numbers, *args: checked.append(numbers))
    small = ['--data', 'fake', '--img-size', '28', '--model', 'vit_tiny', '--depth', '2']

    def headless(model):
        return memory.parameters(model) - sum(p.numel() for p in model.head.parameters())

    finetune = parse_config(FinetuneConfig, {}, small)
    start = finetune.resolve()
    model = build_model(finetune, 10, start)
    assert start.weights is None and not any(p.is_meta for p in model.parameters())
    assert checked.pop() == headless(model)

    distill = parse_config(DistillConfig, {}, ['--data', 'fake', '--img-size', '28', '--teacher', TEACHER])
    transfer = distill.resolve()
    student = build_student(transfer.student, distill, 10)
    assert checked.pop() == headless(student)

    mae = parse_config(mae_pretrain.MAEConfig, {}, [*small, '--decoder-dim', '48', '--decoder-depth', '3'])
    assert mae.resolve() is None
    numbers = checked.pop()
    assert numbers == memory.parameters(mae_pretrain.build_mae(mae))
    encoder = VisionTransformer(**{**mae_pretrain.mae_arch(mae), 'num_classes': 0})
    assert numbers > memory.parameters(encoder)   # its decoder too


def test_a_size_no_machine_holds_is_refused_from_the_model_on_the_meta_device(monkeypatch):
    monkeypatch.setattr(memory, 'host_memory', lambda: 16 * 2 ** 30)
    with torch.device('meta'):
        big = VisionTransformer(**model_arch('vit_tiny', embed_dim=2 ** 16, num_heads=8, num_classes=0))
        small = VisionTransformer(**model_arch('vit_tiny', num_classes=0))
    assert memory.too_big(memory.parameters(big)).endswith('free on this machine')
    assert memory.too_big(memory.parameters(small)) is None
    with pytest.raises(memory.ConfigError, match='--embed-dim 65536, --depth 12, .* --batch-size 64: a ViT of these '
                                                 'sizes needs'):
        memory.check_trainable(big, 64)


def limited(*args):
    """`python <args...>` in a process whose address space is limited to 8 GB, as a machine smaller than what the
    command asks for: a command that allocates what it asks for fails in torch's words."""
    import resource
    return run_script(*args, limits=[(resource.RLIMIT_AS, 8 * 2 ** 30)])


def test_a_small_file_whose_record_asks_for_more_memory_than_there_is_is_refused_unallocated(tmp_path):
    """A 0.5 MB file whose record asks for a classifier of 51 GB (or more than twice this machine: one it cannot hold
    whatever it is), or an image size whose position embeddings take as much: ensemble.py and evaluate.py built it
    for real, reaching GBs before failing (uncapped, a machine met its OOM killer). Refused from the model built on the
    meta device, in one line naming the file, under a limit it would exceed."""
    model = random_vit()
    machine = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    numbers = max(51e9, 2 * machine) / 4                              # fp32
    grid = math.isqrt(int(numbers / 64)) + 1                         # position embeddings 64 wide
    for field, value in [('num_classes', int(numbers / 64)), ('img_size', 8 * grid)]:
        path = tmp_path / f'{field}.pt'
        torch.save({'model': model.state_dict(), 'arch': {**model.arch, field: value}}, path)
        assert path.stat().st_size < 2 ** 20
        for args in [('ensemble.py', *TINY, '--models', path),
                     ('evaluate.py', '--data', 'fake', '--num-workers', '0', '--models', path, '--out',
                      tmp_path / 'out')]:
            p = limited(*args)
            err = p.stderr.strip()
            # beyond a flag's most (img_size here), the same line as a flag's; below it, what it needs
            why = 'any command line allows' if value > MOST[field] else 'GB'
            assert p.returncode == 1 and err.startswith(f"error: '{path}' ") and why in err and '\n' not in err, \
                (field, args[0], err[-3000:])
            assert 'edited or is damaged' in err
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('args, flag', [
    (['attention_distill.py', '--teacher', TEACHER, '--img-size', '65536'], '--img-size 65536'),
    (['attention_copy.py', '--teacher', TEACHER, '--img-size', '65536'], '--img-size 65536'),
    (['finetune.py', '--img-size', '65536'], '--img-size 65536'),
    (['finetune.py', '--embed-dim', '65536', '--num-heads', '8'], '--embed-dim 65536'),
    (['attention_copy.py', '--teacher', TEACHER, '--img-size', '28', '--model', 'vit_tiny', '--embed-dim', '65536',
      '--num-heads', '8'], '--embed-dim 65536'),
    (['mae_pretrain.py', '--embed-dim', '65536', '--num-heads', '8'], '--embed-dim 65536')],
    ids=['distill-img', 'copy-img', 'finetune-img', 'finetune-dim', 'copy-dim', 'mae-dim'])
def test_a_size_too_big_for_the_machine_names_its_flag(tmp_path, args, flag):
    """--img-size 65536 (a teacher with patches of 4: its position embeddings alone take 68.7 GB) or --embed-dim 65536
    (terabytes): made for real, an allocation error naming no flag. Refused from the model built on the meta device,
    in one line naming the flag, under a limit it would exceed."""
    p = limited(*args, *TINY, '--out-dir', tmp_path / 'out')
    err = p.stderr.strip()
    assert p.returncode == 1 and err.startswith('error: ') and flag in err and ' GB ' in err and '\n' not in err, \
        err[-3000:]
    assert not (tmp_path / 'out').exists()
