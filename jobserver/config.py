"""Configuration: one frozen dataclass with documented defaults.

Only `cli.main()` reads the command line and JOBSERVER_* variables to fill it;
everything else is handed a Config."""
from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class Config:
    #: journal URL: sqlite:///path (default) or mysql://user:pw@host:3306/db
    db: str = "sqlite:///jobserver.db"
    #: worker threads running jobs in this process
    workers: int = 8
    #: how long a claimed job stays reserved without a heartbeat (renewed every third of it)
    lease_seconds: float = 30.0
    #: how often to look for jobs that other processes added
    poll_interval: float = 0.5
    #: seconds running jobs get to finish at shutdown before they are given back
    shutdown_grace: float = 10.0
    #: a job whose process died this many times while running it fails with WorkerLost
    max_crashes: int = 3
    #: submits are refused with 429 while this many jobs are queued (None: no bound)
    max_queued: int | None = 100_000
    #: jobs in one batch submit
    max_batch: int = 1000
    #: bytes in a request body (HTTP 413 above)
    max_body: int = 1024 * 1024
    #: longest ?wait= a client may ask for, in seconds
    max_wait: float = 60.0
    #: HTTP: address, port and waitress threads
    host: str = "127.0.0.1"
    port: int = 8080
    threads: int = 32
    #: HTTP connections open at once (lowered to fit the open-file limit; more wait to be accepted)
    max_connections: int = 10_000
    #: seconds a connection may stay open between requests without sending a byte
    idle_timeout: float = 60.0
    #: seconds a client has to send a request's line and headers (from the connect, for the
    #: first request on a connection; from the request's first byte, for later ones)
    header_timeout: float = 10.0
    #: seconds a client has to send a whole request, its body included (counted alike)
    body_timeout: float = 60.0
    #: event streams (GET /events, GET /jobs/{id}/events) open at once; `jobserver serve` runs
    #: this many waitress threads more than `threads`, so that streams never take the API's
    stream_slots: int = 32
    #: seconds a stream stays open (a tenth less at random) before the server closes it
    #: and the client resumes
    stream_lifetime: float = 300.0
    #: seconds of silence after which a stream sends `: ping` (and notices a client gone)
    stream_ping: float = 15.0
    #: serve without tokens on a non-loopback address
    insecure_open: bool = False
    #: task modules to import at start (they register with @task)
    tasks: tuple = ()
    #: Standard Webhooks secret (whsec_...); None: made once and kept in the journal
    callback_secret: str | None = None
    #: CIDRs a callback URL may resolve to although they are not public (tests: 127.0.0.0/8)
    callback_allow: tuple = ()
    #: delivery attempts and, if set, a fixed backoff in seconds instead of the default schedule
    callback_attempts: int | None = None
    callback_backoff: float | None = None
    #: seconds to wait for a callback receiver
    callback_timeout: float = 10.0
    #: delivery threads
    callback_workers: int = 4
    #: stable name for this process's leases (default: host, pid namespace, pid, random)
    node_id: str | None = None
    #: web origins (scheme://host[:port]) whose pages may call the API from a browser (CORS)
    cors_origin: tuple = ()

    def with_(self, **changes):
        """A copy with `changes` (unknown names raise TypeError)."""
        return replace(self, **changes)

    @classmethod
    def names(cls):
        return [f.name for f in fields(cls)]
