"""A SQL step's statement, sent in one pipeline with the worker's own queries, its result read
as it arrives.

psycopg's pipeline keeps every result whole in memory, and its ``stream()`` refuses pipeline
mode; one SELECT returning gigabytes would grow the worker without bound while it holds the
task (and its instance lock). So the round trip is driven here at the libpq level, through
psycopg's public ``pq`` API and waiting helpers, with the connection's lock held:

* ``BEGIN`` and the other queries *before* the statement, the statement (extended protocol:
  one statement only; binary results), the query *after* it (``df._checkpoint_begin``), then
  one Sync: one round trip, as before.
* The statement's rows come in chunks (libpq's chunked rows mode, libpq >= 17; single-row
  mode before that). Each chunk is loaded by psycopg's Transformer with the step loaders of
  :func:`~pgdurable.worker.results.configure_connection` and appended to the JSON text,
  whose size is checked as it grows.
* Past the limit the connection is closed at once: the server rolls the transaction back and
  stops producing rows, and nothing more is read. The caller must not reuse a closed
  connection (the step pools close it on release).

Errors of the server come back as the ``psycopg.Error`` a cursor would raise (SQLSTATE and
diagnostics included), once the whole pipeline has been read, with the connection usable
again (its transaction aborted: roll it back).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import abc, generators, pq
from psycopg import errors as e
from psycopg.adapt import PyFormat, Transformer
from psycopg.pq import ExecStatus, Format

from .results import (
    NO_RESULT_SET,
    TYPE_NAME_QUERY,
    ResultBuilder,
    ResultError,
    ResultTooLarge,
    check_columns,
    unsupported_type,
)

__all__ = [
    "BEGIN",
    "CHUNK_ROWS",
    "COMMIT",
    "Query",
    "forget_prepared",
    "run_queries",
    "run_statement",
    "run_statements",
]

CHUNK_ROWS = 256
"""Rows libpq gathers before handing them over: the rows held at once besides the JSON text."""

_CHUNKED = pq.version() >= 170000
_ROWS = (ExecStatus.TUPLES_OK, ExecStatus.SINGLE_TUPLE, ExecStatus.TUPLES_CHUNK)
_NO_ROWS = (ExecStatus.COMMAND_OK, ExecStatus.EMPTY_QUERY)
_COPY = (ExecStatus.COPY_IN, ExecStatus.COPY_OUT, ExecStatus.COPY_BOTH)


@dataclass(frozen=True)
class Query:
    """One of the worker's own queries (``%s`` placeholders), sent with the statement."""

    sql: str
    params: Sequence[Any] = ()


# READ COMMITTED whatever the role's default: a checkpoint must see, and lock, rows that other
# checkpoints committed after its transaction began.
BEGIN = Query("BEGIN ISOLATION LEVEL READ COMMITTED")
COMMIT = Query("COMMIT")


class _Rejected(Exception):
    """The statement's result cannot be recorded; raised once the pipeline is read."""

    def __init__(self, error: ResultError | None = None, unsupported: tuple[str, int] = ("", 0)):
        self.error = error
        self.unsupported = unsupported  # (column, type oid) of an unsupported column


async def run_statement(
    conn: psycopg.AsyncConnection[Any],
    statement: bytes,
    max_bytes: int,
    before: Sequence[Query] = (),
    after: Query | None = None,
) -> tuple[str, list[dict[str, Any]]]:
    """Run ``before``, ``statement`` and ``after`` in one pipeline; return the statement's
    result JSON and the rows of ``after`` as dicts by column name (none without ``after``).

    Raises the first server error (``psycopg.Error``; the connection is usable, its
    transaction aborted), a :class:`~pgdurable.worker.results.ResultError` for a result
    that cannot be recorded (:class:`~pgdurable.worker.results.ResultTooLarge`: the
    connection is closed), or anything else with the connection closed.
    """
    parts: list[Query | bytes] = [*before, statement, *([after] if after is not None else [])]
    try:
        async with conn.lock:
            answers = await _pipeline(conn, parts, max_bytes)
    except _Rejected as rejected:
        if rejected.error is not None:
            raise rejected.error from None
        column, oid = rejected.unsupported
        async with conn.cursor() as cur:  # in the statement's transaction, as before
            await cur.execute(TYPE_NAME_QUERY, (oid,))
            names = await cur.fetchone()
        raise unsupported_type(column, oid, names) from None
    result = answers[len(before)]
    assert isinstance(result, str)
    rows = answers[-1] if after is not None else []
    assert isinstance(rows, list)
    return result, rows


