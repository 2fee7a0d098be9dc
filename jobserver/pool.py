"""The pool: claims due jobs from the journal and runs them on a ThreadPoolExecutor.

One dispatcher thread claims jobs in batches (up to the free worker slots), renews
the leases of running jobs, enforces time limits and requeues jobs whose owner died.
Outcomes are recorded inside the worker function, never in future callbacks (those
swallow exceptions), and are retried while the journal is unreachable. What happens to
a job here is told to the listener as a `JobEvent`, once it is committed.

A Python thread cannot be killed. A job past its time limit is failed with
TimeoutError and asked to stop (ctx.cancelled); its thread keeps its worker slot
until the task function returns, and anything it writes afterwards is fenced out.
"""
import logging
import os
import random
import socket
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .codec import MAX_DOCUMENT, dumps
from .errors import JobCancelled, JournalUnavailable, LeaseLost, ServerClosed, UnknownTask, WriteRefused
from .model import Action, Job, JobEvent, State
from .tasks import JobContext

log = logging.getLogger(__name__)

MAX_TRACEBACK = 16_000
MAX_MESSAGE = 2_000
SWEEP_EVERY = 5.0  # seconds at most between looks for expired leases and dead local owners
MAX_NODE_ID = 120  # the journal's lease_owner column


def _node_scope():
    """Identifies the pid namespace of this kernel boot: a pid can be checked only within it."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    return f"{socket.gethostname()}~{uuid.uuid5(uuid.NAMESPACE_OID, f'{boot}/{ns}').hex[:12]}"


def make_node_id():
    """`scope/pid/random`: unique per process incarnation, and says where its pid lives."""
    return f"{_node_scope() or socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


def _dead_local_owner(owner, scope):
    """True if `owner` was a process in our pid namespace that no longer exists."""
    parts = (owner or "").rsplit("/", 2)
    if scope is None or len(parts) != 3 or parts[0] != scope or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        return False  # another pool of this very process (tests build several)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def error_info(exc, with_traceback=True):
    """The job's `error` object for an exception.

    A journal outage met inside the task (ctx.step, ctx.progress) says only that: its text
    names the database's address and the driver's words, and a job's error goes to its owner
    and to its callback receiver. The log has the rest. (A WriteRefused says what of the job's
    own data the journal would not store, in the journal's words: kept.)"""
    if isinstance(exc, JournalUnavailable) and not isinstance(exc, WriteRefused):
        log.warning("a job met a journal error: %s", exc)
        return {"type": type(exc).__name__,
                "message": "the journal was unavailable while the job ran; the server log has the cause"}
    info = {"type": type(exc).__name__, "message": str(exc)[:MAX_MESSAGE]}
    if with_traceback:
        info["traceback"] = "".join(traceback.format_exception(exc))[-MAX_TRACEBACK:]
    return info


def backoff_seconds(base, cap, failures):
    """Exponential backoff with equal jitter: half fixed, half random."""
    if base <= 0:
        return 0.0
    delay = min(cap, base * 2 ** (failures - 1))
    return delay / 2 + random.uniform(0, delay / 2)


class _Replacement:
    """The ticket of a finish that replaces an outcome the journal refused (see _record)."""
    __slots__ = ()


@dataclass
class _Run:
    job: Job  # as claimed: its lease_token is this run's
    ctx: JobContext
    deadline: float | None
    abandoned: bool = False  # finished by someone else (time limit, lost lease, shutdown)

    def elapsed(self):
        """Seconds since the run started."""
        return time.monotonic() - self.ctx.started

    @property
    def key(self):
        """One run of one job: a job retried while an abandoned run's thread still lives
        has two runs here, told apart by their lease tokens."""
        return self.job.id, self.job.lease_token


class Pool:
    """Runs jobs from a journal. Build it, `start()`, and `stop()` to shut down in order.

    `listener(JobEvent)` hears what happens to jobs here; it runs on the pool's threads
    (the journal's committer included) and must be quick."""

    def __init__(self, journal, registry, *, workers=8, lease_seconds=30.0, poll_interval=0.5,
                 shutdown_grace=10.0, max_crashes=3, listener=None, node_id=None):
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.journal = journal
        self.registry = registry
        self.workers = workers
        self.lease_ms = int(lease_seconds * 1000)
        self.poll_interval = poll_interval
        self.shutdown_grace = shutdown_grace
        self.max_crashes = max_crashes
        self.node_id = node_id or make_node_id()
        if len(self.node_id) > MAX_NODE_ID:
            # MySQL would refuse every claim (lease_owner column); SQLite would not: refuse both
            raise ValueError(f"node_id is at most {MAX_NODE_ID} characters")
        self._listener = listener
        self._scope = _node_scope()
        self._running = {}     # (job id, lease token) -> _Run whose task function is executing
        self._finishing = {}   # one key per queued outcome write -> its _Run, until committed
        self._retries = []     # outcome writes to try again: (due, run, write, event, next delay, ticket)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._draining = threading.Event()  # stop claiming; heartbeats and outcome retries go on
        self._claiming = threading.Lock()   # held through a claim and the start of its runs
        self._stopping = threading.Event()  # the dispatcher ends
        self._abandon = threading.Event()   # outcome writes that fail now are left to recovery
        self._claim_in_doubt = False  # a claim failed: it may have committed all the same
        self._executor = None
        self._dispatcher = None

    # --- lifecycle --------------------------------------------------------------------
    def start(self):
        """Recover what dead processes left running, then start claiming."""
        self.recover(at_start=True)
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="jobserver-worker")
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="jobserver-dispatcher",
                                            daemon=True)
        self._dispatcher.start()
        log.info("pool %s started with %d workers", self.node_id, self.workers)

    def stop(self, grace=None):
        """Shut down in order (as Dramatiq's Worker.stop: workers before the heartbeat);
        safe to call twice.

        1. Drain: the dispatcher stops claiming, but goes on renewing the leases of running
           jobs (a grace longer than the lease must not let another node run them again)
           and retrying outcome writes.
        2. Wait up to `grace` seconds for the running jobs and their outcomes.
        3. Give the rest back to the queue.
        4. Stop the dispatcher.
        5. Stop the executor (a given-back job's thread ends when its task returns)."""
        if self._draining.is_set():
            return
        self._draining.set()
        self._wake.set()
        with self._claiming:
            pass  # a claim under way has ended: its runs are in _running, and no claim follows
        if self._dispatcher is not None:
            self.join(self.shutdown_grace if grace is None else grace)
        with self._lock:
            leftover = list(self._running.values())
        for run in leftover:
            self._give_back(run, "the server is shutting down")
        self._abandon.set()
        self._stopping.set()
        self._wake.set()
        if self._dispatcher is not None:
            self._dispatcher.join()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _give_back(self, run, reason):
        # Give the job back before telling the task to stop: a task that honours the
        # request would otherwise race to record itself 'cancelled' or 'succeeded'.
        run.abandoned = True
        job_id, token = run.key
        try:
            if self.journal.give_back(job_id, token):
                log.warning("job %s given back to the queue: %s", job_id, reason)
                self._emit(JobEvent.state_changed(job_id, State.QUEUED, task=run.job.task,
                                                  action=Action.GIVE_BACK))
        except JournalUnavailable:
            log.warning("job %s not given back (journal unreachable); its lease will expire", job_id)
        run.ctx.request_cancel(reason)

    @property
    def draining(self):
        """True once stop() began: nothing more is claimed here."""
        return self._draining.is_set()

    def wake(self):
        """Claim now: a job was submitted in this process, or a worker slot came free."""
        if not self._wake.is_set():  # set() takes the Event's lock even when it is set
            self._wake.set()

    def join(self, timeout=None):
        """Wait until nothing runs here and every outcome is committed. Returns True if idle."""
        with self._idle:
            return self._idle.wait_for(self._is_idle, timeout=timeout)

    def _is_idle(self):
        return not self._running and not self._finishing and not self._retries

    def _notify_if_idle(self):
        """Wake join() and stop() once nothing is left (call with the lock held): they wait
        only for that, and a notify_all per job would cost every job its Python code."""
        if self._is_idle():
            self._idle.notify_all()

    def busy(self) -> int:
        """Worker threads running a task function now (a run past its time limit included:
        its thread stays taken until the function returns)."""
        return len(self._running)

    def running_ids(self):
        """The ids of the jobs whose task functions run here now."""
        with self._lock:
            return [job_id for job_id, _token in self._running]

    def cancel_local(self, job_id):
        """Tell a job running in this process to stop now (the journal flag reaches others)."""
        with self._lock:
            runs = [run for key, run in self._running.items() if key[0] == job_id]
        for run in runs:
            run.ctx.request_cancel()

    # --- dispatcher -------------------------------------------------------------------
    def _dispatch_loop(self):
        heartbeat_every = max(self.lease_ms / 3000, 0.05)
        next_heartbeat = time.monotonic() + heartbeat_every
        next_sweep = time.monotonic() + min(heartbeat_every, SWEEP_EVERY)
        failures = 0
        while not self._stopping.is_set():
            self._wake.clear()
            now = time.monotonic()
            # each duty on its own: a claim that keeps failing must not stop the heartbeat
            # (the leases of running jobs would lapse and others would run them again)
            ok = True
            if now >= next_heartbeat:
                ok &= self._duty("heartbeat", self._heartbeat)[0]
                next_heartbeat = now + heartbeat_every
            ok &= self._duty("time limits", self._enforce_time_limits, now)[0]
            ok &= self._duty("outcome retries", self._retry_outcomes)[0]
            claimed, full_batch = self._duty("claim", self._claim)  # nothing while draining
            ok &= claimed
            if now >= next_sweep and not self._draining.is_set():
                ok &= self._duty("recovery sweep", self.recover)[0]
                next_sweep = now + min(heartbeat_every * 1.5, SWEEP_EVERY)
            failures = 0 if ok else failures + 1
            if failures:
                self._stopping.wait(min(5.0, 0.1 * 2 ** failures))
            elif not full_batch:
                self._wake.wait(self._wait_time(next_heartbeat))

    @staticmethod
    def _duty(name, fn, *args):
        """Run one of the dispatcher's duties: (True, its result), or (False, None) once it
        failed (logged): a bug or an outage in one must not end the others for good."""
        try:
            return True, fn(*args)
        except JournalUnavailable as exc:
            log.warning("journal unavailable in the dispatcher's %s (%s); retrying", name, exc)
        except Exception:
            log.exception("the dispatcher's %s failed; retrying", name)
        return False, None

    def _wait_time(self, next_heartbeat):
        wait = min(self.poll_interval, max(0.0, next_heartbeat - time.monotonic()))
        with self._lock:
            deadlines = [r.deadline for r in self._running.values() if r.deadline and not r.abandoned]
            deadlines += [retry[0] for retry in self._retries]
        if deadlines:
            wait = min(wait, max(0.0, min(deadlines) - time.monotonic()))
        return wait

    def _claim(self):
        with self._claiming:
            if self._claim_in_doubt:  # draining or not: those jobs must not wait out a lease
                self._give_back_unknown_claims()
            if self._draining.is_set():
                return False
            with self._lock:
                free = self.workers - len(self._running)
            if free <= 0:
                return False
            try:
                jobs = self.journal.claim(self.node_id, free, self.lease_ms)
            except JournalUnavailable:
                self._claim_in_doubt = True
                raise
            for job in jobs:
                self._start_run(job)
            return len(jobs) == free

    def _give_back_unknown_claims(self):
        """After a claim that failed, give back the jobs held under this node id that no run
        here holds. The connection may have been lost after the server committed the claim
        (its reply lost): those jobs would wait out their lease with no runner, and be
        counted as crashed. Runs on the dispatcher, the one thread that claims."""
        with self._lock:
            known = {run.key for run in self._running.values()}
            known |= {run.key for run in self._finishing.values()}
        released = self.journal.give_back_unknown(self.node_id, known)
        self._claim_in_doubt = False
        for job_id in released:
            log.warning("job %s: claimed here but its commit was not confirmed; given back", job_id)
        if released:
            self._wake.set()

    def _start_run(self, job):
        timeout = job.effective_timeout(self.registry.default_timeout(job.task))
        ctx = JobContext(job, self.journal, emit=self._emit)
        run = _Run(job, ctx, time.monotonic() + timeout if timeout else None)
        with self._lock:
            self._running[run.key] = run
        # the journal's run_at against this host's clock: the same clock for SQLite, NTP's
        # agreement for a database on another box (a negative skew is no wait)
        waited = max(0.0, time.time() - job.run_at / 1000)
        self._emit(JobEvent.state_changed(job.id, State.RUNNING, attempt=job.attempts, task=job.task,
                                          action=Action.CLAIM, queue_seconds=waited))
        self._executor.submit(self._work, run)

    def _enforce_time_limits(self, now):
        with self._lock:
            late = [r for r in self._running.values() if r.deadline and now >= r.deadline and not r.abandoned]
        for run in late:
            run.abandoned = True
            limit = run.deadline - run.ctx.started
            log.warning("job %s exceeded its time limit of %g s", run.job.id, limit)
            exc = TimeoutError(f"job exceeded its time limit of {limit:g} s")
            # Queue the failure before waking the task, so that the outcome the task records
            # when it stops comes second and is fenced out.
            self._finish(run, State.FAILED, error=error_info(exc, False))
            run.ctx.request_cancel("time limit exceeded")

    def _heartbeat(self):
        with self._lock:
            # a run whose outcome write waits (a time limit's failure being retried, too) keeps
            # its lease, abandoned or not: else the job would be recovered and run again
            leases = {r.key for r in self._running.values() if not r.abandoned}
            leases.update(r.key for r in self._finishing.values())
        if not leases:
            return
        lost, cancel = self.journal.renew(sorted(leases), self.lease_ms, self.node_id)
        with self._lock:
            # a lease 'lost' because our own outcome has just been committed is not news
            finishing = {run.key for run in self._finishing.values()}
            flagged = [run for key, run in self._running.items()
                       if key[0] in lost | cancel and key not in finishing and not run.abandoned]
        for run in flagged:
            job_id = run.job.id
            if job_id in lost:
                log.warning("job %s: lease lost; stopping this run", job_id)
                run.abandoned = True
                run.ctx.request_cancel("lease lost")
            else:
                run.ctx.request_cancel()

    def recover(self, at_start=False):
        """Requeue jobs whose lease expired, and those held by dead processes on this host;
        `at_start`, also those held under this pool's own node id by an earlier incarnation
        (a configured, stable `node_id`: nothing runs here yet, so they were cut off)."""
        owners = [None] + [o for o in set(self.journal.running_owners())
                           if (at_start and o == self.node_id) or _dead_local_owner(o, self._scope)]
        lost = {"type": "WorkerLost",
                "message": f"the job's process died {self.max_crashes} times while running it"}
        for owner in owners:
            recovery = self.journal.recover(self.max_crashes, lost, owner=owner)
            for job_id in recovery.requeued:
                log.warning("job %s recovered from a dead worker; queued again", job_id)
                self._emit(JobEvent.state_changed(job_id, State.QUEUED, error_type="WorkerLost",
                                                  action=Action.CRASH_REQUEUE))
            for job_id in recovery.failed:
                log.error("job %s failed with WorkerLost after %d crashes", job_id, self.max_crashes)
                self._emit(JobEvent.state_changed(
                    job_id, State.FAILED, error_type="WorkerLost", action=Action.CRASH_FAIL,
                    callback="pending" if job_id in recovery.with_callback else None))
            if recovery.requeued:
                self._wake.set()

    # --- running a job ----------------------------------------------------------------
    def _work(self, run):
        job_id = run.job.id
        try:
            self._execute(run)
        except Exception:  # a bug here must not leave the job 'running' with a live lease
            log.exception("job %s: recording its outcome failed", job_id)
        finally:
            with self._idle:
                self._running.pop(run.key, None)
                self._notify_if_idle()
            self.wake()  # a slot is free

    def _execute(self, run):
        job, ctx = run.job, run.ctx
        try:
            spec = self.registry.get(job.task)
        except UnknownTask as exc:
            return self._fail(run, exc, retryable=False)
        try:
            result = spec.fn(ctx, **job.params)
        except JobCancelled as exc:
            return self._finish(run, State.CANCELLED, error=error_info(exc, False))
        except BaseException as exc:  # anything a task raises ends the job, not the thread
            # SystemExit and KeyboardInterrupt too: signals reach only the main thread, so in
            # a worker they come from the task itself (sys.exit()) and cannot stop the process;
            # giving such a job back would run it again at once, forever.
            return self._fail(run, exc, retryable=True)
        try:
            dumps(result, MAX_DOCUMENT)
        except (TypeError, ValueError) as exc:
            bad = TypeError(f"the task's result cannot be stored as JSON: {exc}")
            return self._fail(run, bad, retryable=False)
        return self._finish(run, State.SUCCEEDED, result=result)

    def _fail(self, run, exc, retryable):
        job = run.job
        spec = self.registry.tasks.get(job.task)
        failures = job.attempts - job.crashes
        error = error_info(exc)
        if retryable and spec is not None and failures <= job.max_retries and not run.ctx.cancelled:
            delay = backoff_seconds(spec.retry_backoff, spec.retry_backoff_max, failures)
            log.info("job %s failed (%s); retry %d of %d in %.1f s", job.id, error["type"],
                     failures, job.max_retries, delay)
            event = JobEvent.state_changed(job.id, State.QUEUED, error_type=error["type"], task=job.task,
                                           action=Action.RETRY_LATER, run_seconds=run.elapsed())
            return self._record(run, lambda on_done: self.journal.requeue(
                job.id, job.lease_token, int(delay * 1000), error, on_done=on_done), event)
        log.info("job %s failed: %s: %s", job.id, error["type"], error["message"])
        return self._finish(run, State.FAILED, error=error)

    def _finish(self, run, state, result=None, error=None):
        self._record(run, *self._finish_write(run, state, result, error))

    def _finish_write(self, run, state, result=None, error=None):
        """(write, event) of a finish, for _record."""
        job = run.job
        callback = job.callback_url is not None  # the journal writes its delivery, same transaction
        event = JobEvent.state_changed(job.id, state, error_type=None if error is None else error["type"],
                                       callback="pending" if callback else None, task=job.task,
                                       action=Action.FINISH, run_seconds=run.elapsed())
        return (lambda on_done: self.journal.finish(
            job.id, job.lease_token, state, result=result, error=error, callback=callback,
            on_done=on_done), event)

    # --- recording outcomes -----------------------------------------------------------
    def _record(self, run, write, event, delay=0.05, ticket=None):
        """Queue an outcome write without holding the worker thread.

        `write(on_done)` queues it in the journal's next group commit; once committed,
        `event` is sent. An outcome is never dropped: a write that failed is tried again
        by the dispatcher with backoff (the journal unreachable, or anything unforeseen);
        one the journal refuses for good is replaced by a finish `failed` with an
        OutcomeRefused error; one fenced out (LeaseLost) belongs to another run now. At
        shutdown an unwritten outcome is left to recovery."""
        job_id, ticket = run.job.id, ticket or object()
        with self._lock:
            self._finishing[ticket] = run  # kept through retries: its lease is still renewed

        def on_done(_result, error):
            if error is None:
                return self._settle(ticket, event)
            if isinstance(error, LeaseLost):
                log.warning("job %s: outcome not recorded, the run no longer holds the job", job_id)
                return self._settle(ticket, None)
            if self._abandon.is_set() or isinstance(error, ServerClosed):
                log.error("job %s: outcome not recorded (%s); the job will be recovered", job_id, error)
                return self._settle(ticket, None)
            if isinstance(error, WriteRefused):
                return self._replace_refused(run, ticket, error)
            log.warning("job %s: outcome not recorded (%s); retrying in %.1f s", job_id, error, delay)
            with self._lock:
                self._retries.append((time.monotonic() + delay, run, write, event,
                                      min(delay * 2, 5.0), ticket))
            self._wake.set()
            return None
        try:
            write(on_done)
        except WriteRefused as exc:  # refused up front: the same as refused at commit
            on_done(None, exc)
        except ServerClosed:
            log.error("job %s: outcome not recorded, the journal is closed; it will be recovered", job_id)
            self._settle(ticket, None)

    def _replace_refused(self, run, ticket, error):
        """The journal refused an outcome for good (it would be refused on every retry): end
        the job `failed` with an OutcomeRefused error and no result instead, written by the
        dispatcher as a retry is. If that is refused too, the job is left to recovery."""
        job_id = run.job.id
        if isinstance(ticket, _Replacement):
            log.error("job %s: the journal refused its OutcomeRefused finish too (%s); "
                      "the job will be recovered", job_id, error)
            return self._settle(ticket, None)
        log.error("job %s: the journal refused its outcome (%s); failing it with OutcomeRefused",
                  job_id, error)
        # the reason is the journal's own words about this job's data (too large, malformed)
        info = {"type": "OutcomeRefused",
                "message": f"the journal refused to store this job's outcome: {error}"[:MAX_MESSAGE]}
        write, event = self._finish_write(run, State.FAILED, error=info)
        replacement = _Replacement()
        with self._lock:
            self._finishing[replacement] = run
            self._finishing.pop(ticket, None)
            self._retries.append((time.monotonic(), run, write, event, 0.05, replacement))
        self._wake.set()
        return None

    def _settle(self, ticket, event):
        with self._idle:
            self._finishing.pop(ticket, None)
            self._notify_if_idle()
        if event is not None:
            self._emit(event)

    def _retry_outcomes(self):
        now = time.monotonic()
        with self._lock:
            due = [r for r in self._retries if r[0] <= now]
            self._retries = [r for r in self._retries if r[0] > now]
        for _due, run, write, event, delay, ticket in due:
            self._record(run, write, event, delay, ticket)

    def _emit(self, event):
        """Tell the listener; a listener's bug must not stop the pool."""
        if self._listener is None:
            return
        try:
            self._listener(event)
        except Exception:
            log.exception("job %s: event listener failed", event.job_id)
