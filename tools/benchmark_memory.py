"""
How much memory benchmark.py's cases need: one case's peak, built alone (CPU: the RSS of a fresh process; CUDA:
max_memory_allocated), and on a GPU the largest batch at which all of a model's cases fit in a share of its memory.
"""
import gc
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import torch

from tools.benchmark_cases import Parts


def proc_mb(field):
    """VmRSS (now) or VmHWM (peak) of this process;
    getrusage's ru_maxrss would count the parent's."""
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 2 ** 10


def peak_memory(cfg, size, method, path, batch, device):
    """{peak_mb, step_mb} of one case built alone and run for two steps: its peak, and what
    the steps add to what its models and optimiser hold before them. On a CPU the RSS of a
    fresh process; on CUDA max_memory_allocated, counted from before its models exist."""
    if device.type == 'cpu':
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn')) as pool:
            peak, before = pool.submit(rss_peak, cfg, size, method, path, batch).result()
    else:
        torch.cuda.empty_cache()
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run = Parts(cfg, size, device).step(method, path, batch)
        before = (torch.cuda.memory_allocated(device) - start) / 2 ** 20
        run(), run()
        peak = (torch.cuda.max_memory_allocated(device) - start) / 2 ** 20
        del run
        gc.collect()         # the case's models and optimiser go before the next case is built
        torch.cuda.empty_cache()
    return {'peak_mb': peak, 'step_mb': peak - before}


def rss_peak(cfg, size, method, path, batch):
    """peak_memory() on a CPU, in its fresh process: (peak RSS, RSS before the first step), MB."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = Parts(cfg, size, torch.device('cpu')).step(method, path, batch)
    before = proc_mb('VmRSS')
    run(), run()
    return proc_mb('VmHWM'), before


MAX_BATCH = 1024      # a small model would otherwise fill 80 GB with a batch timed for minutes


def largest_batch(peak_at, budget, step=8):
    """The largest multiple of `step` (up to MAX_BATCH) whose measured peak stays within `budget`, found within
    8 measurements. Each next batch lies where the line through the peaks at `step` and at the last batch
    meets the budget, kept strictly between the largest batch that fitted and the smallest that did not: memory
    grows a little faster than linearly (kernels and workspaces change with the batch), so a line alone
    overshoots. peak_at(batch) -> bytes at that batch (inf: out of memory)."""
    low = peak_at(step)
    fits = step                  # the largest batch that fitted
    over = MAX_BATCH + step      # the smallest that did not
    batch = 2 * step
    for _ in range(8):
        if low > budget or fits + step >= over:
            break
        peak = peak_at(batch)
        if peak <= budget:
            fits = batch
        else:
            over = batch
        if peak < float('inf'):   # where the line through the two peaks meets the budget
            line = step + (budget - low) / max((peak - low) / (batch - step), 1)
        else:
            line = (fits + over) / 2
        batch = min(max(int(line) // step * step, fits + step), over - step)
    return fits


def fill_batch(parts, todo, fill, device):
    """largest_batch() of the GPU's memory, `fill` of it, over the fullest case's max_memory_allocated with all of
    the model's cases resident at that batch, as they are timed (after a first step has made its optimiser state)."""
    def peak_at(batch):
        runs = [parts.step(*c, batch) for c in todo]
        try:
            for run in runs:
                run()
            # the second steps' peak: the fullest case's
            torch.cuda.reset_peak_memory_stats(device)
            for run in runs:
                run()
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device)
        except torch.OutOfMemoryError:
            return float('inf')
        finally:
            del runs
            parts.batches.clear()
            gc.collect()
            torch.cuda.empty_cache()
    return largest_batch(peak_at, fill * torch.cuda.get_device_properties(device).total_memory)
