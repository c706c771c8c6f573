"""Tiny timing helpers shared by the benchmark scripts.

Every figure the benchmarks report is a ratio of two (or more) things timed
in the same run, interleaved ``A, B, A, B, ...``, taking the median of the
repetitions, so that load from other processes on a shared machine hits
every candidate alike.
"""
import statistics
import time

import torch


def device():
    """``'cuda'`` when a GPU is available, else ``'cpu'``."""
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def sync(dev):
    if str(dev).startswith('cuda'):
        torch.cuda.synchronize()


def time_once(fn, dev):
    """Seconds one call of ``fn`` takes (synchronised on a GPU)."""
    sync(dev)
    start = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - start


def interleaved(fns, reps=5, warmup=1, dev='cpu', inner=1):
    """Time several callables interleaved; return ``{name: median seconds}``.

    Args:
        fns (dict[str, callable]): Candidates, each called ``inner`` times
            per repetition.
        reps (int): Repetitions; the median is reported.
        warmup (int): Untimed rounds first (allocator, cudnn autotune).
        dev (str): Device to synchronise.
        inner (int): Calls per timed repetition (seconds are per call).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(time_once(
                lambda: [fn() for _ in range(inner)], dev) / inner)
    return {name: statistics.median(ts) for name, ts in times.items()}


def to_format(t, memory_format):
    """Tensor or module in ``'contiguous'`` or ``'channels_last'``."""
    fmt = dict(contiguous=torch.contiguous_format,
               channels_last=torch.channels_last)[memory_format]
    return t.to(memory_format=fmt)


def print_table(headers, rows, title=None):
    """Print a GitHub-markdown table."""
    rows = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows))
              for i, h in enumerate(headers)]
    if title:
        print(f'\n### {title}\n')
    print('| ' + ' | '.join(str(h).ljust(w) for h, w in
                            zip(headers, widths)) + ' |')
    print('|' + '|'.join('-' * (w + 2) for w in widths) + '|')
    for r in rows:
        print('| ' + ' | '.join(c.ljust(w) for c, w in zip(r, widths)) + ' |')


def _fmt(c):
    if isinstance(c, float):
        return f'{c:.3g}' if abs(c) < 1000 else f'{c:.0f}'
    return str(c)


def environment():
    """One line naming the machine and versions, for the tables."""
    import platform
    dev = device()
    name = torch.cuda.get_device_name() if dev == 'cuda' else \
        f'CPU ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})'
    heap = ', glibc heap kept (keep_heap)' if HEAP_KEPT and dev == 'cpu' \
        else ''
    return f'{name}, torch {torch.__version__}{heap}'


def keep_heap():
    """Keep freed memory in the process (glibc): no mmap for big blocks, no
    trimming. On a VM where a page fault costs a lot, glibc otherwise
    returns every large activation to the kernel after each step and faults
    it in again at the next, which swamps the compute being measured (and
    varies with the host's load). Returns True when applied."""
    import ctypes
    import ctypes.util
    import platform
    if platform.system() != 'Linux':
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c'))
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and \
            bool(libc.mallopt(M_TRIM_THRESHOLD, 2**30))
    except (OSError, AttributeError):
        return False


HEAP_KEPT = keep_heap()
torch.set_flush_denormal(True)
