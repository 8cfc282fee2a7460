"""Every Redis key easel uses, and the defaults of its Redis parts, in one place.

A key is ``<prefix><name>``: several easel deployments (or test runs) share one Redis
under different prefixes. The default prefix carries a hash tag (``{easel}``) so that
every key of one deployment lives in one cluster slot; easel targets a single primary.
The Lua scripts get these names from here (``store/_redis_lua.py`` builds its prelude
from them), so the Python and Lua sides can never disagree on a name.
"""

from __future__ import annotations

VERSION = "0.1.0"
"""easel's version: the package, the API's ``/health`` and every PNG's infotext."""

DEFAULT_PREFIX = "{easel}:"

# -- the job records ------------------------------------------------------------------
JOB = "job:"
"""Hash per job: the request JSON and the fields that change (state, attempts, lease...)."""
JOB_NOTE = "note:"
"""Field prefix in a job's hash for an annotation (``note:webhook``): it expires with the job."""
ALL = "all"
"""Zset: every job by arrival number (listing, newest first)."""
USER = "user:"
"""Zset per user: its jobs by arrival number."""
SERVICE = "service:"
"""Zset per service: its jobs by arrival number (what a service token may list)."""
STATE = "state:"
"""Zset per state: jobs in that state by arrival number."""
FINISHED = "finished"
"""Zset: finished jobs by finish time; the retention sweep reads it."""
IDEMPOTENCY = "idem:"
"""String per (user, Idempotency-Key): the job it made; expires."""
ACTIVE = "active"
"""Hash: user -> queued + running jobs (the per-user cap)."""
COUNTS = "counts"
"""Hash: ``queued`` (fair queue + delayed retries: the global cap)."""
LEASES = "leases"
"""Zset: running jobs by lease expiry (Redis server time)."""
DELAYED = "delayed"
"""Zset: jobs put back with a backoff, by the time they may run again."""

# -- the fair queue (the state of ``easel.queue.scheduler.FairQueue``) ---------------------------
TIERS = "tiers"
"""Zset: tiers that hold queued jobs, scored by priority."""
TIER = "tier:"
"""Zset per tier: its queued jobs by start tag; member = 16-digit sequence + job id."""
ROUTE = "route:"
"""Zset per tier and route (``route:<tier>:<backend>``): the same members, one route."""
TIER_STATE = "tierstate:"
"""Hash per tier: ``clock`` (virtual time) and ``cost`` (summed cost of its jobs)."""
FINISH = "finish:"
"""Hash per tier: user -> finish tag of its last job."""
WAITING = "waiting"
"""Zset: queued jobs below the top tier by enqueue time (aging); same members as TIER."""
SCHED = "sched"
"""Hash: ``seq`` (tag order counter), ``jobs`` (arrival counter), ``starving``, ``since``."""
QUEUED_USERS = "queued_users"
"""Hash: user -> jobs in the fair queue (``GET /v1/queue``)."""
ROUTE_COST = "route_cost"
"""Hash: route (backend) -> queued work in cost units (the router's outstanding work)."""

# -- measured times (ETAs) ---------------------------------------------------------------
TIMINGS = "timings"
"""Hash: ``<kind>|<key>`` -> JSON list of the last samples (seconds), oldest first."""
TIMINGS_VERSION = "timings:version"
"""String: a counter raised by every sample recorded (readers reload when it moves)."""
LEADER = "leader:"
"""String per duty (``leader:etas``): the process that does it for the deployment now;
expires unless renewed."""

# -- settings users chose ---------------------------------------------------------------
SETTINGS = "settings:"
"""Hash per scope (``settings:<service>``): key -> value (``JobStore.put_setting``)."""

# -- events and workers ---------------------------------------------------------------
EVENTS = "events"
"""Stream: every event of every job; stream ids are the event ids."""
EVENT_COUNTER = "events:last"
"""String: the last event id given (ids keep growing even if Redis lost its data)."""
TOPIC_EVENTS = "events:type:"
"""Stream per event type in TOPICS: the same entries, for processes that need only those."""
TOPICS = ("cancelled", "queued")
"""What worker processes listen to (cancel a running job, wake when work arrives): they
read these small streams instead of every event of every job."""
TOPIC_MAXLEN = 10_000
JOB_EVENTS = "events:job:"
"""Stream per job: the same entries with the same ids, so a job's replay is cheap."""
WEBHOOK_GROUP = "webhooks"
"""Consumer group on EVENTS: each event goes to one API replica's webhook sender."""
WEBHOOK_RETRY = "webhooks:retry"
"""Zset: deliveries waiting for a retry (or leased by a sender), by when they are due."""
WEBHOOK_DATA = "webhooks:data"
"""Hash: delivery id -> its event and the POSTs made so far (the retry zset's members)."""
WEBHOOK_STATE = "webhooks:job:"
"""Hash per job: its webhook's counters (events, attempts, dead letters, last error)."""
WORKERS = "workers"
"""Zset: worker id -> last heartbeat (Redis server time)."""
WORKER = "worker:"
"""Hash per worker: what it serves and what it runs; expires when it stops beating."""

# -- defaults -------------------------------------------------------------------------
SEQ_OFFSET = 10**15
"""Added to tag sequence numbers (negative for jobs put back first) to sort as text."""
SEQ_WIDTH = 16
EVENT_STREAM_MAXLEN = 100_000
"""About this many recent events are kept for resuming (``XADD MAXLEN ~``)."""
JOB_EVENTS_TTL_SECONDS = 24 * 3600
RETENTION_SECONDS = 7 * 24 * 3600.0
"""Finished job records are deleted this long after they end."""
RECORD_GRACE_SECONDS = 24 * 3600
"""A finished record's hash expires this long after the sweep should have removed it."""
SWEEP_LIMIT = 1000
"""Expired leases / finished records handled per store call; the rest on the next one."""
IDEMPOTENCY_TTL_SECONDS = 24 * 3600
WORKER_TTL_BEATS = 3
"""A worker missing this many heartbeats is no longer listed."""
SOCKET_TIMEOUT_SECONDS = 5.0
CONNECT_TIMEOUT_SECONDS = 2.0
READ_BLOCK_MS = 1000
"""How long one ``XREAD BLOCK`` waits before it is sent again."""

INLINE_CONTENT_MAX_BYTES = 8 * 1024 * 1024
"""Result files put in a succeeded event (``include_images``), at most, in all; above it
the event carries their URLs only."""

MAX_QUERY_BYTES = 4096
"""A URL's query string, at most (HTTP and websocket handshakes): 414 ``query_too_long``
above it. easel's own queries are short (filters, a token); this keeps a request line well
under the websocket handshake parser's 8 KiB line."""

SHUTDOWN_STRAGGLERS_SECONDS = 3
"""``easel serve`` on SIGTERM: after the grace period for running jobs and the end of every
event stream, connections still open get this long before uvicorn cancels them."""

MAX_EVENT_ID = 2**63 - 1
"""The largest event id a client may resume after (``after``, ``Last-Event-ID``): ids are
64-bit everywhere (Redis stream ids too); a negative or larger one is a 422."""
