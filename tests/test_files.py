"""util/files.py: the reader of the JSON files runs leave (a damaged one is one error naming the file, the line and
the fix), the atomic writer (a Ctrl-C in it stays a Ctrl-C, a SIGTERM a SIGTERM), and the check of an output folder that makes nothing."""
import io
import json
import os
import re
import signal

import pytest
import torch

from util.config import ConfigError
from util.errors import WriteError
from util.files import DamagedFile, check_out_dir, check_outputs, read_json, read_jsonl, replacing, write_json
from util.launch import run_main


@pytest.mark.parametrize('text, says', [
    ('{"command": ["a"], "wall', 'is not JSON, cut short or damaged'),          # cut by a kill or a full disk
    (b'\xff\xfe{}', 'is not JSON'),                                          # not UTF-8
    ('[1, 2]', 'does not hold a JSON object with command, wall_s'),
    ('{"command": "a b", "wall_s": 1}', 'does not hold a JSON object with command, wall_s (each of its kind)'),
    ('{"wall_s": 1}', 'does not hold a JSON object with command'),
])
def test_a_damaged_json_file_is_one_error_naming_it_and_the_fix(tmp_path, text, says):
    path = tmp_path / 'done.json'
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(DamagedFile) as e:
        read_json(str(path), 'delete it', {'command': list, 'wall_s': (int, float)})
    msg = str(e.value)
    assert msg.startswith(str(path)) and says in msg and msg.endswith(': delete it') and '\n' not in msg, msg
    assert isinstance(e.value, ConfigError)                 # run_main's one line, no traceback
    with pytest.raises(DamagedFile, match='cannot read it .No such file'):
        read_json(str(tmp_path / 'missing.json'), 'delete it')


def test_json_lines_name_the_damaged_line(tmp_path):
    path = tmp_path / 'metrics.jsonl'
    path.write_text('{"step": 1}\n\n{"step": 2}\n')
    assert read_jsonl(str(path), 'fix') == [{'step': 1}, {'step': 2}]          # a blank line is no record
    path.write_text('{"step": 1}\n{"step": 2, "to{"step": 3}\n')             # a cut record, then a resumed one
    with pytest.raises(DamagedFile, match=r'metrics.jsonl: line 2 is not a JSON record \(cut short\?\): fix$'):
        read_jsonl(str(path), 'fix')
    path.write_text('{"step": 1}\n7\n')
    with pytest.raises(DamagedFile, match='line 2 is not a JSON record'):
        read_jsonl(str(path), 'fix')


def test_write_json_is_atomic(tmp_path):
    path = str(tmp_path / 'results.json')
    write_json(path, {'a': 1})
    assert json.loads(open(path).read()) == {'a': 1} and os.listdir(tmp_path) == ['results.json']
    with pytest.raises(TypeError):                           # fails part-way through writing
        write_json(path, {'b': 2, 'c': object()})
    assert json.loads(open(path).read()) == {'a': 1} and os.listdir(tmp_path) == ['results.json']   # as it was


def test_ctrl_c_during_a_checkpoint_save_is_a_ctrl_c(tmp_path):
    """torch.save cut by Ctrl-C part-way raises its writer's RuntimeError: the run must still see the Ctrl-C
    (and end in its one line), with the old checkpoint as it was and no temporary file."""
    class CutAtThirdWrite(io.FileIO):
        writes = 0

        def write(self, b):
            CutAtThirdWrite.writes += 1
            if CutAtThirdWrite.writes == 3:
                raise KeyboardInterrupt
            return super().write(b)
    path = str(tmp_path / 'checkpoint.pt')
    torch.save({'step': 1}, path)
    with pytest.raises(KeyboardInterrupt):
        with replacing(path) as tmp, CutAtThirdWrite(tmp.name, 'wb') as f:   # the temporary file
            torch.save({'step': 2, 'w': torch.randn(1000, 100)}, f)
    assert torch.load(path)['step'] == 1 and os.listdir(tmp_path) == ['checkpoint.pt']