async def run_statements(
    conn: psycopg.AsyncConnection[Any], parts: Sequence[Query | bytes], max_bytes: int
) -> list[str | list[dict[str, Any]]]:
    """Run ``parts`` in one pipeline: statements (``bytes``, their results read as they
    arrive, each up to ``max_bytes``) and our queries. Returns a statement's result JSON,
    a query's rows, in order. Raises as :func:`run_statement` does, except that a result
    which cannot be recorded is a plain ``ResultError`` (the connection closed or its
    transaction aborted): the caller runs its steps again one at a time to learn more.
    """
    try:
        async with conn.lock:
            return await _pipeline(conn, parts, max_bytes)
    except _Rejected as rejected:
        raise rejected.error or ResultError("a result of the batch cannot be recorded") from None


async def _pipeline(
    conn: psycopg.AsyncConnection[Any], parts: Sequence[Query | bytes], max_bytes: int
) -> list[str | list[dict[str, Any]]]:
    if conn.closed:
        raise e.OperationalError("the connection is closed")
    pgconn = conn.pgconn
    pgconn.enter_pipeline_mode()
    try:
        sent: list[bytes | None] = []
        preparing: set[bytes] = set()
        for part in parts:
            if isinstance(part, Query):
                sent.append(_send(conn, part, preparing))
            else:
                pgconn.send_query_params(part, None, result_format=Format.BINARY)
                sent.append(None)
        pgconn.pipeline_sync()
        await conn.wait(generators.send(pgconn))

        error: psycopg.Error | None = None
        rejected: _Rejected | None = None
        answers: list[str | list[dict[str, Any]]] = []
        for part, prepare in zip(parts, sent, strict=True):
            if isinstance(part, Query):
                rows, error = await _read_query(conn, prepare, error)
                answers.append(rows)
                continue
            if error is None:
                # Must come right after the previous query's results, before any of this one's.
                if _CHUNKED:
                    pgconn.set_chunked_rows_mode(CHUNK_ROWS)
                else:
                    pgconn.set_single_row_mode()
            result, refused, error = await _read_statement(conn, max_bytes, error)
            rejected = rejected or refused
            answers.append(result)
        await _sync(conn)
    except BaseException:
        # Cancelled, the connection lost, or a result we cannot go on reading after: the
        # session is in an unknown state.
        await _close(conn)
        raise
    if error is not None:
        raise error
    if rejected is not None:
        raise rejected
    return answers


async def run_queries(
    conn: psycopg.AsyncConnection[Any], queries: Sequence[Query]
) -> list[list[dict[str, Any]]]:
    """Run ``queries`` in one pipeline (one round trip); return each one's rows as dicts by
    column name. Raises the first server error once all was read (the connection usable, its
    transaction aborted), or anything else with the connection closed.

    The same as a psycopg pipeline of cursors, for a fraction of the client's CPU: this is
    the commit of every step.
    """
    async with conn.lock:
        if conn.closed:
            raise e.OperationalError("the connection is closed")
        pgconn = conn.pgconn
        pgconn.enter_pipeline_mode()
        try:
            preparing: set[bytes] = set()
            sent = [_send(conn, query, preparing) for query in queries]
            pgconn.pipeline_sync()
            await conn.wait(generators.send(pgconn))
            error: psycopg.Error | None = None
            results = []
            for prepare in sent:
                rows, error = await _read_query(conn, prepare, error)
                results.append(rows)
            await _sync(conn)
        except BaseException:
            await _close(conn)
            raise
    if error is not None:
        raise error
    return results


def _rows(
    conn: psycopg.AsyncConnection[Any],
    results: Sequence[pq.abc.PGresult],
    error: psycopg.Error | None,
) -> tuple[list[dict[str, Any]], psycopg.Error | None]:
    """The rows of one query's results by column name (none once an error came), and the
    first error so far."""
    rows: list[dict[str, Any]] = []
    for res in results:
        if res.status == ExecStatus.FATAL_ERROR:
            error = error or e.error_from_result(res, encoding=conn.info.encoding)
        elif res.status == ExecStatus.TUPLES_OK and error is None:
            loader = _transformer(conn)
            loader.set_pgresult(res)
            names = [(res.fname(i) or b"").decode() for i in range(res.nfields)]
            loaded = loader.load_rows(0, res.ntuples, tuple)
            rows = [dict(zip(names, row, strict=True)) for row in loaded]
    return rows, error


