"""`--cuda-graph`: the whole training step captured once as one CUDA graph and replayed (util/engine.GraphedStep),
checked on the stand-in CUDA device (tests/standin_cuda.py), whose capture runs the step once and records each device
operator in it, for every training script (fine-tuning, copy, distillation, the MAE). What a replay needs of the
step, asserted on that record: it reads only what the GraphedStep watches (the batch copied in, each group's lr, the
running losses, the optimizer's state, and every parameter and buffer of the modules the step runs: the model, the
EMA's copy, a transfer's frozen teacher) or what it made itself, so that a tensor moved between epochs (a teacher's
weight given new memory) is seen and the step captured again; it allocates nothing the run keeps (the run's tensors after the capture are the very ones before it); it asks
the host for nothing (the stand-in's strict step); no number that changes from step to step is baked into it
(captured at two different steps, the same operators with the same arguments); the lr and the EMA's weight reach it
as tensors. Each check is seen failing on a step made to break it. And the rule that chooses the graph
(util/launch.cuda_graph) picks what its text says. What the stand-in cannot say: that the replays compute eager's
numbers (a GPU test's)."""
from types import SimpleNamespace

import pytest
import torch
import torch.utils._pytree as pytree

import attention_copy
import attention_distill
import finetune
import mae_pretrain
from conftest import TINY, run_in_process
from standin_cuda import address
from test_standin_scripts import EVERY_OPTION, on_standin, teacher  # noqa: F401 (a fixture)
from util import engine, launch
from util import run as run_module
from util.errors import ConfigError

# every per-step option (RandAugment, erasing, MixUp / CutMix, drop-path, clipping, the EMA) at one micro-batch a step
EVERY = [a for a in EVERY_OPTION if a not in ('--accum-steps', '2')]


def storage(t):
    """The memory a tensor (or a view of it) lives in."""
    return t.untyped_storage()._cdata


def kept(run):
    """{name: tensor} of what a run keeps from step to step (what a replay reads and writes where it is)."""
    tensors = {f'model {k}': t for k, t in run.model.state_dict(keep_vars=True).items()}
    tensors.update({f'running {k}': t for k, t in run.running.items()})
    for i, state in enumerate(run.opt.state.values()):
        tensors.update({f'optimizer {i} {k}': t for k, t in state.items()})
    if run.ema is not None:
        tensors.update({'ema weight': run.ema.weight, 'ema count': run.ema.count,
                        **{f'ema {k}': t for k, t in run.ema.module.state_dict(keep_vars=True).items()}})
    return tensors


def graphed_run(monkeypatch, out, script=finetune, teacher=None, warm_up=3, steps=6, step=None, between=None,
                more=()):
    """A training script on the stand-in with --cuda-graph true and every per-step option it takes, WARM_UP eager
    steps, then the capture and replays up to `steps`; step: a train_step put in the real one's place; between(run):
    called as each epoch's checkpoint is saved; more: flags added. Returns (the run's error line or None, what the capture saw: the run,
    its GraphedStep, what the run kept before it)."""
    seen = {}
    capture, save = engine.GraphedStep.capture, run_module.Run.save

    def recorded(graphed, run, *args):
        seen.update(run=run, graphed=graphed, before=kept(run))
        capture(graphed, run, *args)

    def saved(run, *args, **kwargs):
        if between is not None:
            between(run)
        return save(run, *args, **kwargs)
    extra = [*EVERY, '--teacher', teacher] if teacher else EVERY if script is finetune else ['--batch-size', '16']
    with on_standin('held', script) as cuda:
        cuda.patch(engine.GraphedStep, 'capture', recorded)
        cuda.patch(engine.GraphedStep, 'WARM_UP', warm_up)
        cuda.patch(run_module.Run, 'save', saved)
        if step is not None:
            cuda.patch(engine, 'train_step', step)
        msg = run_in_process(monkeypatch, script, *TINY, '--fake-size', '128', '--amp', 'bf16', '--cuda-graph',
                             'true', '--max-steps', str(steps), '--log-every', '1', *extra, *more, '--out-dir', out)
    return msg, SimpleNamespace(**seen)


