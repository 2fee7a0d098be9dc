"""The `jobserver` command: serve, worker, the HTTP client commands, token and callback-secret.

All process wiring lives here: argparse, JOBSERVER_* variables, logging, waitress and
signal handlers. Every server flag has an environment twin (`--db` / `JOBSERVER_DB`);
a flag beats its variable, which beats the Config default."""
import _thread
import argparse
import json
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass

from .auth import create_token, is_loopback_host
from .callbacks import signing_secret
from .client import TERMINAL, Client, ClientError, ProblemError, RemoteJobError
from .config import Config
from .errors import JobserverError, JournalUnavailable
from .http import create_app
from .httpserver import create_http_server, raise_open_file_limit
from .journal import open_journal, root_cause
from .redact import mask_url
from .server import JobServer

log = logging.getLogger("jobserver")

DEFAULT_URL = "http://127.0.0.1:8080"
EXIT_USAGE = 2


def _words(text):
    """A list flag's env twin: words separated by commas or spaces."""
    return tuple(w for w in text.replace(",", " ").split() if w)


def _boolean(text):
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _optional_int(text):
    return None if str(text).strip().lower() in ("none", "") else int(text)


@dataclass(frozen=True)
class Flag:
    """A server flag, the Config field it fills, and how to parse it (its env twin likewise)."""
    name: str
    parse: object = str
    help: str = ""
    many: bool = False
    switch: bool = False

    @property
    def field(self):
        return self.name.replace("-", "_")

    @property
    def env(self):
        return "JOBSERVER_" + self.field.upper()


POOL_FLAGS = (
    Flag("db", help="journal URL: sqlite:///path or mysql://user:pw@host:3306/name"),
    Flag("workers", int, "worker threads running jobs"),
    Flag("tasks", help="modules to import for their @task functions (the current directory first)",
         many=True),
    Flag("lease-seconds", float, "seconds a claimed job stays reserved without a heartbeat"),
    Flag("poll-interval", float, "seconds between looks for jobs other processes added"),
    Flag("shutdown-grace", float, "seconds running jobs get to finish at shutdown"),
    Flag("max-queued", _optional_int, "refuse submits (429) above this many queued jobs; none: no bound"),
    Flag("callback-allow", help="CIDRs a callback URL may resolve to although not public", many=True),
    Flag("callback-secret", help="Standard Webhooks signing secret (whsec_...)"),
    Flag("callback-attempts", int, "callback delivery attempts"),
    Flag("callback-backoff", float, "fixed seconds between callback attempts"),
)
HTTP_FLAGS = (
    Flag("host", help="address to bind"),
    Flag("port", int, "port to bind"),
    Flag("threads", int, "waitress threads serving HTTP"),
    Flag("max-connections", int, "HTTP connections open at once (lowered to fit the open-file limit)"),
    Flag("idle-timeout", float, "seconds a connection may stay idle between requests"),
    Flag("header-timeout", float, "seconds a client has to send a request's line and headers"),
    Flag("body-timeout", float, "seconds a client has to send a whole request, body included"),
    Flag("insecure-open", _boolean, "allow a non-loopback host with no tokens (open mode)", switch=True),
    Flag("cors-origin", help="a web origin (scheme://host[:port]) whose pages may call the API "
         "from a browser; repeatable", many=True),
    Flag("stream-slots", int, "event streams open at once (served by as many more waitress threads)"),
    Flag("stream-lifetime", float, "seconds an event stream stays open before the client resumes"),
    Flag("stream-ping", float, "seconds of silence before an event stream sends a ping"),
)


def add_flags(parser, flags):
    for flag in flags:
        help_text = f"{flag.help} (env {flag.env})"
        if flag.switch:
            parser.add_argument("--" + flag.name, action="store_const", const=True,
                                default=argparse.SUPPRESS, help=help_text)
        elif flag.many:  # `--x A B` and `--x A --x B` alike
            parser.add_argument("--" + flag.name, nargs="+", action="extend", default=argparse.SUPPRESS,
                                metavar="VALUE", help=help_text)
        else:
            parser.add_argument("--" + flag.name, type=flag.parse, default=argparse.SUPPRESS,
                                metavar=flag.field.split("_")[-1].upper(), help=help_text)


