"""SLURM's pre-timeout signal: a job saves a checkpoint, stops, and is requeued into the same run
directory, where it resumes by itself.

SLURM signals a job some time before its time limit (``sbatch --signal``); submitit asks for
that signal and, when it arrives, calls the launcher's ``checkpoint`` hook and requeues the
job (``scontrol requeue`` on SLURM, a restart on the local executor). gptexp sets that signal
to SIGUSR1, which the trainer already treats as "save after this step and stop". The trainer's
handler holds the signal while it trains; once the run has stopped cleanly (its checkpoint
durable, run.json ``interrupted``), :func:`requeue_if_preempted` hands the same signal to
submitit's handler, which submits the same Hydra job again. The requeued job finds its run by
its config (gptexp.run.sweep) and resumes it, recording a ``resumes`` entry in run.json.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

SUBMITIT_SIGNAL_ENV = "SUBMITIT_PREEMPT_SIGNAL"  # read by submitit when it is imported
PREEMPTION_SIGNAL = "USR1"


def prefer_sigusr1() -> None:
    """Make submitit use SIGUSR1 (its default is SIGUSR2) unless the user chose another one.
    Call before submitit is imported; jobs inherit it through the environment."""
    os.environ.setdefault(SUBMITIT_SIGNAL_ENV, PREEMPTION_SIGNAL)


def _submitit_requeue_signal(signame: str) -> int | None:
    """The signal number when this process is a submitit job whose requeue handler waits for
    ``signame``; None otherwise."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    signum = getattr(signal, signame, None)
    if signum is None:
        return None
    handler = signal.getsignal(signum)
    owner = getattr(handler, "__self__", None)
    if owner is None or not type(owner).__module__.startswith("submitit."):
        return None
    return signum


def requeue_if_preempted(signame: str) -> None:
    """After a clean stop on ``signame``: when submitit requeues on that signal, let it do so
    now (it checkpoints the job's submission, requeues it and exits this process)."""
    signum = _submitit_requeue_signal(signame)
    if signum is None:
        return
    log.warning("%s is the cluster's pre-timeout signal: requeueing this job", signame)
    signal.raise_signal(signum)