def check_capture(seen, replays=3):
    """What a replay needs: every tensor a captured operator reads is one the GraphedStep watches (its batch, lrs,
    running losses, optimizer state, and every parameter and buffer of the modules the step runs: engine.step_modules)
    or made in the graph; the run's kept tensors after the capture and the replays are the ones before it; the graph
    was replayed."""
    graphed = seen.graphed
    watched = set(graphed.held.values())
    made = set()
    for func, args, kwargs, out in graphed.graph.ops:
        for t in pytree.tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and t.device.type == 'cuda':
                assert address(t) in watched or address(t) in made, \
                    f'{func} reads a tensor made outside the graph that it does not watch {tuple(t.shape)} {t.dtype}'
        made.update(address(t) for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
    after = kept(seen.run)
    moved = [name for name, t in seen.before.items() if after.get(name) is not t]
    new = [name for name in after if name not in seen.before]
    assert not moved and not new, f'the step allocated what the run keeps: {(moved + new)[:3]}'
    assert graphed.graph.replays == replays


def signature(ops):
    """The captured operators with every argument that is not a device tensor: what a replay cannot change."""
    def number(a):
        if isinstance(a, torch.Tensor):
            return (a.dtype, tuple(a.shape)) if a.device.type == 'cuda' else a.tolist()
        return a
    return [(func, pytree.tree_map(number, (args, kwargs))) for func, args, kwargs, _ in ops]


def test_the_graphed_step_reads_and_writes_its_static_buffers_alone(monkeypatch, tmp_path):
    """Three eager steps, the capture, three replays: check_capture; no host sync in any step (strict); the lr of each
    parameter group and the EMA's weight are read from device tensors (the fused AdamW's lr, the EMA's lerp); a capture
    two steps later (another lr) records the same operators with the same numbers."""
    msg, seen = graphed_run(monkeypatch, tmp_path / 'a')
    assert msg is None, msg
    check_capture(seen)
    ops = seen.graphed.graph.ops
    lrs = adamw_lrs(ops)
    assert lrs and all(storage(lr) in map(storage, seen.graphed.lrs) for lr in lrs), lrs
    lerps = [args[2] for func, args, _, _ in ops if func is torch.ops.aten._foreach_lerp_.List]
    assert len(lerps) == 1 and {storage(w) for w in lerps[0]} == {storage(seen.run.ema.weight)}
    assert 'captured as one CUDA graph at step 3, after 3 eager steps' in (tmp_path / 'a' / 'log.txt').read_text()
    later = graphed_run(monkeypatch, tmp_path / 'b', warm_up=5, steps=7)[1]
    assert signature(later.graphed.graph.ops) == signature(ops)


@pytest.mark.parametrize('script', [attention_copy, attention_distill, mae_pretrain], ids=lambda m: m.__name__)
def test_every_training_script_is_captured_and_its_graph_watches_all_it_reads(monkeypatch, tmp_path, script, teacher):
    """Copy and distillation (the frozen teacher's weights read by every step), and the MAE (its decoder), as
    fine-tuning above: three eager steps, the capture, three replays, check_capture."""
    msg, seen = graphed_run(monkeypatch, tmp_path / 'run', script, teacher if script is not mae_pretrain else None)
    assert msg is None, msg
    check_capture(seen)
    assert 'captured as one CUDA graph at step 3' in (tmp_path / 'run' / 'log.txt').read_text()
    if script is not mae_pretrain:
        assert any(name.startswith('teacher ') for name in seen.graphed.held)


def test_a_moved_tensor_of_the_teacher_is_captured_again(monkeypatch, tmp_path, teacher):
    """A tensor the graph reads, moved between two epochs (here a weight of the frozen teacher, given new memory), is
    no longer where the replay would read it: the step is captured again, and the log names what moved."""
    def move(run):
        if run.step == 8:   # once, between the two epochs
            frozen = engine.step_modules(run, next(iter(run.graphs)))['teacher']
            weight = next(frozen.parameters())
            weight.data = weight.data.clone()
    msg, seen = graphed_run(monkeypatch, tmp_path / 'run', attention_distill, teacher, steps=12, between=move,
                            more=('--epochs', '2'))
    assert msg is None, msg
    log = (tmp_path / 'run' / 'log.txt').read_text()
    assert 'the step captured again at step 8: teacher cls_token moved since its capture' in log, log
    check_capture(seen, replays=4)   # the second graph's: steps 9 to 12


REAL_STEP = engine.train_step


def rebinds(run, *args):
    REAL_STEP(run, *args)
    run.running = {k: v + 0 for k, v in run.running.items()}     # a new tensor each step


def reads_the_host(run, *args):
    REAL_STEP(run, *args)
    float(run.running['ce'])                                      # a number asked of the device


def a_number_per_step(run, *args):
    for g in run.opt.param_groups:                                # the lr a number, not the tensor
        g['lr'] = engine.lr_at(run.cfg, run.lr, run.step / run.steps_per_epoch) * g['lr_scale']
    REAL_STEP(run, *args)


def adamw_lrs(ops):
    """The lr each captured fused AdamW step reads."""
    return [kwargs['lr'] for func, _, kwargs, _ in ops if func.overloadpacket is torch.ops.aten._fused_adamw_]


@pytest.mark.parametrize('fault, said', [(rebinds, 'allocated what the run keeps|that it does not watch'),
                                         (reads_the_host, 'host syncs'),
                                         (a_number_per_step, 'reads its lr as a number')])
def test_each_check_fails_on_a_step_made_to_break_it(monkeypatch, tmp_path, fault, said):
    """The checks above, on a step that allocates what the run keeps, one that reads the device from the host, one
    that hands the captured AdamW its lr as a number: each fails."""
    with pytest.raises(AssertionError, match=said):
        msg, seen = graphed_run(monkeypatch, tmp_path, step=fault)
        assert msg is None, msg
        check_capture(seen)
        assert all(isinstance(lr, torch.Tensor) for lr in adamw_lrs(seen.graphed.graph.ops)), \
            'the graph reads its lr as a number'


def test_the_rule_captures_where_a_run_allows_it_and_compiles_on_top_only_when_long():
    """--cuda-graph auto: on one GPU, one micro-batch a step, bf16 or fp32, a set held in memory; eager on a CPU, under
    torchrun, with accumulation, in fp16 (its GradScaler) and for a folder; true refused where a run cannot be captured,
    false never. --compile auto never on top of the graph (never measured to repay itself there)."""
    cuda, cpu = torch.device('cuda', 0), torch.device('cpu')

    def cfg(**kw):
        return SimpleNamespace(**{'data': 'fashion-mnist', 'cuda_graph': 'auto', 'compile': 'auto', 'batch_size': 128,
                                  'accum_steps': 1, 'epochs': 9, 'max_steps': 0, 'fake_size': 2048, 'img_size': 28,
                                  **kw})

    def graphed(device=cuda, world=1, dtype=torch.bfloat16, **kw):
        return launch.cuda_graph(cfg(**kw), device, world, dtype)[0]
    assert graphed() and graphed(dtype=None) and graphed(data='cifar100') and graphed(data='fake')
    assert not graphed(cpu) and not graphed(world=2) and not graphed(accum_steps=2)
    assert not graphed(dtype=torch.float16) and not graphed(data='imagenet') and not graphed(data='folder')
    assert not graphed(cuda_graph='false') and graphed(data='imagenet', cuda_graph='true')
    for refused in (dict(device=cpu), dict(world=2), dict(accum_steps=2), dict(dtype=torch.float16)):
        with pytest.raises(ConfigError, match='--cuda-graph true needs one process on a GPU'):
            graphed(cuda_graph='true', **refused)
    # torchrun of one process: a process group, the model wrapped in DDP: eager, and true refused in one line
    with pytest.MonkeyPatch.context() as m:
        m.setattr(launch.dist, 'is_initialized', lambda: True)
        assert not graphed()
        with pytest.raises(ConfigError, match=r'needs one process on a GPU \(no torchrun\).*: here a process group'):
            graphed(cuda_graph='true')

    def compiled(graph, **kw):
        return launch.compiled_step(cfg(**kw), cuda, 1, graph)[0]
    steps = launch.COMPILE_REPAID
    assert compiled(False) and not compiled(True)                             # the preset: 9 x 469 steps
    assert not compiled(True, epochs=10 ** 5) and not compiled(False, max_steps=steps - 1)
    assert compiled(False, epochs=1000, max_steps=steps)
