"""Preemption: a SIGTERM or SIGUSR1 on any rank makes every rank checkpoint after the same step and exit.

SLURM sends SIGUSR1 ahead of the time limit (`sbatch --signal=USR1@SECONDS`, see slurm/train.sbatch) and SIGTERM
on preemption, `scancel` and at the limit itself. The handler only records the signal. Ranks agree at log steps
with one all_reduce of one integer, because a checkpoint is a collective: a rank that saw the signal cannot stop
alone, and the signal reaches ranks at different steps. Between log steps nothing is synchronized.

After the checkpoint rank 0 writes `<output_dir>/preempted.json` (RunFolder.preempted); the SLURM helper
(slurm/job.py) requeues the job when it finds it, and the requeued job resumes with train.resume=latest.
"""
from __future__ import annotations

import json
import logging
import signal
import threading
from nlip_ds import distributed as D
from nlip_ds.run.layout import RunFolder

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    """Context manager: records SIGTERM/SIGUSR1 while the loop runs, restores the previous handlers after."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "Preemption":
        # signal.signal only works in the main thread; elsewhere (a test harness thread) there is nothing to watch.
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _record(self, signum, frame) -> None:
        # No logging here: the signal may interrupt a logging call that holds the handler's lock.
        self.signum = signum

    def agreed(self, device) -> bool:
        """True on every rank when any rank received a signal (one all_reduce of one integer)."""
        return D.all_reduce_max(int(self.signum is not None), device) > 0

    def exit(self, output_dir: str, step: int, tag: str) -> None:
        """After the checkpoint: leave the marker for the job script and end the process without an error."""
        name = signal.Signals(self.signum).name if self.signum else "another rank's signal"
        if D.get_rank() == 0:
            marker = RunFolder(output_dir).preempted
            marker.write_text(json.dumps({"signal": name, "step": step, "checkpoint": tag}) + "\n")
        logger.warning("preempted (%s): checkpoint %s written at step %d; exiting, resume with train.resume=latest",
                       name, tag, step)
        D.leave_process_group()
        raise SystemExit(0)
