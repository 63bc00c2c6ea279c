"""tests/forkserver.py: a script forked from the server ends as the same script started afresh by
subprocess.run does: the same exit status, stdout and stderr, argv, __file__, sys.path[0], working directory,
environment and stdin, for every way a script ends."""
import os
import signal
import subprocess
import sys

import pytest

from conftest import sub_env
import forkserver

SCRIPTS = {
    'says': """
import atexit, os, sys
atexit.register(lambda: print('atexit ran'))
print(__name__, sys.argv, __file__, sys.path[0], os.getcwd(), os.environ.get('OMP_NUM_THREADS'), repr(sys.stdin.read()))
print('to stderr', file=sys.stderr)
kept = open('kept', 'w')
kept.write('written, never closed')
print('parent', os.getppid(), file=open('parent', 'w'))
""",
    'one_line': "import sys\nprint('before')\nsys.exit('error: --flag 0: must be at least 1')\n",
    'status_3': "import sys\nsys.exit(3)\n",
    'raises': "def f():\n    raise ValueError('bad value')\nf()\n",
    'ctrl_c': "raise KeyboardInterrupt\n",
    'terminated': "import os, signal\nprint('going', flush=True)\nos.kill(os.getpid(), signal.SIGTERM)\n",
    'workers': """
import torch
from torch.utils.data import DataLoader
if __name__ == '__main__':
    print(sum(int(b.sum()) for b in DataLoader(list(range(100)), batch_size=10, num_workers=2)))
""",
}


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    s = forkserver.Server(sub_env(), cwd=tmp_path_factory.mktemp('server'))
    assert s.ready, 'the server has more than one thread: it would fork a part of itself'
    yield s
    s.close()


def both(server, cwd, *args):
    """(fresh, forked): each a CompletedProcess with .files, the text of the files it left in cwd."""
    argv, runs = [sys.executable, *args], []
    for run in (subprocess.run, server.run):
        before = set(os.listdir(cwd))
        p = run(argv, cwd=cwd, env=sub_env(), capture_output=True, text=True, timeout=60)
        p.files = {n: (cwd / n).read_text() for n in set(os.listdir(cwd)) - before}
        for n in p.files:
            os.remove(cwd / n)
        runs.append(p)
    return runs


@pytest.mark.parametrize('name', SCRIPTS)
def test_a_forked_script_ends_as_a_fresh_one(server, tmp_path, name):
    (tmp_path / f'{name}.py').write_text(SCRIPTS[name])
    real, forked = both(server, tmp_path, f'{name}.py', '--data', 'fake')
    assert (forked.returncode, forked.stdout) == (real.returncode, real.stdout), (real, forked)
    if name in ('raises', 'ctrl_c'):   # the frames above the script's own are the server's; the message is the same
        assert forked.stderr.startswith('Traceback (most recent call last):\n') and real.stderr.startswith(
            'Traceback (most recent call last):\n')
        assert forked.stderr.splitlines()[-3:] == real.stderr.splitlines()[-3:]
    else:
        assert forked.stderr == real.stderr
    assert real.returncode == {'one_line': 1, 'status_3': 3, 'raises': 1, 'ctrl_c': -signal.SIGINT,
                               'terminated': -signal.SIGTERM}.get(name, 0)
    if name == 'says':     # a file left open is written all the same; and it was forked: its parent is the server
        assert real.files['kept'] == forked.files['kept'] == 'written, never closed'
        assert forked.files['parent'].split() == ['parent', str(server.proc.pid)]


def test_a_module_runs_as_python_m_runs_it(server, tmp_path):
    (tmp_path / 'pkg').mkdir()
    (tmp_path / 'pkg' / '__init__.py').write_text('')
    (tmp_path / 'pkg' / 'tool.py').write_text('import sys\nprint(__name__, __spec__.name, sys.argv, sys.path[0])\n')
    real, forked = both(server, tmp_path, '-m', 'pkg.tool', '--x', '1')
    assert real.returncode == 0 and (forked.returncode, forked.stdout, forked.stderr) == (0, real.stdout, '')


def test_a_timeout_kills_the_script(server, tmp_path):
    (tmp_path / 'slow.py').write_text('import time\ntime.sleep(30)\n')
    for run in (subprocess.run, server.run):
        with pytest.raises(subprocess.TimeoutExpired):
            run([sys.executable, 'slow.py'], cwd=tmp_path, env=sub_env(), capture_output=True, text=True,
                timeout=0.5) if run is subprocess.run else run([sys.executable, 'slow.py'], tmp_path, sub_env(), 0.5)


def test_another_environment_or_command_line_starts_afresh(server, tmp_path):
    (tmp_path / 'who.py').write_text('import os\nprint(os.getppid(), os.environ.get("OMP_NUM_THREADS"))\n')
    env = dict(sub_env(), OMP_NUM_THREADS='2')      # read when torch is imported: the server's is 1
    p = server.run([sys.executable, 'who.py'], tmp_path, env)
    assert p.stdout.split() == [str(os.getpid()), '2']
    p = server.run([sys.executable, '-X', 'utf8', 'who.py'], tmp_path, sub_env())
    assert p.stdout.split() == [str(os.getpid()), '1']


def test_a_script_runs_under_the_limits_asked_for_and_only_it(server, tmp_path):
    """A smaller machine (an address space) and a full disk (a file size), as preexec_fn gives a fresh process: the
    script sees them and a write beyond the size fails (EFBIG); the next script forked has the server's own."""
    import errno
    import resource
    (tmp_path / 'limited.py').write_text("""
import os, resource
print(os.getppid(), resource.getrlimit(resource.RLIMIT_AS)[0], resource.getrlimit(resource.RLIMIT_FSIZE)[0])
try:
    with open('big', 'wb') as f:
        f.write(bytes(2000))
except OSError as e:
    print(e.errno)
""")
    argv, limits = [sys.executable, 'limited.py'], [(resource.RLIMIT_AS, 8 * 2 ** 30), (resource.RLIMIT_FSIZE, 1000)]
    fresh = subprocess.run(argv, cwd=tmp_path, env=sub_env(), capture_output=True, text=True, timeout=60,
                           preexec_fn=lambda: forkserver.set_limits(limits))
    forked = server.run(argv, tmp_path, sub_env(), limits=limits)
    said = f'{8 * 2 ** 30} 1000 {errno.EFBIG}'
    assert fresh.stdout.split()[1:] == said.split() and fresh.stderr == '', fresh
    assert forked.stdout.split() == [str(server.proc.pid), *said.split()] and forked.stderr == '', forked
    own = [resource.getrlimit(r)[0] for r in (resource.RLIMIT_AS, resource.RLIMIT_FSIZE)]
    assert server.run(argv, tmp_path, sub_env()).stdout.split()[1:3] == [str(n) for n in own]
