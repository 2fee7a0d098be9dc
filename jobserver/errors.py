"""The exceptions jobserver raises, with their data in attributes."""


class JobserverError(Exception):
    """Base class of every error jobserver raises on purpose."""


class JobNotFound(JobserverError):
    """No job with this id is visible to the caller."""

    def __init__(self, job_id):
        super().__init__(f"no job {job_id}")
        self.job_id = job_id


class UnknownTask(JobserverError):
    """The task name is not registered."""

    def __init__(self, task):
        super().__init__(f"unknown task {task!r}")
        self.task = task


class InvalidJob(JobserverError, ValueError):
    """A submitted job is malformed (bad params, options or encoding)."""


class IdempotencyConflict(JobserverError):
    """An idempotency key was reused for a different task or params."""

    def __init__(self, key, job_id):
        super().__init__(f"idempotency key {key!r} already used by job {job_id} with other task or params")
        self.key = key
        self.job_id = job_id


class InvalidTransition(JobserverError):
    """The job is not in a state that allows this action (e.g. cancel a finished job)."""

    def __init__(self, job_id, state, action):
        super().__init__(f"cannot {action} job {job_id}: it is {state}")
        self.job_id = job_id
        self.state = state
        self.action = action


class QueueFull(JobserverError):
    """The queue holds max_queued jobs already; try again later."""

    def __init__(self, limit, retry_after=1):
        super().__init__(f"queue is full ({limit} jobs queued)")
        self.limit = limit
        self.retry_after = retry_after


class JournalUnavailable(JobserverError):
    """The journal database cannot be reached or refused the operation; try again later."""


class JournalRefusesWrites(JournalUnavailable):
    """The journal answers but refuses writes: a read-only file, directory or database
    server, or a full disk. The message is fixed (no path, no driver text); the cause is
    chained for the log."""

    def __init__(self):
        super().__init__("the journal refuses writes")


class ServerClosed(JobserverError):
    """The server is shutting down (or not started) and takes no new work."""


class InvalidCallback(JobserverError, ValueError):
    """A callback URL is not allowed (scheme, credentials, or a non-public address)."""


class TokenExists(JobserverError):
    """A token with this name exists already (names are unique: they own jobs)."""

    def __init__(self, name):
        super().__init__(f"a token named {name} exists")
        self.name = name


class LeaseLost(JobserverError):
    """This worker no longer holds the job's lease; another owner or a state change won."""

    def __init__(self, job_id):
        super().__init__(f"lease on job {job_id} was lost")
        self.job_id = job_id


class JobCancelled(JobserverError):
    """Raised inside a task by ctx.check_cancelled() when a cancel was requested."""


class WriteRefused(JournalUnavailable):
    """The database refused one write for good (a row it will not store, a statement it will
    not take): running it again cannot succeed. The other writes of its transaction commit."""
