"""CPU threads per process, set on purpose: more busy threads than cores stalls everything.

Rule (docs/reliability.md, "CPU threads"):
- OMP_NUM_THREADS, when set, is obeyed by every process (torch reads it; Lightning's DDP launcher sets it to
  CPUs / processes when the user did not).
- Otherwise each rank's main process gets its share of the CPUs it may run on (the affinity mask: what
  SLURM's --cpus-per-task or a container grants, not the machine's count), and when it trains on the CPU
  its DataLoader workers' cores come out of that share: they compute beside it.
- DataLoader workers compute with one thread: torch sets 1 in every worker, OpenCV is made serial before
  they fork (ib/data/datamodule.py).
Measured on 2 shared cores, 1 worker, the embedded default: 2 torch threads trained at 0.8-3.4 samples/s,
1 thread at 8-13.5 samples/s.
"""
import os


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def compute_threads(cpus: int, local_processes: int, workers: int, on_cpu: bool) -> int:
    """Intra-op threads of one rank's main process, when OMP_NUM_THREADS is not set."""
    share = cpus // max(1, local_processes)
    return max(1, share - workers if on_cpu else share)


def set_compute_threads(local_processes: int, workers: int, on_cpu: bool) -> int | None:
    """Applies the rule to this process; returns the thread count it set, None when OMP_NUM_THREADS decides."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    import torch

    n = compute_threads(available_cpus(), local_processes, workers, on_cpu)
    torch.set_num_threads(n)
    return n
