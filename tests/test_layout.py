"""The layout a reader relies on: the card's files at the root, imports from below only (vit.py <- util/ <- data.py,
teacher.py <- the scripts, and a script takes only another script's model side), no import cycle, the epoch loop in
each method's main(), and one training step running in its method's own file, traced as it runs. Sizes and counts
(lines a file, files at the root, files a step) are signals the size hook reports, never a test: a count held as a
rule moved code into the wrong file to meet it."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attention_copy
import attention_distill
import finetune
from conftest import TINY, run_in_process
from util.datafiles import FASHION_MNIST_SYSTEM_DIR

ROOT = Path(__file__).resolve().parent.parent

ROOT_MODULES = {p.stem for p in ROOT.glob('*.py')}
UTIL = sorted((ROOT / 'util').glob('*.py'))


def imports(path, top_level_only=False):
    """The project modules a file imports ('vit', 'util.engine', ...), at module level only if asked."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f'{node.module}.{a.name}' for a in node.names if node.module == 'util'}
    return {m for m in found if m.split('.')[0] in ROOT_MODULES | {'util'}}


def module_name(path):
    return path.stem if path.parent == ROOT else f'{path.parent.name}.{path.stem}'


# the design card's files
CARD = ('vit.py', 'data.py', 'finetune.py', 'attention_copy.py', 'attention_distill.py', 'ensemble.py', 'tests',
        'tutorial.ipynb', 'requirements.txt')


def test_the_root_holds_the_course_and_its_scripts():
    """The card's files are at the root, and every Python file there is in the README's table of the course."""
    assert all((ROOT / f).exists() for f in CARD), [f for f in CARD if not (ROOT / f).exists()]
    root = sorted(ROOT_MODULES)
    readme = (ROOT / 'README.md').read_text()
    course = readme.split('The course, one idea per file')[1].split('\n\n')[1]   # the README's table of them
    assert all(f'`{m}.py`' in course for m in root), [m for m in root if f'`{m}.py`' not in course]


def test_util_imports_no_root_module_but_vit():
    """The scripts build their data, teacher and model and hand them to util/, never the reverse."""
    for path in UTIL:
        back = {m for m in imports(path) if m.split('.')[0] in ROOT_MODULES} - {'vit'}
        assert not back, f'{path.relative_to(ROOT)} imports {sorted(back)}: util/ may import only vit.py'


def test_the_course_imports_from_below():
    """vit.py imports nothing of the project; data.py and teacher.py, below the scripts, import only vit.py and
    util/ (the scripts build on them)."""
    assert not imports(ROOT / 'vit.py')
    for name in ('data', 'teacher'):
        up = {m for m in imports(ROOT / f'{name}.py') if m.split('.')[0] in ROOT_MODULES} - {'vit'}
        assert not up, f'{name}.py imports {sorted(up)}'



# a script is what a user runs (python ensemble.py ...): a root file with a __main__ block
SCRIPTS = {p.stem for p in ROOT.glob('*.py') if "if __name__ == '__main__':" in p.read_text()}


def test_the_config_imports_no_room_and_only_launch_imports_it():
    """util/config.py imports no util/ room but errors.py and datafiles.py, whose rows (one a data set) give --data
    its choices (a function's import counted too: the --randaug rule imported util/augment.py), and in util/ only
    launch.py imports it."""
    rooms = {m for m in imports(ROOT / 'util' / 'config.py') if m.startswith('util')}
    assert rooms <= {'util.errors', 'util.datafiles'}, f'util/config.py imports {sorted(rooms)}'
    importers = {p.name for p in UTIL if any(m.startswith('util.config') for m in imports(p))}
    assert importers <= {'launch.py'}, f'util/ modules importing util/config.py: {sorted(importers)}'


def imported_names(path):
    """{module: the names a file imports from it} of its `from module import ...` lines (a function's included)."""
    names = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.setdefault(node.module, set()).update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                names.setdefault(a.name, set()).add('*')   # the module itself: any of its names
    return names


