"""One bad row fails alone: the checks and the isolation every write path shares.

Both target shapes (a vector column, a chunk table) and both paths (the drain's settle, a
backfill page) call these, so a row that cannot be written costs only itself:

- check_vectors: each vector of a provider's answer on its own: its length is the column's, every
  component is finite and inside the column type's range (halfvec: +-65504);
- key_problem: a key a message names, against the key column's type (an integer out of range);
- write_isolating: a write that fails is retried in halves (savepoints in the caller's
  transaction) until the rows that fail alone are known; the others are written in the same
  transaction, and each failing row gets the database's error as its reason;
- read_isolating: a read of the rows' input that fails is read again row by row;
- input_lateral / scan_isolating: a whole-table scan (health, coverage) that fails because the
  content function raises for some row is run again catching each row's error (sql/014).

Connection errors, lock waits given up, deadlocks and serialization failures are not a row's
fault: they are raised (the caller retries the whole batch or gives its claims back).
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

import numpy as np
import psycopg
from psycopg import errors

T = TypeVar("T")
R = TypeVar("R")

# The largest finite value of each vector type's components (halfvec: IEEE half; vector: float4).
TYPE_RANGE = {"halfvec": 65504.0, "vector": float(np.finfo(np.float32).max)}
INTEGER_RANGE = {"smallint": (-2**15, 2**15 - 1), "integer": (-2**31, 2**31 - 1), "bigint": (-2**63, 2**63 - 1)}


def check_vectors(vector_type: str, dimensions: int, vectors: Sequence[np.ndarray | None]) -> list[str | None]:
    """Why each vector cannot be stored in a `vector_type(dimensions)` column (None: it can).

    One numpy pass over the whole answer when every vector has the right length (the usual
    case); the message of a bad one names the offending component and value."""
    out: list[str | None] = [None] * len(vectors)
    limit = TYPE_RANGE.get(vector_type, TYPE_RANGE["vector"])
    sized: list[int] = []
    for i, v in enumerate(vectors):
        if v is None:
            continue
        if np.shape(v) != (dimensions,):
            out[i] = f"the vector has {np.size(v)} dimensions, the column {vector_type}({dimensions})"
        else:
            sized.append(i)
    if not sized:
        return out
    matrix = np.asarray([vectors[i] for i in sized], dtype=np.float32)  # (what the provider sent)
    ok = np.isfinite(matrix).all(axis=1)
    if vector_type == "halfvec":  # (a finite float32 is always inside float4's range)
        ok &= (np.abs(matrix) <= limit).all(axis=1)
    for j in np.flatnonzero(~ok).tolist():
        row = matrix[j]
        c = int(np.flatnonzero(~(np.isfinite(row) & (np.abs(row) <= limit)))[0])
        value = row[c]
        if not np.isfinite(value):
            out[sized[j]] = f"component {c} is {float(value)} (not a finite number)"
        else:
            out[sized[j]] = f"component {float(value)!r} (index {c}) is out of {vector_type}'s range (±{limit:g})"
    return out


def key_problem(text: str, key_type: str) -> str | None:
    """Why the key text `text` cannot be a value of `key_type` (None: as far as can be told here;
    other types are checked by Postgres, one key at a time when a batch's cast fails)."""
    bounds = INTEGER_RANGE.get(key_type)
    if bounds is not None:
        try:
            value = int(text)
        except ValueError:
            return f"{text!r} is not an integer"
        if not bounds[0] <= value <= bounds[1]:
            return f"{value} is out of {key_type}'s range ({bounds[0]}..{bounds[1]})"
    return None


# Not a row's fault: raised, so the batch is tried again as a whole (or its claims come back).
NOT_A_ROW = (psycopg.OperationalError, psycopg.InterfaceError, errors.DeadlockDetected,
             errors.LockNotAvailable, errors.SerializationFailure, errors.QueryCanceled)


def row_error(exc: BaseException) -> bool:
    """Whether `exc`, raised by a write of some rows, may be the fault of one of them."""
    return isinstance(exc, psycopg.Error) and not isinstance(exc, NOT_A_ROW)


def describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"


def write_isolating(conn: psycopg.Connection, items: list[T], write: Callable[[list[T]], R],
                    *, check: Callable[[], None] | None = None) -> tuple[list[R], list[tuple[T, str]]]:
    """write(items) inside a savepoint of the caller's transaction. When it fails with an error that
    may be a row's fault, `check()` runs first (it raises when the failure is the target's, e.g. a
    column renamed by a promotion), then the items are written in halves, each in its own
    savepoint, down to single items. Returns (the results of the parts written, [(item, why)] for
    the items that fail alone). The happy path costs one savepoint."""
    results: list[R] = []
    failed: list[tuple[T, str]] = []
    checked = False

    def attempt(part: list[T]) -> None:
        nonlocal checked
        if not part:
            return
        try:
            with conn.transaction():
                results.append(write(part))
            return
        except Exception as exc:
            if not row_error(exc):
                raise
            if not checked and check is not None:
                check()
                checked = True
            if len(part) == 1:
                failed.append((part[0], describe(exc)))
                return
        mid = len(part) // 2
        attempt(part[:mid])
        attempt(part[mid:])

    attempt(list(items))
    return results, failed


def read_isolating(conn: psycopg.Connection, keys: list[str], read: Callable[[list[str]], dict[str, T]],
                   why: Callable[[str, BaseException], str], *, check: Callable[[], None] | None = None,
                   ) -> tuple[dict[str, T], dict[str, str]]:
    """read(keys); when that fails with an error that may be a row's fault (a content function
    raising for one row, a key that is not a value of the key's type), `check()` first (it raises
    when the target itself changed), then each key is read alone: only the rows that fail, fail,
    with why(key, error) as their reason. Nothing is locked; inside a transaction each read is a
    savepoint."""
    in_transaction = conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE

    def one(part: list[str]) -> dict[str, T]:
        if in_transaction:
            with conn.transaction():
                return read(part)
        return read(part)

    try:
        return one(keys), {}
    except Exception as exc:
        if not row_error(exc):
            raise
    if check is not None:
        check()
    rows: dict[str, T] = {}
    unreadable: dict[str, str] = {}
    for key in dict.fromkeys(keys):
        try:
            rows.update(one([key]))
        except Exception as exc:
            if not row_error(exc):
                raise
            unreadable[key] = why(key, exc)
    return rows, unreadable


def cast_problem(conn: psycopg.Connection, key: str, key_type: "psycopg.sql.Composable") -> str | None:
    """Why the text `key` is not a value of `key_type` (None: it is), asked of Postgres."""
    from psycopg import sql

    in_transaction = conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
    try:
        if in_transaction:
            with conn.transaction():
                conn.execute(sql.SQL("select %s::text::{}").format(key_type), (key,))
        else:
            conn.execute(sql.SQL("select %s::text::{}").format(key_type), (key,))
    except Exception as exc:
        if not row_error(exc):
            raise
        return describe(exc)
    return None


# -- scans of a whole table (health, coverage) ------------------------------------------------------
def input_lateral(conn: psycopg.Connection, function_sql: "psycopg.sql.Composable", row: str, safe: bool,
                  ) -> "psycopg.sql.Composable":
    """The lateral `i(input, error)` of a scan over rows aliased `row`: the content function called
    directly (fast: error is always NULL), or, `safe`, through autoembed.try_input (sql/014), which
    catches what it raises for a row (error: its message; input: NULL)."""
    from psycopg import sql

    if not safe:
        return sql.SQL("cross join lateral (select {fn}({row})::text as input, null::text as error) i").format(
            fn=function_sql, row=sql.Identifier(row))
    call = sql.SQL("select {fn}($1)::text").format(fn=function_sql).as_string(conn)
    return sql.SQL("cross join lateral autoembed.try_input({call}, {row}) i").format(
        call=sql.Literal(call), row=sql.Identifier(row))


def scan_isolating(conn: psycopg.Connection, build: Callable[[bool], "psycopg.sql.Composable"], params,
                   ) -> tuple:
    """The one row of the aggregate scan build(safe=False); when it fails because the content
    function raises for some row, build(safe=True) (see input_lateral): each row's error is caught,
    the scan goes on. The fast scan costs nothing more than before."""
    try:
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            with conn.transaction():
                return conn.execute(build(False), params).fetchone()
        return conn.execute(build(False), params).fetchone()
    except Exception as exc:
        if not row_error(exc):
            raise
    return conn.execute(build(True), params).fetchone()
