"""Stopping well: SIGTERM like Ctrl-C, and pre-emption under Slurm.

Outside Slurm, SIGTERM (what Kubernetes and pre-emptible VMs send before a kill) stops a
run at once, as Ctrl-C does: the run ends KILLED with the command that resumes it, exit 143.

Inside a Slurm batch job, SIGTERM (`scancel --signal=TERM`, pre-emption) and the time-limit
warning (`sbatch --signal=USR2@90`, what submitit asks for) stop training at the next step
boundary, where a step checkpoint is written (`CheckpointDir.commit_step`: weights,
optimizer state with its step and EMA averages, the epoch, its steps done and the running
state of its train metrics). The job requeues itself (`scontrol requeue`) and the requeued
job resumes the same MLflow run from that step (`vitexp.train.resume`): it trains the epoch's
remaining batches only, in their original order, so each epoch's metrics are logged once,
over the whole epoch, and the optimizer step goes on with none repeated or lost.
Ctrl-C and SIGTERM raise at once, wherever the interpreter is; Python drops an exception
raised inside a destructor or a garbage-collector callback (`Exception ignored in ...`), so
the interrupt is kept until it reaches the run, and raised again at the next step end, and
between the stages after training, if it was lost on the way.
Multi-worker jobs stop at a step boundary too, the same one on every worker (they agree on
it through a collective, whichever worker got the signal), outside Slurm as well: a worker
that stopped alone would leave the others waiting in their next collective. They write no
step checkpoint: they resume from the last committed epoch.
"""

import contextlib
import os
import signal
import subprocess
import sys
import threading

import keras


class Terminated(KeyboardInterrupt):
    """The run was stopped by SIGTERM (or Slurm's warning signal); `requeue` when Slurm
    should run the job again; `where` says where training stopped, when it says more than
    the last committed epoch."""

    def __init__(self, requeue: bool = False, where: str = "", signum: int = signal.SIGTERM):
        super().__init__()
        self.requeue = requeue
        self.where = where
        self.signal_name = signal.Signals(signum).name


def slurm_job_id() -> str | None:
    """This Slurm batch job's id (an array task has its own), None outside a batch job."""
    if "SLURM_JOB_ID" not in os.environ or os.environ.get("SLURM_PROCID", "0") != "0":
        return None
    return os.environ["SLURM_JOB_ID"]


def requeued() -> bool:
    """True in a Slurm job that runs again after a requeue, in each of its tasks (workers)."""
    return "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


# a held interrupt that waits longer than this says why, on stderr
HELD_NOTICE_S = 1.0
HELD_NOTICE = (
    "vitexp: stopping once the call in progress returns (a tracking store that does not "
    "answer holds it for up to its timeout); press Ctrl-C again to stop now\n"
)


