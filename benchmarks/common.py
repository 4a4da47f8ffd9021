"""Shared helpers of the benchmark scripts: timing, environment description and JSON output.

Timings are medians of interleaved repetitions: every repetition runs each variant once, in a
rotated order, so slow drifts of a shared CPU (other processes, frequency) hit all variants
alike and the *ratios* stay meaningful even when the absolute numbers move. The clock is wall
time, or with ``--clock cpu`` the CPU time of the process: on a machine shared with other
jobs, single-threaded (``--threads 1``) CPU time leaves out the time spent descheduled.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

import mmdet_cbn

__all__ = ['CLOCKS', 'add_common_arguments', 'setup_torch', 'synchronize', 'time_call',
           'page_faults', 'interleaved', 'environment', 'run_record', 'write_json', 'ratio',
           'tensor_bytes', 'cuda_step_peak']


def add_common_arguments(parser: argparse.ArgumentParser, repeats: int | None,
                         clock: bool = True) -> None:
    """Add ``--device``, ``--threads``, ``--seed``, ``--out`` and, for timings, ``--repeats``
    (and ``--clock`` and ``--calls`` when ``clock``)."""
    parser.add_argument('--device', choices=('cpu', 'cuda'), default='cpu')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch intra-op threads (default: torch default)')
    if repeats is not None:
        parser.add_argument('--repeats', type=int, default=repeats,
                            help='timed repetitions per variant (medians are reported)')
    if repeats is not None and clock:
        parser.add_argument('--clock', choices=CLOCKS, default='wall',
                            help="'cpu': CPU time of this process instead of wall time; on a "
                                 'shared machine with --threads 1 it ignores the time spent '
                                 'descheduled (CPU device only)')
        parser.add_argument('--calls', type=int, default=1,
                            help='calls per timed repetition, averaged (e.g. 10 on CUDA, where '
                                 'one call is too short to time alone)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', type=Path, default=None, help='write the results as JSON')


def setup_torch(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads`` and ``--seed``; return the device, failing early without CUDA."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda: CUDA is not available in this torch build')
    if args.device == 'cuda' and getattr(args, 'clock', 'wall') == 'cpu':
        raise SystemExit('--clock cpu measures CPU work only: use wall time with --device cuda')
    return torch.device(args.device)


CLOCKS = ('wall', 'cpu')


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (a no-op on CPU)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, clock: str = 'wall',
              calls: int = 1) -> float:
    """Seconds taken by one call of ``fn``, queued device work included: the mean of ``calls``
    calls queued back to back.

    ``clock='cpu'`` counts the CPU time of this process (all its threads) instead.
    """
    if clock == 'cpu' and device.type != 'cpu':
        raise ValueError("clock='cpu' measures CPU work only: use it with the CPU device")
    now = time.process_time if clock == 'cpu' else time.perf_counter
    synchronize(device)
    start = now()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (now() - start) / calls


def page_faults() -> int | None:
    """Minor page faults of this process so far (pages the kernel had to map on first touch),
    or None where ``resource`` is missing (Windows)."""
    if sys.platform == 'win32':
        return None
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def interleaved(variants: dict[str, Callable[[], Any]], repeats: int, device: torch.device,
                warmup: int = 1, clock: str = 'wall', calls: int = 1) -> dict[str, dict[str, Any]]:
    """Time each variant ``repeats`` times, interleaved; return median, min and all samples (s),
    and the median minor page faults per call (``page_faults``: freshly mapped memory, which
    the allocator's handling of large temporaries decides; None where not counted). Each
    sample is the mean of ``calls`` calls (:func:`time_call`).

    ``warmup`` untimed calls of every variant come first (allocator, kernel selection).
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    faults: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            before = page_faults()
            samples[name].append(time_call(variants[name], device, clock, calls))
            if before is not None:
                faults[name].append((page_faults() - before) / calls)
    return {name: {'median_s': statistics.median(s), 'min_s': min(s), 'samples_s': s,
                   'page_faults': statistics.median(faults[name]) if faults[name] else None}
            for name, s in samples.items()}


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes held by ``tensors`` (None entries, e.g. absent gradients, count 0)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def cuda_step_peak(step: Callable[[], Any], device: torch.device) -> int:
    """Most bytes allocated on the CUDA ``device`` during ``step`` above those allocated before
    it."""
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def ratio(results: dict[str, dict[str, Any]], num: str, den: str) -> float:
    """Ratio of the medians of two timed variants."""
    return results[num]['median_s'] / results[den]['median_s']


def source_digest() -> str:
    """Short SHA-256 of the ``mmdet_cbn/*.py`` sources: which version of the layer was run."""
    digest = hashlib.sha256()
    for path in sorted(Path(mmdet_cbn.__file__).parent.glob('*.py')):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on: CPU/GPU model, cores, threads, load, versions."""
    env: dict[str, Any] = {
        'mmdet_cbn_source_sha256': source_digest(),
        'device': str(device),
        'cpu_model': _cpu_model(),
        'cpu_count': os.cpu_count(),
        'torch_threads': torch.get_num_threads(),
        'torch': torch.__version__,
        'python': platform.python_version(),
    }
    if hasattr(os, 'getloadavg'):
        env['loadavg_1_5_15'] = list(os.getloadavg())
    # the memory allocator's settings: they decide how often large temporaries are fresh pages
    env['allocator_env'] = {k: v for k, v in os.environ.items()
                            if k in ('GLIBC_TUNABLES', 'LD_PRELOAD') or k.startswith('MALLOC_')}
    if device.type == 'cuda':
        env['gpu'] = torch.cuda.get_device_name(device)
    return env


def run_record(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The head of every benchmark's JSON: the environment and the command-line arguments."""
    return {'environment': environment(device),
            'args': {k: str(v) for k, v in vars(args).items()}}


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    """Write ``payload`` (with the load average at the end of the run added) to ``path``."""
    if path is None:
        return
    if hasattr(os, 'getloadavg'):
        payload.setdefault('environment', {})['loadavg_at_end'] = list(os.getloadavg())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + '\n')
