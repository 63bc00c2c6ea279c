"""
A scheduler's signal asks a training run to save where it is and stop, to go on later from that very step, bit for
bit: SLURM's SIGUSR1 ahead of a time limit (`#SBATCH --signal=B:USR1@300`, which tools/slurm.sbatch passes on), and
SIGTERM, what a preemption (or `kill`) sends first.

    run_main (util/launch.py)         the handler notes the signal while a run trains (asked)
    train_one_epoch (util/engine.py)  after each optimizer step: run.stop.agreed(), the signal every process stops for
    Run.save_and_stop (util/run.py)   the checkpoint of that step, one line, exit SAVED_AND_STOPPED

Every process must stop at the same step: each saves its RNG state with rank 0's checkpoint (all_gather) and DDP's
collectives pair the processes step by step. A signal reaches them at different moments (torchrun passes it on to
each in turn; SLURM signals each node), so each step every process all-reduces (MAX) the signal it was asked, and the
processes act on that reduction one step later: on a GPU its value is copied to the host behind the step's work and
read once the next step's work is queued, so the host waits at most for the step before the one it has just queued,
and the GPU always has that one to run (no host sync in the step). One process alone stops after the step it is in.
"""
import json
import os
import signal

import torch
import torch.distributed as dist

# the exit code of a run that saved at a signal and stopped: sysexits.h's EX_TEMPFAIL ("try again later"), what a
# batch script requeues on (torchrun reports any exit but 0 as its own 1: tools/slurm.sbatch reads the run's line)
SAVED_AND_STOPPED = os.EX_TEMPFAIL

# the signals that ask a training run to save and stop
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

# while a run trains (training, set when its Run is built), the signals this process was asked, in order
training = False
asked = []
# the file in which the main process of a run that has begun (its config.json written) says how it ended: what a
# batch script decides by (tools/slurm.sbatch), never by the run's log
ended_file = None
ENDED = 'ended.json'


def start():
    """A process's first state, at the start of run_main: no run training, nothing asked, no run begun."""
    global training, ended_file
    training = False
    ended_file = None
    asked.clear()


def ended(state, step=None):
    """Write how the run ended into its ENDED file, where this process began one: 'finished', 'saved' (at a signal,
    its checkpoint of `step`: go on), 'stopped before training' (a scheduler's signal before its first step: nothing
    to lose, go on), 'stopped' (Ctrl-C, a closed terminal) or 'failed'. A file it cannot write is left unwritten: the
    batch script then fails the job rather than guess."""
    if ended_file is None:
        return
    try:
        with open(ended_file, 'w') as f:
            json.dump({'ended': state, 'step': step}, f)
    except OSError:
        pass


class SavedAndStopped(Exception):
    """The run saved the step its processes agreed on and stops (run_main exits with SAVED_AND_STOPPED)."""


class Agreement:
    """The step every process of a run stops at, and for which signal (agreed, after each optimizer step)."""

    def __init__(self, plan):
        global training
        training = True
        self.plan = plan
        self.last = None   # the last step's reduction, on the host (on a GPU: with the event that says it is there)

    def agreed(self):
        """The number of the signal every process stops for after this step, or 0 to go on."""
        mine = max(asked, default=0)
        if self.plan.world == 1:
            return mine
        device = self.plan.device
        now = torch.full((1,), mine, dtype=torch.int32, device=device)   # made on the device: no copy to it
        dist.all_reduce(now, op=dist.ReduceOp.MAX)                       # queued behind the step (NCCL)
        event = None
        if device.type == 'cuda':
            host = torch.empty(1, dtype=torch.int32, pin_memory=True)
            host.copy_(now, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            now = host
        last, self.last = self.last, (now, event)
        if last is None:
            return 0
        value, done = last
        if done is not None:
            done.synchronize()   # the last step's work: this step's is queued behind it
        return int(value.item())