class StopSignal:
    """Installs the handlers; under Slurm, and for a job's workers, the signal is remembered
    until a step ends."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.raised: KeyboardInterrupt | None = None  # raised by a handler, not yet handled
        self._workers = False
        self._holding = 0  # inside `held()`: an interrupt waits for its end
        self._held = False
        self._notice: threading.Timer | None = None

    def install(self, workers: bool = False) -> None:
        """Args:
        workers: this process is one of a multi-worker job's workers."""
        self.received = None
        self.raised = None
        self._release()
        self._workers = workers
        self.reclaim()

    def reclaim(self) -> None:
        """Installs the handlers (again, once TensorFlow's multi-worker runtime has started:
        it takes SIGTERM for a preemption notifier of its own, which swallows the signal)."""
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not ignored (nohup)
            signal.signal(signal.SIGINT, self._interrupt)
        if slurm_job_id() is None and not self._workers:
            signal.signal(signal.SIGTERM, self._raise)
            return
        for signum in (signal.SIGTERM, signal.SIGUSR2):
            signal.signal(signum, self._remember)

    def _raise(self, signum, frame) -> None:
        self._raise_unless_held(Terminated())

    def _interrupt(self, signum, frame) -> None:
        self._raise_unless_held(KeyboardInterrupt())

    def _raise_unless_held(self, stop: KeyboardInterrupt) -> None:
        # a second one raises at once: while one is held, or while the run stops on the first
        # (its KILLED status on its way to a store that may not answer)
        again = self.raised is not None
        self.raised = stop
        if self._holding and not self._held and not again:
            self._held = True
            # a block that outlasts HELD_NOTICE_S says why the run has not stopped yet (from
            # a timer thread: a handler that wrote to stderr could land inside a write there)
            self._notice = threading.Timer(HELD_NOTICE_S, os.write, (2, HELD_NOTICE.encode()))
            self._notice.daemon = True
            self._notice.start()
            return
        self._release()
        raise self.raised

    def _release(self) -> None:
        """Nothing is held any more: the notice of a held interrupt is not due."""
        self._held = False
        if self._notice is not None:
            self._notice.cancel()
            self._notice = None

    @contextlib.contextmanager
    def held(self):
        """Ctrl-C and SIGTERM wait until the block ends (a checkpoint commit: the epoch's
        file, then `last.keras` and `best.keras` linked to it; a call to the tracking store),
        then raise: a run stopped at any moment leaves its files and its store consistent.
        A second one raises at once (a store that does not answer holds a call for up to its
        timeout), and a wait longer than `HELD_NOTICE_S` says so on stderr. A block that
        raises leaves the interrupt pending for `check`."""
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
            if not self._holding and self._notice is not None:  # the wait is over either way
                self._notice.cancel()
                self._notice = None
        if not self._holding and self._held and self.raised is not None:
            self._release()
            raise self.raised

    def check(self) -> None:
        """Raises again an interrupt that a handler raised and Python dropped on its way."""
        if self.raised is not None:
            raise self.raised

    def handled(self) -> None:
        """The run has the interrupt: it is no longer pending."""
        self.raised = None
        self._release()

    def _remember(self, signum, frame) -> None:
        self.received = signum


STOP = StopSignal()


class StopAtStepEnd(keras.callbacks.Callback):
    """Ends training at the step boundary after a remembered stop signal (Slurm), once
    `recorder` (a `vitexp.train.callbacks.EpochRecorder`, None for none) has checkpointed that
    step. After an epoch's last step it lets the epoch end (validated and committed) and
    stops at the next boundary. Place it after every other callback: they all see the step.

    With a multi-worker `strategy`, every worker asks the others at each step end whether
    one of them got the signal, and all stop at the same step (Slurm's job requeued by its
    first task), resuming later from the last committed epoch.
    """

    def __init__(self, recorder=None, strategy=None):
        super().__init__()
        self.recorder = recorder
        self.strategy = strategy
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        STOP.check()
        stop = self._agreed(STOP.received is not None)
        if not stop or batch + 1 >= self.params["steps"]:
            return
        if self.strategy is not None:
            where = f"at step {batch + 1} of epoch {self._epoch + 1}, as every worker"
            raise Terminated(slurm_job_id() is not None, where, STOP.received or signal.SIGTERM)
        where = self.recorder.commit_step() if self.recorder is not None else ""
        raise Terminated(requeue=True, where=where, signum=STOP.received)

    def on_test_batch_end(self, batch, logs=None):
        STOP.check()

    def on_epoch_end(self, epoch, logs=None):
        STOP.check()

    def _agreed(self, stop: bool) -> bool:
        """Whether any worker got the signal (this process's answer when there are none)."""
        if self.strategy is None:
            return stop
        import tensorflow as tf

        flags = self.strategy.run(lambda: tf.constant(float(stop)))
        return float(self.strategy.reduce("SUM", flags, axis=None)) > 0


def requeue() -> str:
    """Asks Slurm to run this job again; returns what to tell the user."""
    job = slurm_job_id()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the requeue signals this process too
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        error = done.stderr.strip() if done.returncode else ""
    except (OSError, subprocess.TimeoutExpired) as err:  # no scontrol on the PATH, no answer
        error = str(err)
    if error:
        print(f"vitexp: warning: scontrol requeue {job} failed: {error}", file=sys.stderr)
        return f"Slurm job {job} could not be requeued"
    return f"Slurm job {job} requeued; it resumes this run"
