"""Cluster preemption: stop signals, agreed on by every rank at a step boundary, and the SLURM requeue.

Why not Lightning's own handlers: its SIGTERM flag is per process and each rank raises on its own flag at
the end of a step, so under DDP a rank that saw the signal a moment later starts the next step and waits
forever for the others (Lightning-AI/pytorch-lightning#20806); its SLURM handler (SIGUSR1) checkpoints
*inside* the signal handler, mid-step and with collectives, and writes hpc_ckpt_N.ckpt, which
`--ckpt_path last` does not read. Here a handler only sets a flag; ib.callbacks.preemption.Preemption asks
after every training step whether any rank has one (one tiny all-reduce under DDP), and then every rank
stops at the same step.
"""
import logging
import os
import signal
import subprocess
import threading

import torch

log = logging.getLogger(__name__)


class StopSignals:
    """SIGTERM plus the cluster's early warning (e.g. SLURM `--signal=USR1@120`), which also asks for a requeue."""

    def __init__(self, requeue_signal: str | None):
        self.requeue_signum = getattr(signal, requeue_signal) if requeue_signal else None
        self.received: set[int] = set()
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for signum in {signal.SIGTERM, self.requeue_signum} - {None}:
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        self.received.add(signum)  # nothing else: the step in progress finishes first

    @property
    def requeue_requested(self) -> bool:
        return self.requeue_signum in self.received

    def stop_everywhere(self, trainer) -> bool:
        """True on every rank once any rank got a signal (must be called by all ranks at the same point)."""
        return trainer.strategy.reduce_boolean_decision(bool(self.received), all=False)


# Stop signals a cluster may send to a whole job; SIGUSR1/2 are the usual early warnings (SLURM --signal).
WORKER_IGNORED_SIGNALS = {signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2}


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """DataLoader `worker_init_fn`: the main process decides when to stop, then shuts this worker down.

    The signals are blocked and taken by a thread, which exits the worker only for a SIGTERM from its parent:
    how the DataLoader ends a worker that does not answer (torch's own worker handler does the same). Workers
    start with them blocked already (WorkerSignalsLoader), so none can arrive before this runs.
    """
    if not hasattr(signal, "sigwaitinfo"):  # macOS: plain ignore (its DataLoader cannot then SIGTERM a worker)
        for signum in WORKER_IGNORED_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_IGNORED_SIGNALS)
    threading.Thread(target=_exit_on_parent_sigterm, args=(os.getppid(),), daemon=True).start()


def _exit_on_parent_sigterm(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo(WORKER_IGNORED_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == parent:
            os._exit(0)


class WorkerSignalsLoader(torch.utils.data.DataLoader):
    """A DataLoader that forks its workers with the stop signals blocked; give it
    `worker_init_fn=ignore_stop_signals`. A signal sent meanwhile waits for the main process."""

    def _get_iterator(self):
        if self.num_workers == 0:
            return super()._get_iterator()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_IGNORED_SIGNALS)
        try:
            return super()._get_iterator()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def requeue_slurm_job() -> None:
    """`scontrol requeue` this SLURM job (no-op outside SLURM): it restarts with the same command line."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        error = result.stderr.strip() if result.returncode else None
    except (OSError, subprocess.TimeoutExpired) as e:
        error = str(e)
    if error:
        log.warning("requeue of SLURM job %s failed: %s", job, error)
    else:
        log.info("requeued SLURM job %s", job)
