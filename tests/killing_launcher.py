"""Run a gptexp command that SIGKILLs its own process at a chosen point of a sweep job's
start-up (the test side's fault injection; the product has no hook for it).

    python tests/killing_launcher.py WHERE JOB MODULE [ARGS...]

WHERE ``before-claim``: job JOB dies after Hydra made its directory, before the job claims it.
WHERE ``before-training``: job JOB dies after claiming its run, while the corpus is prepared.
JOB is the job directory's name (Hydra's job number).
WHERE ``fork-start``: a fork whose run's name begins with JOB dies once its run.json records it,
before its first checkpoint (the one that holds its start).
WHERE ``pbt-record``: the PBT sweeper dies while it writes pbt.json for the JOB-th time (its
temporary file half written, before the rename).
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import sys

import gptexp.run.forking as forking
import gptexp.run.pbt_sweeper as pbt
import gptexp.run.starts as starts
import gptexp.run.sweep as sweep


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    where, job, module, *args = sys.argv[1:]
    if where == "before-claim":
        claim = sweep.claim_run

        def claim_run(plan, *rest, **kwargs):
            if plan.run.path.name == job:
                die()
            return claim(plan, *rest, **kwargs)

        sweep.claim_run = claim_run
    elif where == "before-training":
        corpus = starts.run_corpus

        def run_corpus(cfg, run, *args, **kwargs):
            if run.path.name == job:
                die()
            return corpus(cfg, run, *args, **kwargs)

        starts.run_corpus = run_corpus
    elif where == "fork-start":
        after_record = forking.ForkStart.after_record

        def fork_after_record(self, trainer):
            if trainer.run.path.name.startswith(job):
                die()
            after_record(self, trainer)

        forking.ForkStart.after_record = fork_after_record
    elif where == "pbt-record":
        writes = []
        write = pbt.atomic_write_json

        def atomic_write_json(path, obj):
            writes.append(path)
            if len(writes) == int(job):
                data = json.dumps(obj, indent=2).encode()
                path.with_name(path.name + ".tmp").write_bytes(data[: len(data) // 2])
                die()
            write(path, obj)

        pbt.atomic_write_json = atomic_write_json
    else:
        sys.exit(f"unknown point {where!r}")
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