def test_a_script_imports_only_the_model_side_of_another():
    """A script is run, and its method is read in it: another script may use its model side (attention_copy.py's
    load_copy_model, ensemble.py's ensemble_probs), never its main() or its config, which are the run of that
    script; and never the module whole, whose names a reader could not see at the import."""
    assert {'ensemble', 'evaluate', 'finetune', 'attention_copy'} <= SCRIPTS, SCRIPTS
    for name in sorted(SCRIPTS):
        for module, names in imported_names(ROOT / f'{name}.py').items():
            if module not in SCRIPTS - {name}:
                continue
            config = {n for n in names if n.endswith('Config') or n in ('main', 'PRESETS', '*')}
            assert not config, f'{name}.py imports {sorted(config)} of the script {module}.py: only its model side'


def defined(name):
    """The functions and classes a root file defines at its top level."""
    return {n.name for n in ast.parse((ROOT / f'{name}.py').read_text()).body
            if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def test_each_method_is_read_in_its_file():
    """A reader who opens attention_copy.py finds what the student is given and the values it routes (copied, and the
    pair as one model, and its loader); ensemble.py the ensemble's probabilities; teacher.py the teacher and the
    student built to fit it, none of the copy model, a loader of trained models or their scores."""
    assert {'copied', 'CopyModel', 'copy_loss', 'load_copy_model'} <= defined('attention_copy')
    assert {'ensemble_probs', 'load_models'} <= defined('ensemble')
    elsewhere = {'copied', 'CopyModel', 'load_copy_model', 'load_models', 'ensemble_probs', 'predict_all',
                 'accuracy'}
    assert not defined('teacher') & elsewhere and not defined('data') & elsewhere


def test_the_step_imports_nothing_of_the_data():
    """util/engine.py is the step, its schedule and evaluation; the data (its files, held sets, the loader, the
    sampler) is util/datafiles.py's, which the step is handed, never imports."""
    assert 'util.datafiles' not in imports(ROOT / 'util' / 'engine.py')

# what every script's start may not import: torchvision imports torch's compiler (torch._dynamo, sympy), a second or
# more, which the scripts' help, their refusals and a Fashion-MNIST run never use
UNUSED_AT_START = ('torchvision', 'torch._dynamo', 'sympy')


def test_a_script_imports_neither_torchvision_nor_the_compiler():
    scripts = 'finetune, attention_copy, attention_distill, mae_pretrain, ensemble, evaluate, teacher, data'
    out = subprocess.run([sys.executable, '-c', f'import sys, {scripts}; '
                          f'print([m for m in {UNUSED_AT_START!r} if m in sys.modules])'],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == '[]', out


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_SYSTEM_DIR) and not os.environ.get('CI'),
                    reason='apt-get install dataset-fashion-mnist')
