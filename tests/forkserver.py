"""Start the tests' `python script.py ...` in a tenth of a second instead of four.

Before a script's first line runs, a fresh interpreter spends ~3.7 s of a 2-core machine importing torch and
torchvision, and the test suite starts about a hundred scripts. `run` asks a server, a process that imported
them once, to fork; the child then runs the script as `python script.py ARGS` or `python -m MODULE ARGS`
would: a fresh `__main__`, its own argv, sys.path[0], working directory, environment, stdin (empty), stdout,
stderr and exit status (an uncaught exception prints its traceback and exits 1, `sys.exit('message')` prints
the message and exits 1, a signal gives -signal), and the interpreter's exit (threads joined, atexit handlers
run, open files flushed; only the freeing of memory is skipped). What a fresh interpreter reads while importing
torch cannot change, so the server serves one environment, the one it was started with (single-threaded, so
that a fork copies every thread there is); any other call, and any other command line, runs as a real
subprocess. A request may also set resource limits (ulimit's: an address space, a file size), which the child
takes before the script starts, as preexec_fn does for a fresh one. tests/test_forkserver.py holds the two paths
equal.

    python tests/forkserver.py    # the server itself: one JSON request a line on stdin, one reply a line
"""
import atexit
import builtins
import gc
import importlib
import io
import json
import os
import resource
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types


def command(argv):
    """(kind, target, args) for `python script.py ARGS` or `python -m MODULE ARGS`, else None."""
    if len(argv) >= 2 and argv[0] == sys.executable:
        if argv[1] == '-m' and len(argv) >= 3:
            return 'module', argv[2], argv[3:]
        if not argv[1].startswith('-'):
            return 'script', argv[1], argv[2:]
    return None


def fresh(argv, cwd, env, timeout=None, limits=()):
    """subprocess.run(argv, ...) started afresh, its streams captured as text, under `limits` (set_limits)."""
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=(lambda: set_limits(limits)) if limits else None)


class Server:
    """The test process's end: one server per environment it was started with, one request at a time."""

    def __init__(self, env, cwd):
        self.env, self.lock = dict(env), threading.Lock()
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)], cwd=cwd, env=self.env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = json.loads(self.proc.stdout.readline() or '{"ready": false}')['ready']

    def run(self, argv, cwd, env, timeout=None, capture_output=True, text=True, limits=()):
        """subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout), forked; limits:
        [(resource.RLIMIT_..., soft limit)], set in the child before the script starts."""
        assert capture_output and text, 'the server captures both streams, as text'
        how = command(argv)
        if not (self.ready and how and dict(env) == self.env and self.proc.poll() is None):
            return fresh(argv, cwd, env, timeout, limits)
        with self.lock, tempfile.TemporaryDirectory() as d:
            out, err = os.path.join(d, 'stdout'), os.path.join(d, 'stderr')
            self.proc.stdin.write(json.dumps(dict(how=how, cwd=os.path.abspath(cwd), env=dict(env), stdout=out,
                                                  stderr=err, timeout=timeout, limits=list(limits))) + '\n')
            self.proc.stdin.flush()
            reply = json.loads(self.proc.stdout.readline())
            with open(out) as f, open(err) as g:
                stdout, stderr = f.read(), g.read()
        if reply['timed_out']:
            raise subprocess.TimeoutExpired(argv, timeout, output=stdout, stderr=stderr)
        return subprocess.CompletedProcess(argv, reply['returncode'], stdout, stderr)

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:   # a process forked from the tests' own holds the pipe: no end of input
                self.proc.kill()
                self.proc.wait()


# -----------------------------------------------------------------------------
# The server's end


def serve():
    """Import torch and torchvision, then fork once per request: returns the request in the child; the server
    waits for the child, replies with its exit status and takes the next request until stdin closes."""
    for name in ('numpy', 'torch', 'torchvision', 'einops'):      # what every script imports first
        importlib.import_module(name)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # a Ctrl-C of the test run is for the tests, not for us
    single = len(os.listdir('/proc/self/task')) == 1
    print(json.dumps({'ready': single}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            return req
        deadline = req['timeout'] and time.monotonic() + req['timeout']
        timed_out = False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if deadline and time.monotonic() > deadline and not timed_out:
                os.kill(pid, signal.SIGKILL)      # as subprocess.run's timeout does
                timed_out = True
            time.sleep(0.005)
        print(json.dumps({'returncode': os.waitstatus_to_exitcode(status), 'timed_out': timed_out}), flush=True)
    sys.exit(0)


def become(req):
    """In the child: take the request's working directory, stdin, stdout and stderr, run its command, and end
    as the interpreter ends a script."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.chdir(req['cwd'])
    os.environ.clear()
    os.environ.update(req['env'])
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, req['stdout'], os.O_WRONLY | os.O_CREAT),
                            (2, req['stderr'], os.O_WRONLY | os.O_CREAT)):
        f = os.open(path, flags)
        os.dup2(f, fd)
        os.close(f)
    set_limits(req['limits'])
    try:
        run_command(*req['how'])
        code = 0
    except SystemExit as e:          # None: 0; a number: that; anything else is printed, then 1
        code = e.code if e.code is None or isinstance(e.code, int) else print(e.code, file=sys.stderr) or 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = -signal.SIGINT if sys.exc_info()[0] is KeyboardInterrupt else 1
    finish(code or 0)


def set_limits(limits):
    """Each (resource.RLIMIT_..., soft limit): this process's own, its hard limit kept."""
    for which, soft in limits:
        resource.setrlimit(which, (soft, resource.getrlimit(which)[1]))


def run_command(kind, target, args):
    if kind == 'module':             # what `python -m` itself calls
        sys.argv, sys.path[0] = ['-m', *args], os.getcwd()
        runpy._run_module_as_main(target)
        return
    path = os.path.abspath(target)   # `python script.py`: argv[0] as typed, __file__ and sys.path[0] absolute
    sys.argv, sys.path[0] = [target, *args], os.path.dirname(path)
    main = types.ModuleType('__main__')
    main.__file__, main.__cached__, main.__builtins__ = path, None, builtins
    sys.modules['__main__'] = main
    with open(path, 'rb') as f:
        code = compile(f.read(), path, 'exec')
    exec(code, main.__dict__)


FILES = (io.TextIOWrapper, io.BufferedWriter, io.BufferedRandom)   # type(o), not isinstance: no __class__ looked up


def finish(code):
    """The interpreter's exit: non-daemon threads joined, atexit handlers run (weakref finalizers, DataLoader
    workers ended), every open file flushed; not the second it then spends freeing torch's modules."""
    threading._shutdown()
    atexit._run_exitfuncs()
    for f in [sys.stdout, sys.stderr] + [o for o in gc.get_objects() if issubclass(type(o), FILES)]:
        try:
            f.flush()
        except (OSError, ValueError):      # closed, or not writable
            pass
    if code == -signal.SIGINT:       # an uncaught Ctrl-C ends the process by SIGINT, as CPython does
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code)


if __name__ == '__main__':
    become(serve())