def test_a_sigterm_during_a_checkpoint_save_is_a_sigterm(tmp_path, capsys):
    """util/launch.py turns SIGTERM into KeyboardInterrupt('SIGTERM'); a write cut by it re-raised a bare
    KeyboardInterrupt, so the run said Ctrl-C and exited 130 where a scheduler reads 143 for its SIGTERM."""
    class SignalledAtThirdWrite(io.FileIO):
        writes = 0

        def write(self, b):
            SignalledAtThirdWrite.writes += 1
            if SignalledAtThirdWrite.writes == 3:
                os.kill(os.getpid(), signal.SIGTERM)   # as a scheduler sends it, mid-write
            return super().write(b)
    path = str(tmp_path / 'checkpoint.pt')
    torch.save({'step': 1}, path)

    def main():
        with replacing(path) as tmp, SignalledAtThirdWrite(tmp.name, 'wb') as f:
            torch.save({'step': 2, 'w': torch.randn(1000, 100)}, f)
    with pytest.raises(SystemExit) as e:
        run_main(main)
    assert e.value.code == 143 and capsys.readouterr().err.startswith('error: stopped (SIGTERM): ')
    assert torch.load(path)['step'] == 1 and os.listdir(tmp_path) == ['checkpoint.pt']


def test_an_out_dir_that_cannot_be_written_is_refused_and_nothing_is_made(tmp_path):
    check_out_dir(str(tmp_path / 'new' / 'deeper'), '--out-dir')                 # made later, by the writer
    (tmp_path / 'file').write_text('mine')
    file = tmp_path / 'file'   # as open() says: the folder, the errno's words, the fix
    with pytest.raises(ConfigError, match=rf'^--out-dir {file} cannot be written into \({file}: Not a directory\): '
                                          r'choose another --out-dir$'):
        check_out_dir(str(file), '--out-dir')
    with pytest.raises(ConfigError, match=rf'^--out-dir {file / "sub"} cannot be written into \({file}: Not a '
                                          r'directory\): choose another --out-dir$'):
        check_out_dir(str(file / 'sub'), '--out-dir')
    if os.geteuid() != 0:                                     # root writes into a read-only folder
        (tmp_path / 'ro').mkdir(mode=0o555)
        with pytest.raises(ConfigError, match=r'ro/x cannot be written into \(.*ro: Permission denied\): choose '
                                              r'another'):
            check_out_dir(str(tmp_path / 'ro' / 'x'), '--out-dir')
    assert sorted(os.listdir(tmp_path)) == ['file', 'ro'][:1 + (os.geteuid() != 0)]


def test_an_output_is_refused_at_the_start_and_again_at_the_moment_it_is_written(tmp_path):
    """One policy for every output (check_outputs): a file there that is not the command's own earlier result is
    refused before any work, and a file put there while the command ran is kept and the write refused in one line
    (os.link: no name taken over), the temporary file gone; an earlier result of its own is replaced, but not once
    a user's file has taken its place meanwhile (ensemble.py --out claimed it at its start and wrote over it)."""
    path = tmp_path / 'result.json'
    ours = lambda p: open(p).read().startswith('{"ours"')
    write = check_outputs('--out', str(path), may_replace=ours)
    assert os.listdir(tmp_path) == []                                          # nothing made
    for before in ('theirs', '{"ours": 1}'):                                   # put there while the command ran
        path.write_text(before)
        if before == 'theirs':
            with pytest.raises(WriteError, match=f'^cannot write {path} \\(File exists\\): '):
                write(str(path), lambda f: f.write(b'{"ours": 2}'))
        else:
            write(str(path), lambda f: f.write(b'{"ours": 2}'))
        assert path.read_text() == (before if before == 'theirs' else '{"ours": 2}') and os.listdir(tmp_path) == \
            ['result.json']
    path.write_text('theirs')
    for may_replace in (None, ours):
        with pytest.raises(ConfigError, match=f'^--out {path} exists and is not an earlier result of this command'):
            check_outputs('--out', str(path), may_replace=may_replace)
    with pytest.raises(ConfigError, match=f'^--out {tmp_path} is a directory'):
        check_outputs('--out', str(tmp_path))
    with pytest.raises(ConfigError, match=r'^--out x.xyz: no format of that name \(png, pdf\)'):
        check_outputs('--out', 'x.xyz', formats=('png', 'pdf'))
    assert path.read_text() == 'theirs' and os.listdir(tmp_path) == ['result.json']


