"""What the journal keeps of a JobEvent: one row of the events table, and back.

A row holds the job's id, its per-job sequence number (1, 2, 3, ... in the order the
job's changes committed), the kind (state, progress, step, callback) and the event's
other fields as a compact JSON object. The journal writes a row in the same transaction
as the change it reports (journal.py); the streams read them back (streams.py), from
any process sharing the journal.

The `data_*` functions make the stored JSON text. They run inside the journal's write
transactions, three times per job at least (queued, running, ended): the common texts
are made once, here, not encoded per event.
"""
import json
from typing import NamedTuple

from .codec import dumps
from .model import TERMINAL, EventKind, JobEvent, State

__all__ = ["EventRow", "data_state", "data_progress", "data_step", "data_callback",
           "to_job_event", "public_data", "ends_job", "MAX_PROGRESS_TEXT"]

#: a progress note longer than this (as JSON) is cut in its event: the job's own progress
#: column keeps it whole, the stream carries the numbers and the start of the message
MAX_PROGRESS_TEXT = 2048
MAX_EVENT_MESSAGE = 500


class EventRow(NamedTuple):
    """One journaled event. `id` orders every job's events (journal-wide, assigned at
    insert); `seq` orders one job's events, without gaps, in commit order. Read with
    its job (Journal.events_after(scoped=True)), it also carries the job's owner, task and
    state now (None if the job is gone)."""
    id: int
    job_id: str
    seq: int
    kind: str
    data: str  # a JSON object: the JobEvent's fields that are set, but kind and job_id
    owner: str | None = None
    task: str | None = None
    job_state: str | None = None


_STATE_ONLY = {state: dumps({"state": state.value}) for state in State}


_RUNNING = {attempt: dumps({"attempt": attempt, "state": State.RUNNING.value}) for attempt in range(1, 33)}


def data_state(state: State, attempt: int | None = None, error_type: str | None = None,
               callback: str | None = None) -> str:
    """The stored fields of a state event (JobEvent.state_changed's)."""
    if error_type is None and callback is None:
        if attempt is None:
            return _STATE_ONLY[state]
        if state is State.RUNNING and attempt in _RUNNING:
            return _RUNNING[attempt]
    fields = {"state": state.value}
    if attempt is not None:
        fields["attempt"] = attempt
    if error_type is not None:
        fields["error_type"] = error_type
    if callback is not None:
        fields["callback"] = callback
    return dumps(fields)


def data_progress(note_text: str) -> str:
    """The stored fields of a progress event, from the note's JSON text as the journal
    stores it in the job's row; a long note is cut to its numbers and a short message."""
    if len(note_text) <= MAX_PROGRESS_TEXT:
        return '{"progress":' + note_text + "}"
    note = json.loads(note_text)
    short = {"done": None, "total": None, "message": None}
    if isinstance(note, dict):
        for name in ("done", "total"):
            value = note.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                short[name] = value
        message = note.get("message")
        if isinstance(message, str):
            short["message"] = message[:MAX_EVENT_MESSAGE]
    return dumps({"progress": short})


def data_step(name: str, step_state: str) -> str:
    """The stored fields of a step event: the step's name and its state."""
    return dumps({"step": name, "step_state": step_state})


def data_callback(state: str, attempts: int) -> str:
    """The stored fields of a callback event: the delivery's state and attempts so far."""
    return dumps({"callback": state, "callback_attempts": attempts})


def to_job_event(row: EventRow) -> JobEvent:
    """The JobEvent a row holds (the one the process that wrote it told its listeners)."""
    fields = json.loads(row.data)
    kind = EventKind(row.kind)
    if kind is EventKind.STATE:
        return JobEvent.state_changed(row.job_id, State(fields["state"]),
                                      attempt=fields.get("attempt"),
                                      error_type=fields.get("error_type"),
                                      callback=fields.get("callback"))
    if kind is EventKind.PROGRESS:
        return JobEvent.progressed(row.job_id, fields["progress"])
    if kind is EventKind.STEP:
        return JobEvent.step_changed(row.job_id, fields["step"], fields["step_state"])
    return JobEvent.callback_attempted(row.job_id, fields["callback"], fields["callback_attempts"])


def public_data(row: EventRow) -> str:
    """The `data:` of a row's SSE event: its fields with `job_id` and `seq` in front, as one
    line of JSON (built around the stored text, which is never decoded here)."""
    head = f'{{"job_id":"{row.job_id}","seq":{row.seq}'  # an id is [A-Za-z0-9_-]: no escaping
    return head + "}" if row.data == "{}" else head + "," + row.data[1:]


def ends_job(row: EventRow) -> bool:
    """True for a state event into a terminal state (a job's stream ends after it)."""
    return row.kind == "state" and _STATES.get(json.loads(row.data).get("state")) in TERMINAL


_STATES = {state.value: state for state in State}