def build_config(args, flags, environ):
    """A Config from the parsed flags, else JOBSERVER_* variables, else the defaults."""
    changes = {}
    for flag in flags:
        if hasattr(args, flag.field):  # flags default to SUPPRESS: present only when given
            value = getattr(args, flag.field)
        elif flag.env in environ:
            text = environ[flag.env]
            try:
                value = _words(text) if flag.many else flag.parse(text)
            except ValueError as exc:
                raise SystemExit(f"jobserver: error: {flag.env}={text!r}: {exc}") from None
        else:
            continue
        changes[flag.field] = tuple(value) if flag.many else value
    return Config().with_(**changes)


class GracefulExit:
    """SIGTERM/SIGINT once: stop the job server in a thread (refuse work, let running jobs
    finish, give the rest back), then wake the main thread to close HTTP. Twice: exit now."""

    def __init__(self, server, wake_main):
        self.server = server
        self.wake_main = wake_main
        self.stopping = False
        self.stopped = threading.Event()

    def install(self):
        signal.signal(signal.SIGTERM, self.handle)
        signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum, _frame):
        if self.stopped.is_set():
            raise SystemExit(0)  # our own wake-up once the job server has stopped
        if self.stopping:
            log.warning("second signal: exiting at once")
            os._exit(128 + signum)
        self.stopping = True
        log.info("signal %s: stopping (send it again to exit at once)", signum)
        threading.Thread(target=self._stop, name="jobserver-shutdown").start()

    def _stop(self):
        try:
            self.server.stop()
        except Exception:  # stop must end the process even if closing the journal fails
            log.exception("stopping the job server failed")
        finally:
            self.stopped.set()
            self.wake_main()


def _make_server(config):
    """JobServer for `config` whose journal takes writes, or SystemExit with a readable message."""
    try:
        server = JobServer(config=config)
    except (JobserverError, ValueError, ImportError) as exc:
        raise SystemExit(f"jobserver: error: {exc}") from None
    try:
        server.journal.writable()  # one tiny transaction: else every submit would be a 503
    except JournalUnavailable as exc:
        server.stop()
        raise SystemExit(f"jobserver: error: {exc} ({root_cause(exc)}): the journal {mask_url(config.db)} "
                         "must be writable by this user (for SQLite, its file and its directory)") from None
    _warn_without_tasks(server, config)
    return server


def _warn_without_tasks(server, config):
    """Say so when this process can run nothing: every submit would be a 422 unknown-task."""
    if not config.tasks:
        log.warning("no task modules given (--tasks MODULE ..., env JOBSERVER_TASKS): this server "
                    "knows no tasks; to try it out, serve the demo ones: --tasks jobserver.demo")
    elif not any(True for _spec in server.registry):
        log.warning("the task modules %s registered no tasks (with @task)", " ".join(config.tasks))