async def _next_result(conn: psycopg.AsyncConnection[Any]) -> pq.abc.PGresult | None:
    """The pipeline's next result (None at the end of a query's): taken from libpq's buffer
    when it is there already, as most of a pipeline's are once its first result came, and
    only else waited for through psycopg (whose every wait costs a round of the event loop).
    """
    pgconn = conn.pgconn
    if pgconn.is_busy():
        return await conn.wait(generators.fetch(pgconn))
    while notify := pgconn.notifies():  # what psycopg's fetch does with them
        if pgconn.notify_handler:
            pgconn.notify_handler(notify)
    return pgconn.get_result()


async def _sync(conn: psycopg.AsyncConnection[Any]) -> None:
    """Read the pipeline's Sync and leave pipeline mode."""
    sync = await _next_result(conn)
    if sync is None or sync.status != ExecStatus.PIPELINE_SYNC:
        raise e.InternalError("pipeline out of step: no Sync where one was expected")
    conn.pgconn.exit_pipeline_mode()


# Our own queries are prepared on each connection the first time it sends them: parsed and
# planned once per session, not at every step. The session reset of a step keeps them
# (df._reset_session deallocates only what SQL PREPARE made); after DISCARD ALL, forget them.
_PREPARED: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], set[bytes]] = (
    weakref.WeakKeyDictionary()
)


# One Transformer per connection for our own queries' parameters and rows, used one query at a
# time (the connection's lock is held): making one costs more than most of what it then does,
# and it keeps the adapters it looked up.
_TRANSFORMERS: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], abc.Transformer] = (
    weakref.WeakKeyDictionary()
)


def _transformer(conn: psycopg.AsyncConnection[Any]) -> abc.Transformer:
    transformer = _TRANSFORMERS.get(conn)
    if transformer is None:
        transformer = _TRANSFORMERS[conn] = Transformer(conn)
    return transformer


def forget_prepared(conn: psycopg.AsyncConnection[Any]) -> None:
    """``conn``'s prepared statements are gone (DISCARD ALL): prepare ours again."""
    _PREPARED.pop(conn, None)


@functools.lru_cache(maxsize=256)
def _numbered(sql: str, count: int) -> tuple[bytes, bytes]:
    """A query of ours (ASCII, no literal "%") with $n placeholders, and its statement name."""
    for number in range(1, count + 1):
        sql = sql.replace("%s", f"${number}", 1)
    text = sql.encode()
    return text, b"pgdurable_" + hashlib.blake2b(text, digest_size=8).hexdigest().encode()


def _send(conn: psycopg.AsyncConnection[Any], query: Query, preparing: set[bytes]) -> bytes | None:
    """Queue one of our queries, parameters dumped by psycopg's adapters (text format), and
    first its Prepare if this connection has not got it nor is getting it in this pipeline
    (``preparing``, updated): returns the name then, else None.

    Prepared without parameter types: the server infers them from the query, where psycopg
    would pick a type for each value (int2 for a small integer, which a later bigger one
    would not fit)."""
    text, name = _numbered(query.sql, len(query.params))
    dumper = _transformer(conn)
    values = dumper.dump_sequence(query.params, [PyFormat.TEXT] * len(query.params))
    pgconn = conn.pgconn
    prepare = None
    if name not in _PREPARED.get(conn, ()) and name not in preparing:
        pgconn.send_prepare(name, text)
        preparing.add(name)
        prepare = name
    pgconn.send_query_prepared(name, values or None, dumper.formats or None)
    return prepare