def test_a_fashion_mnist_run_never_imports_torchvision(tmp_path):
    """Its images are read (util/datafiles.read_idx) and augmented (data.BatchTransform) without it; the compiler is
    imported by torch's optimizer as it is made (torch/_compile.py: _disable_dynamo), which no script can spare."""
    run = ('import sys, finetune; from util.launch import run_main; '
           f'sys.argv = ["finetune.py", "--data", "fashion-mnist", "--data-dir", {str(tmp_path)!r}, "--val-size", '
           f'"64", "--max-steps", "1", "--out-dir", {str(tmp_path / "run")!r}]; run_main(finetune.main); '
           'print("torchvision" in sys.modules)')
    out = subprocess.run([sys.executable, '-c', run], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == 'False', out


def test_no_import_cycle():
    files = [p for p in [*ROOT.glob('*.py'), *UTIL, *(ROOT / 'tools').glob('*.py')] if p.stem != '__init__']
    graph = {module_name(p): {m for m in imports(p, top_level_only=True)} for p in files}
    state = {}

    def visit(m, path):
        state[m] = 'open'
        for n in graph.get(m, ()):
            assert state.get(n) != 'open', f"import cycle: {' -> '.join([*path, n])}"
            if n not in state:
                visit(n, [*path, n])
        state[m] = 'done'
    for m in graph:
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize('module', [finetune, attention_copy, attention_distill], ids=lambda m: m.__name__)
def test_the_epoch_loop_is_in_main(module):
    """main() holds the loop, as MAE's main_finetune.py does: train one epoch, evaluate, save."""
    main = next(f for f in ast.parse(Path(module.__file__).read_text()).body
                if isinstance(f, ast.FunctionDef) and f.name == 'main')
    loop = next((n for n in ast.walk(main) if isinstance(n, ast.While)), None)
    assert loop is not None, f'{module.__name__}.main has no epoch loop'
    called = {n.func.attr if isinstance(n.func, ast.Attribute) else n.func.id
              for n in ast.walk(loop) if isinstance(n, ast.Call) and isinstance(n.func, (ast.Name, ast.Attribute))}
    assert {'train_one_epoch', 'evaluate', 'save'} <= called, called


def not_the_step(frame):
    """Whether a call runs inside what a step hands its work to, which is not the step's own code: the loader making
    the next batch (util/datafiles.py's TensorBatches, or a DataLoader fetching its data set's items, __getitem__, in
    the main process), the data set's; the run directory writing the progress line (util/rundir.py's RunDir.log, and
    the file it appends to), the run's record."""
    while frame is not None:
        code = frame.f_code
        if code.co_name == '_next_data' or (code.co_name == '__iter__' and code.co_filename.endswith('datafiles.py')):
            return True
        if code.co_name == 'log' and code.co_filename.endswith('rundir.py'):
            return True
        frame = frame.f_back
    return False


def files_in_one_step(monkeypatch, module, *args):
    """The project's files whose functions run between the end of the first optimizer step and the end of the
    second (sys.setprofile: every Python call; the end of a step: the optimizer's step returning), and their lines.
    Excluded: what the step hands its work to (not_the_step): the making of its batch, the writing of its log line."""
    steps, seen = [0], set()

    def profile(frame, event, arg):
        code = frame.f_code
        if event == 'return' and code.co_name == 'step' and f'torch{os.sep}optim{os.sep}' in code.co_filename:
            steps[0] += 1
        elif event == 'call' and steps[0] == 1:
            path = Path(code.co_filename)
            if path.suffix == '.py' and path.parent in (ROOT, ROOT / 'util') and not not_the_step(frame):
                seen.add(path)
    sys.setprofile(profile)
    try:
        msg = run_in_process(monkeypatch, module, *args)
    finally:
        sys.setprofile(None)
    assert msg is None and steps[0] >= 2, msg
    return {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in seen}


STEP = [*TINY, '--max-steps', '3', '--batch-size', '8', '--log-every', '1']
TEACHER = ['--teacher', str(ROOT / 'teachers' / 'fashion-mnist-mae.pt'), '--img-size', '28']


@pytest.mark.parametrize('module, args', [
    (finetune, []),
    (attention_copy, TEACHER),
    (attention_distill, TEACHER),
], ids=['finetune', 'copy', 'distill'])
@pytest.mark.parametrize('implementation', ['eager', 'sdpa'])
def test_one_training_step_runs_in_its_methods_file(monkeypatch, tmp_path, module, args, implementation):
    """A reader follows one step from the method's own file (its loss: for copy, what the student is given and the
    values it routes), through vit.py, to util/engine.py (the step). Each logs a line every step here (the run
    directory writes it: not the step, not_the_step)."""
    torch.manual_seed(0)
    files = files_in_one_step(monkeypatch, module, *STEP, *args, '--attn-implementation', implementation,
                              '--out-dir', tmp_path / 'run')
    own = Path(module.__file__).name
    assert {own, 'vit.py', os.path.join('util', 'engine.py')} <= set(files), files