def _import_from_cwd():
    """Let --tasks name a module in the current directory, as `flask --app` and `celery -A`
    do: a console script's sys.path starts with its own bin directory, not the cwd."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)


def serve(config):
    """Serve the HTTP API with waitress and run the pool in this process until a signal."""
    server = _make_server(config)
    refusal = _open_mode_refusal(server, config)
    if refusal:
        server.stop()
        print(f"jobserver: error: {refusal}", file=sys.stderr)
        return EXIT_USAGE
    open_files = raise_open_file_limit()  # thousands of connections need more than 1,024
    try:
        # waitress buffers a whole body before the app sees it: bound that too, well above
        # max_body so that ordinary oversize bodies still get the app's problem+json 413
        # streams hold a thread each for minutes: they get threads of their own
        http = create_http_server(create_app(server), host=config.host, port=config.port,
                                  threads=config.threads + config.stream_slots, ident="jobserver",
                                  max_request_body_size=max(4 * config.max_body, 8 * 1024 * 1024),
                                  max_connections=config.max_connections,
                                  idle_timeout=config.idle_timeout,
                                  header_timeout=config.header_timeout,
                                  body_timeout=config.body_timeout)
    except ValueError as exc:
        server.stop()
        print(f"jobserver: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        server.stop()
        print(f"jobserver: error: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr)
        return 1
    limit = http.adj.connection_limit
    if limit < config.max_connections:
        log.warning("serving at most %s connections, not %s: the open-file limit is %s",
                    limit, config.max_connections, open_files)
    server.start()
    GracefulExit(server, lambda: _thread.interrupt_main(signal.SIGINT)).install()
    host = f"[{config.host}]" if ":" in config.host else config.host
    log.info("jobserver serving http://%s:%s journal %s workers %s",
             host, http.effective_port, mask_url(config.db), config.workers)
    try:
        http.run()
    finally:
        http.close()
        server.stop()  # a no-op after a signal; otherwise the pool's threads would keep us alive
    return 0


def _open_mode_refusal(server, config):
    """Why serving `config.host` must be refused (open mode on a public address), or None."""
    if config.insecure_open or is_loopback_host(config.host):
        return None
    try:
        if server.journal.has_tokens():
            return None
    except JobserverError as exc:
        return f"cannot read tokens from the journal: {exc}"
    return (f"refusing to serve {config.host} in open mode (no tokens): create one with "
            "`jobserver token create NAME`, or pass --insecure-open")


def worker(config):
    """Run the pool without HTTP until a signal."""
    server = _make_server(config)
    server.start()
    done = threading.Event()
    GracefulExit(server, done.set).install()
    log.info("jobserver worker journal %s workers %s", mask_url(config.db), config.workers)
    while not done.wait(1.0):
        pass
    return 0


def parse_assignments(pairs, json_text=None):
    """`key=value` words (values parsed as JSON when they parse, else kept as strings),
    on top of a `--json` object."""
    params = {}
    if json_text is not None:
        try:
            params = json.loads(json_text)
        except ValueError as exc:
            raise SystemExit(f"jobserver: error: --json is not JSON: {exc}") from None
        if not isinstance(params, dict):
            raise SystemExit("jobserver: error: --json must be a JSON object")
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"jobserver: error: expected key=value, got {pair!r}")
        try:
            params[key] = json.loads(text)
        except ValueError:
            params[key] = text
    return params


def _print_json(value):
    print(json.dumps(value, indent=2, ensure_ascii=False))


class ProgressLine:
    """What `--wait` shows while the job runs: its state, done/total and current step. On a
    terminal, one line rewritten in place (`\r`); elsewhere a plain line per change, on
    stderr (stdout keeps only the job's JSON, for pipes)."""

    def __init__(self, out, live):
        self.out = out
        self.live = live
        self.shown = None
        self.state, self.progress, self.step = None, None, None

    def update(self, event):
        data = event.data
        if event.kind == "snapshot":
            self.state, self.progress = data.get("state"), data.get("progress")
            running = [s["name"] for s in data.get("steps") or () if s.get("state") == "running"]
            self.step = running[-1] if running else None
        elif event.kind == "state":
            self.state = data.get("state")
        elif event.kind == "progress":
            self.progress = data.get("progress")
        elif event.kind == "step":
            self.step = data.get("step") if data.get("step_state") == "running" else None
        self.show()

    def text(self):
        parts = [self.state or "?"]
        progress = self.progress if isinstance(self.progress, dict) else {}
        done, total = progress.get("done"), progress.get("total")
        if done is not None:
            parts.append(f"{done}/{total}" if total is not None else f"{done}")
        if self.step:
            parts.append(f"[{self.step}]")
        if progress.get("message"):
            parts.append(str(progress["message"])[:60])
        return " ".join(str(p) for p in parts)

    def show(self):
        text = self.text()
        if text == self.shown:
            return
        self.shown = text
        if self.live:
            self.out.write("\r" + text + "\x1b[K")  # back to the line's start, clear the rest
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def close(self):
        if self.live and self.shown is not None:
            self.out.write("\n")
            self.out.flush()


def follow(client, handle, seconds):
    """Show the job's progress (ProgressLine) until it ends or `seconds` pass (None: no
    limit), from its event stream; a server without one is long-polled instead."""
    live = sys.stdout.isatty()
    line = ProgressLine(sys.stdout if live else sys.stderr, live)
    try:
        for event in handle.events(timeout=seconds):
            line.update(event)
    except ProblemError as exc:
        if exc.status not in (404, 405) or exc.type != "about:blank":
            raise  # the job is gone, or the caller may not see it: say so
        try:
            handle.wait(seconds)  # a server without event streams
        except TimeoutError:
            pass  # the caller says what a job still running after `seconds` means
    finally:
        line.close()
    return handle.refresh()


def cmd_submit(client, args):
    params = parse_assignments(args.params, args.json)
    options = {"priority": args.priority, "delay": args.delay, "max_retries": args.max_retries,
               "timeout": args.time_limit, "idempotency_key": args.idempotency_key,
               "callback_url": args.callback_url}
    handle = client.submit_with(args.task, params, **options)
    if args.wait is None:
        _print_json(handle.job)
        return 0
    seconds = None if args.wait < 0 else args.wait
    follow(client, handle, seconds)
    if handle.job["state"] not in TERMINAL:
        raise TimeoutError(f"job {handle.id} is still {handle.job['state']} after {seconds} s")
    _print_json(handle.job)
    return 0 if handle.job["state"] == "succeeded" else 1


def cmd_status(client, args):
    if not args.wait or args.wait <= 0:
        _print_json(client.get(args.id))
        return 0
    _print_json(follow(client, client.handle(args.id), args.wait).job)
    return 0


def cmd_list(client, args):
    jobs, cursor = client.list(state=args.state, task=args.task, limit=args.limit, cursor=args.cursor)
    _print_json({"jobs": jobs, "next": cursor})
    return 0


def cmd_cancel(client, args):
    _print_json(client.cancel(args.id))
    return 0


def cmd_retry(client, args):
    _print_json(client.retry(args.id))
    return 0


def run_client_command(args, environ):
    """Run a command that talks HTTP; errors go to stderr with a non-zero exit."""
    url = args.url or environ.get("JOBSERVER_URL") or DEFAULT_URL
    token = args.token or environ.get("JOBSERVER_TOKEN")
    try:
        client = Client(url, token=token, timeout=args.http_timeout)
    except ValueError as exc:
        print(f"jobserver: error: --url / JOBSERVER_URL: {exc}", file=sys.stderr)
        return 1
    with client:
        try:
            return args.run(client, args)
        except (ClientError, RemoteJobError, TimeoutError) as exc:
            detail = getattr(exc, "detail", None) or str(exc)
            print(f"jobserver: error: {detail}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130


def cmd_token_create(args, environ):
    """Print a new token on stdout (alone, for scripts) and say on stderr which journal has it."""
    config = build_config(args, POOL_FLAGS[:1], environ)

    def create(journal):
        return create_token(journal, args.name, admin=args.admin), _journal_place(journal, config)
    try:
        token, place = with_journal(config, create)
    except (JobserverError, ValueError) as exc:
        print(f"jobserver: error: {exc}", file=sys.stderr)
        return 1
    kind = "an admin token" if args.admin else "a token"
    print(f"jobserver: {kind} for {args.name} is in the journal {place}", file=sys.stderr)
    print(token)
    return 0


def _journal_place(journal, config):
    """The journal as a user should see it: its URL, masked, and a SQLite file's full path
    (a relative sqlite:/// URL lands wherever the command ran)."""
    path = getattr(journal.driver, "path", None)
    url = mask_url(config.db)
    return f"{url} ({os.path.abspath(path)})" if path else url


def with_journal(config, fn):
    """`fn(journal)` on the configured journal, closed afterwards."""
    journal = open_journal(config.db)
    try:
        return fn(journal)
    finally:
        journal.close()


def cmd_callback_secret(args, environ):
    """Print the callback signing secret (made and kept in the journal on first use)."""
    config = build_config(args, POOL_FLAGS, environ)
    try:
        print(with_journal(config, lambda journal: signing_secret(journal, config)))
    except (JobserverError, ValueError) as exc:
        print(f"jobserver: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _client_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help=f"server URL (env JOBSERVER_URL, default {DEFAULT_URL})")
    common.add_argument("--token", help="bearer token (env JOBSERVER_TOKEN)")
    common.add_argument("--http-timeout", type=float, default=10.0, help="seconds per request")
    return common


def _add_client_commands(sub):
    common = _client_parser()
    p = sub.add_parser("submit", parents=[common], help="submit a job")
    p.add_argument("task")
    p.add_argument("params", nargs="*", metavar="key=value", help="values are JSON when they parse")
    p.add_argument("--json", help="params as a JSON object (key=value words go on top)")
    p.add_argument("--wait", type=float, nargs="?", const=-1.0, default=None, metavar="S",
                   help="wait for the job to end (up to S seconds); exit 1 unless it succeeded")
    p.add_argument("--priority", type=int)
    p.add_argument("--delay", type=float, help="seconds before the job may run")
    p.add_argument("--max-retries", type=int)
    p.add_argument("--time-limit", type=float, help="the job's timeout in seconds")
    p.add_argument("--idempotency-key")
    p.add_argument("--callback-url")
    p.set_defaults(run=cmd_submit)
    p = sub.add_parser("status", parents=[common], help="show a job")
    p.add_argument("id")
    p.add_argument("--wait", type=float, metavar="S", help="hold up to S seconds for it to end")
    p.set_defaults(run=cmd_status)
    p = sub.add_parser("list", parents=[common], help="list jobs, newest first")
    p.add_argument("--state")
    p.add_argument("--task")
    p.add_argument("--limit", type=int)
    p.add_argument("--cursor")
    p.set_defaults(run=cmd_list)
    for name, fn in (("cancel", cmd_cancel), ("retry", cmd_retry)):
        p = sub.add_parser(name, parents=[common], help=f"{name} a job")
        p.add_argument("id")
        p.set_defaults(run=fn)


def build_parser():
    parser = argparse.ArgumentParser(prog="jobserver", description="A durable job server.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="serve the HTTP API and run jobs")
    add_flags(p, POOL_FLAGS + HTTP_FLAGS)
    p = sub.add_parser("worker", help="run jobs without HTTP")
    add_flags(p, POOL_FLAGS)
    _add_client_commands(sub)
    token = sub.add_parser("token", help="manage bearer tokens").add_subparsers(dest="action", required=True)
    p = token.add_parser("create", help="create a token and print it once")
    p.add_argument("name")
    p.add_argument("--admin", action="store_true", help="may see and control every owner's jobs")
    add_flags(p, POOL_FLAGS[:1])
    p = sub.add_parser("callback-secret", help="print the callback signing secret")
    add_flags(p, (POOL_FLAGS[0],) + tuple(f for f in POOL_FLAGS if f.name == "callback-secret"))
    return parser


def main(argv=None, environ=None):
    """Entry point of the `jobserver` command; returns the exit status."""
    environ = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    if args.command in ("serve", "worker"):
        _import_from_cwd()
        logging.basicConfig(level=environ.get("JOBSERVER_LOG_LEVEL", "INFO").upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        # waitress warns on every request that waits for a thread: under load that is a
        # log line (and a handler lock) per request, which halved throughput
        logging.getLogger("waitress.queue").setLevel(logging.ERROR)
        if args.command == "serve":
            return serve(build_config(args, POOL_FLAGS + HTTP_FLAGS, environ))
        return worker(build_config(args, POOL_FLAGS, environ))
    if args.command == "token":
        return cmd_token_create(args, environ)
    if args.command == "callback-secret":
        return cmd_callback_secret(args, environ)
    return run_client_command(args, environ)
