"""One provider rate limit for every worker: a paced schedule per (provider, model) in Postgres.

Every process that calls a provider (drain runs, backfill shards, the CLI) takes its next slot from
one row of `autoembed.rate_limits` (sql/010_rate_limit.sql) with one UPDATE, so N workers together
send at most `requests_per_minute` requests and `tokens_per_minute` tokens per minute. A 429 seen
by one worker pauses all of them for its Retry-After. With no limit configured nothing here runs.

The state lives in the configured database (AUTOEMBED_DATABASE_URL or the embedded server): the
limit belongs to the provider account, not to one drained database. `configure(conninfo)` points
this process elsewhere.
"""

from __future__ import annotations

import email.utils
import threading
import time
from dataclasses import dataclass
from typing import Mapping

import psycopg

from ..config import EmbedderSettings

# A hostile or confused provider must not stop every worker for hours with one header.
MAX_PAUSE_SECONDS = 300.0
# A 429 without Retry-After still pauses everyone briefly (the client backs off on its own too).
DEFAULT_PAUSE_SECONDS = 1.0


class RateLimitError(RuntimeError):
    """The shared limit's state could not be read or written."""


@dataclass(frozen=True)
class RateLimit:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.requests_per_minute or self.tokens_per_minute)

    @classmethod
    def of(cls, settings: EmbedderSettings) -> "RateLimit":
        return cls(settings.requests_per_minute, settings.tokens_per_minute)


# -- where the state lives: one connection per process, shared by its threads ---------------------
_lock = threading.Lock()
_conninfo: str | None = None
_conn: psycopg.Connection | None = None


def configure(conninfo: str | None) -> None:
    """Keep the limit's state in the database at `conninfo` (None: the configured database)."""
    global _conninfo
    with _lock:
        _conninfo = conninfo
        _close()


def _close() -> None:
    global _conn
    if _conn is not None:
        _conn.close()
        _conn = None


def _query(query: str, params: tuple) -> tuple:
    """One statement on the process's limit connection; one reconnect if the server dropped it."""
    global _conn
    with _lock:
        for attempt in (1, 2):
            try:
                if _conn is None or _conn.closed:
                    from ..db.server import database_url

                    _conn = psycopg.connect(_conninfo or database_url(), autocommit=True)
                row = _conn.execute(query, params, prepare=True).fetchone()
                return tuple(row) if row is not None else ()
            except psycopg.OperationalError as exc:
                _close()
                if attempt == 2:
                    raise RateLimitError(f"the shared rate limit's state is unreachable ({str(exc).strip()}); "
                                         "check AUTOEMBED_DATABASE_URL, or unset AUTOEMBED_REQUESTS_PER_MINUTE "
                                         "and AUTOEMBED_TOKENS_PER_MINUTE") from None
            except psycopg.errors.UndefinedFunction:
                raise RateLimitError("the database has no autoembed.rate_limit_acquire: run `autoembed db init`") from None
    raise AssertionError("unreachable")


class Limiter:
    """The shared limit of one provider + model, as seen by this process."""

    def __init__(self, provider: str, model: str, limit: RateLimit,
                 sleep=time.sleep) -> None:
        if not limit.enabled:
            raise ValueError("Limiter needs a requests or tokens per minute limit")
        self.provider, self.model, self.limit = provider, model, limit
        self._sleep = sleep

    def acquire(self, tokens: int = 0) -> float:
        """Wait until one request of `tokens` tokens may be sent; returns the seconds waited."""
        waited = 0.0
        while True:
            asked = time.monotonic()
            wait, reserved = _query(
                "select wait_seconds, reserved from autoembed.rate_limit_acquire(%s, %s, %s, %s, %s)",
                (self.provider, self.model, self.limit.requests_per_minute, self.limit.tokens_per_minute,
                 max(int(tokens), 0)))
            if wait > 0:
                # Until the slot, counted from when it was asked for: the round trip's own delay
                # would otherwise push every request late by a varying amount (bunching them).
                left = asked + wait - time.monotonic()
                if left > 0:
                    self._sleep(left)
                    waited += left
            if not reserved:
                continue  # a pause was on: ask for a slot again now that it is over
            # Another worker may have seen a 429 while this one slept on its slot.
            if wait > 0 and self.paused_for() > 0:
                continue
            return waited

    def pause(self, seconds: float) -> None:
        """Every worker waits `seconds` before its next request (a 429 asked for it)."""
        _query("select autoembed.rate_limit_pause(%s, %s, %s)",
               (self.provider, self.model, min(max(seconds, 0.0), MAX_PAUSE_SECONDS)))

    def paused_for(self) -> float:
        (left,) = _query("select autoembed.rate_limit_paused_for(%s, %s)", (self.provider, self.model))
        return float(left)


def retry_after_seconds(headers: Mapping[str, str], now: float | None = None) -> float:
    """How long a 429 asks to wait: `retry-after-ms`, `retry-after` in seconds or as an HTTP date
    (as the openai client reads them); DEFAULT_PAUSE_SECONDS when absent or unreadable."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return min(max(float(raw_ms) / 1000.0, 0.0), MAX_PAUSE_SECONDS)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw:
        try:
            return min(max(float(raw), 0.0), MAX_PAUSE_SECONDS)
        except ValueError:
            parsed = email.utils.parsedate_tz(raw)
            if parsed is not None:
                seconds = email.utils.mktime_tz(parsed) - (time.time() if now is None else now)
                return min(max(seconds, 0.0), MAX_PAUSE_SECONDS)
    return DEFAULT_PAUSE_SECONDS