async def _read_query(
    conn: psycopg.AsyncConnection[Any], prepare: bytes | None, error: psycopg.Error | None
) -> tuple[list[dict[str, Any]], psycopg.Error | None]:
    """Read the results of one query ``_send`` queued, its Prepare first if it queued one
    (``prepare``, its name): the query's rows, and the first error so far."""
    if prepare is not None:
        for res in await _results(conn):
            if res.status == ExecStatus.COMMAND_OK:
                _PREPARED.setdefault(conn, set()).add(prepare)
            elif res.status == ExecStatus.FATAL_ERROR:
                error = error or e.error_from_result(res, encoding=conn.info.encoding)
    return _rows(conn, await _results(conn), error)


async def _results(conn: psycopg.AsyncConnection[Any]) -> list[pq.abc.PGresult]:
    """The results of the next query in the pipeline."""
    results = []
    while (res := await _next_result(conn)) is not None:
        results.append(res)
    return results


async def _read_statement(
    conn: psycopg.AsyncConnection[Any], max_bytes: int, error: psycopg.Error | None
) -> tuple[str, _Rejected | None, psycopg.Error | None]:
    """Read the statement's results as they arrive: (result JSON, why it cannot be recorded,
    the server's error). Closes the connection and raises past ``max_bytes``."""
    loader = Transformer(conn)
    builder: ResultBuilder | None = None
    rejected: _Rejected | None = None
    drained = 0  # bytes of rows read after the result was rejected, only to skip them
    result = NO_RESULT_SET
    while (res := await _next_result(conn)) is not None:
        status = res.status
        if status in _ROWS:
            fresh = builder is None and rejected is None
            if fresh:
                builder, rejected = _begin(conn, res, max_bytes)
            if builder is not None and rejected is None:
                loader.set_pgresult(res, set_loaders=fresh)
                try:
                    _load(loader, builder, res.ntuples)
                except ResultTooLarge:
                    await _close(conn)
                    raise
                except ResultError as exc:  # a value with no JSON form
                    rejected, builder = _Rejected(exc), None
            else:
                # Read on to the Sync so the connection stays usable, but no further than the
                # limit: the rejected result may be huge.
                drained += _raw_bytes(res)
                if drained > max_bytes:
                    await _close(conn)
                    raise ResultTooLarge(max_bytes)
        elif status in _NO_ROWS:
            result = NO_RESULT_SET
        elif status == ExecStatus.FATAL_ERROR:
            error = error or e.error_from_result(res, encoding=conn.info.encoding)
        elif status in _COPY:
            # libpq cannot leave COPY mode in a pipeline: this connection is done for.
            await _close(conn)
            raise ResultError(
                "COPY to or from the client (STDIN/STDOUT) is not possible in a SQL step"
            )
        elif status != ExecStatus.PIPELINE_ABORTED:
            raise e.InternalError(f"unexpected result status {pq.ExecStatus(status).name}")
    if builder is not None and rejected is None and error is None:
        try:
            result = builder.text()
        except ResultTooLarge:
            await _close(conn)
            raise
    return result, rejected, error


def _begin(
    conn: psycopg.AsyncConnection[Any], res: pq.abc.PGresult, max_bytes: int
) -> tuple[ResultBuilder | None, _Rejected | None]:
    """The builder of a result whose first rows (or description) just came, or why the
    result cannot be recorded."""
    encoding = conn.info.encoding
    names = [(res.fname(i) or b"").decode(encoding) for i in range(res.nfields)]
    oids = [res.ftype(i) for i in range(res.nfields)]
    try:
        column = check_columns(names, oids)
    except ResultError as exc:
        return None, _Rejected(exc)
    if column is not None:
        return None, _Rejected(unsupported=(names[column], oids[column]))
    return ResultBuilder(names, max_bytes), None


def _load(loader: abc.Transformer, builder: ResultBuilder, ntuples: int) -> None:
    """Load a chunk's rows into the builder a batch at a time, so that a chunk of very wide
    rows is not all turned into Python objects before the limit stops it."""
    row = 0
    while row < ntuples:
        end = min(ntuples, row + builder.batch_rows())
        builder.add(loader.load_rows(row, end, tuple))
        row = end


def _raw_bytes(res: pq.abc.PGresult) -> int:
    total = 0
    for row in range(res.ntuples):
        for column in range(res.nfields):
            value = res.get_value(row, column)
            total += len(value) if value is not None else 0
    return total


async def _close(conn: psycopg.AsyncConnection[Any]) -> None:
    # The server rolls back the open transaction when the session ends.
    with contextlib.suppress(Exception):
        await conn.close()
