"""jobserver: durable background jobs for web frontends, with no broker.

    from jobserver import task, JobServer

    @task(name="reports.build", max_retries=3)
    def build(ctx, month):
        ...

    with JobServer("sqlite:///jobs.db") as server:
        job_id = server.submit("reports.build", {"month": "2026-10"})
"""
from .config import Config
from .errors import (
                     InvalidCallback,
                     InvalidJob,
                     JobCancelled,
                     JobNotFound,
                     JobserverError,
                     JournalUnavailable,
                     ServerClosed,
                     UnknownTask,
)
from .server import JobServer
from .tasks import JobContext, Registry, task

__all__ = ["task", "JobServer", "JobContext", "Registry", "Config", "JobserverError", "JobNotFound",
           "UnknownTask", "InvalidJob", "JournalUnavailable", "ServerClosed", "InvalidCallback",
           "JobCancelled"]
__version__ = "0.1.0"