def test_a_killed_commands_temporary_file_goes_with_the_next_write_of_its_file(tmp_path):
    """A temporary file is named for its file (.<name>.<8 random characters>.tmp): what a command killed mid-write
    left is removed by the next write of the same file, without probing any lock; another file's, and a user's file
    at the old temporary name (<name>.tmp), are never touched."""
    left, other = tmp_path / '.result.json.0a_bcd9z.tmp', tmp_path / '.notes.json.0123abcd.tmp'
    for f in (left, other, tmp_path / 'result.json.tmp'):
        f.write_text(f.name)
    write_json(str(tmp_path / 'result.json'), {'a': 1})
    assert sorted(os.listdir(tmp_path)) == ['.notes.json.0123abcd.tmp', 'result.json', 'result.json.tmp']
    with replacing(str(tmp_path / 'x.bin')) as f:                           # the name it writes through
        assert re.fullmatch(r'\.x\.bin\.[a-z0-9_]{8}\.tmp', os.path.basename(f.name))
        f.write(b'1')


def test_a_page_is_made_from_committed_code(tmp_path):
    """util/files.page_commit in a repository of its own (util/ copied and committed): the commit and a clean tree;
    a change to its code refused in one line naming --dirty true, and recorded where that is passed; a change to a
    page's text is no change of code."""
    import shutil
    import subprocess
    import sys
    shutil.copytree(os.path.join(os.path.dirname(__file__), '..', 'util'), tmp_path / 'util',
                    ignore=shutil.ignore_patterns('__pycache__'))
    (tmp_path / 'RESULTS.md').write_text('a page\n')

    def git(*args):
        return subprocess.run(['git', '-c', 'user.name=t', '-c', 'user.email=t@t', *args], cwd=tmp_path, check=True,
                              capture_output=True, text=True).stdout.strip()
    git('init', '-q')
    git('add', '.')
    git('commit', '-q', '-m', 'code')

    def made(dirty):
        code = f'import json; from util.files import page_commit; print(json.dumps(page_commit({dirty})))'
        return subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True)
    (tmp_path / 'RESULTS.md').write_text('the page, rewritten\n')
    assert json.loads(made(False).stdout) == {'git_commit': git('rev-parse', 'HEAD'), 'clean': True}
    with open(tmp_path / 'util' / 'errors.py', 'a') as f:
        f.write('# changed\n')
    refused = made(False)
    assert refused.returncode != 0 and 'uncommitted changes (util/errors.py, ...)' in refused.stderr
    assert 'pass --dirty true' in refused.stderr.strip().splitlines()[-1]
    assert json.loads(made(True).stdout) == {'git_commit': git('rev-parse', 'HEAD'), 'clean': False}


def test_a_pipe_where_a_file_is_expected_is_refused_unread(tmp_path, monkeypatch):
    """A FIFO named as a run's config.json held the command that read it until something wrote to it. Every reader of a
    file (util/files.read_regular: JSON, checkpoints) opens it without waiting and refuses what is not a regular
    file, in one line; a run pointed at a folder whose config.json is a pipe is refused, and leaves it there."""
    import stat
    import finetune
    from conftest import TINY
    from util.checkpoints import CheckpointError, read_checkpoint
    fifo = tmp_path / 'config.json'
    os.mkfifo(fifo)
    with pytest.raises(DamagedFile, match=r'config.json: cannot read it \(Is a pipe\): move it'):
        read_json(str(fifo), 'move it')
    with pytest.raises(CheckpointError, match=r"no checkpoint '.*config.json': give a file path"):
        read_checkpoint(str(fifo))
    with pytest.raises(DamagedFile, match=r'cannot read it \(Is a directory\)'):
        read_json(str(tmp_path), 'move it')
    from conftest import run_in_process
    msg = run_in_process(monkeypatch, finetune, *TINY, '--out-dir', tmp_path, '--max-steps', '1')
    assert msg and f'--out-dir {tmp_path} is not empty and holds no run' in msg and '\n' not in msg.strip(), msg
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
