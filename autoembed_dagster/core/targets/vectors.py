"""Vectors in a target's own type on the wire: each vector's binary value (encode_vectors, made by
the embed stage), the binary arrays of them the write functions take (vector_array; sql/019), and
the one call of a write function (write_as_owner)."""

from __future__ import annotations

import struct

import numpy as np
import psycopg
from psycopg import sql
from psycopg.adapt import Dumper, PyFormat
from psycopg.pq import Format

from .catalog import Target


def encode_vectors(target: Target, vectors: list[np.ndarray]) -> list[bytes]:
    """pgvector's binary value of each vector (its send format: int16 dim, int16 unused, big-endian
    elements), in `target`'s vector type, converted in one numpy call."""
    if not vectors:
        return []
    dims = target.dimensions
    elem = np.dtype(">f2") if target.vector_type == "halfvec" else np.dtype(">f4")
    matrix = np.asarray(np.stack(vectors), dtype=np.float32).astype(elem)
    if matrix.shape[1] != dims:
        raise ValueError(f"vectors have {matrix.shape[1]} dimensions, the column {dims}")
    head = struct.pack(">hh", dims, 0)
    return [head + v.tobytes() for v in matrix]


class VectorArray:
    """Binary vector values (pgvector's send format, all of one type) sent as one binary array of
    pgvector's `vector`: dumped in one piece by its dumper (_ArrayDumper), not element by element
    by psycopg's list dumper (~10 us a row in the drain's write)."""

    type_name = "vector"
    __slots__ = ("values",)

    def __init__(self, values: list[bytes]) -> None:
        self.values = values

    def __len__(self) -> int:
        return len(self.values)


class HalfvecArray(VectorArray):
    """The same, as an array of pgvector's `halfvec`."""

    type_name = "halfvec"
    __slots__ = ()


def vector_array(conn: psycopg.Connection, vector_type: str, values: list[bytes]) -> VectorArray:
    """`values` (binary vector values) as one binary array of `vector_type` (pass it with %b): the
    write functions take vectors that way, parsed by pgvector's own binary receive function, like
    the binary COPY they replace."""
    cls = HalfvecArray if vector_type == "halfvec" else VectorArray
    try:
        conn.adapters.get_dumper(cls, PyFormat.BINARY)
    except psycopg.ProgrammingError:  # not registered on this connection yet
        _register_array_dumpers(conn)
    return cls(values)


def _register_array_dumpers(conn: psycopg.Connection) -> None:
    rows = conn.execute(
        """select t.typname::text, t.oid::int, t.typarray::int from pg_type t
           join pg_extension e on e.extnamespace = t.typnamespace
           where e.extname = 'vector' and t.typname in ('vector', 'halfvec')""").fetchall()
    for name, oid, array_oid in rows:
        cls = HalfvecArray if name == "halfvec" else VectorArray
        dumper = type(f"{cls.__name__}BinaryDumper", (_ArrayDumper,), {"oid": array_oid, "element_oid": oid})
        conn.adapters.register_dumper(cls, dumper)


_ARRAY_HEAD = struct.Struct(">iiiii")  # ndim, has nulls, element type, length, lower bound
_LENGTH = struct.Struct(">i")


class _ArrayDumper(Dumper):
    """PostgreSQL's binary array format around values that are already binary: a header, then each
    value with its length in front. Vectors of one column have one length: one join then."""

    format = Format.BINARY
    element_oid = 0

    def dump(self, obj: VectorArray) -> bytes:
        values = obj.values
        if not values:
            return _ARRAY_HEAD.pack(0, 0, self.element_oid, 0, 0)[:12]  # a 0-dimensional (empty) array
        head = _ARRAY_HEAD.pack(1, 0, self.element_oid, len(values), 1)
        size = len(values[0])
        if set(map(len, values)) == {size}:
            length = _LENGTH.pack(size)
            return b"".join((head, length, length.join(values)))
        return head + b"".join(_LENGTH.pack(len(v)) + v for v in values)


def write_as_owner(conn: psycopg.Connection, body: str, rel: str, embedding_column: str | None,
                   key_column: str | None, args: str, params: tuple) -> tuple:
    """Run write body `body` of sql/019 (write_vector_rows: a vector column `embedding_column` of
    table `rel` keyed by `key_column`; write_chunk_rows / drop_old_chunk_rows: chunk table `rel`,
    both columns None) with the table owner's rights: autoembed.owner_writer names the function
    (the target's write_<id>, or the body itself for the table's owner; else it raises), which is
    called with `args` (SQL placeholders for `params`, the body's own arguments). The session's
    search_path is put back in the same statement (an owner's trigger may change it). One path
    for both shapes, the drain, backfills and model migrations. Returns the function's result row."""
    fn, path = conn.execute("select autoembed.owner_writer(%s::regclass, %s, %s, %s), current_setting('search_path')",
                            (rel, embedding_column, key_column, body), prepare=False).fetchone()
    row = conn.execute(sql.SQL("select w.*, pg_catalog.set_config('search_path', %s, false) from {}(" + args + ") w")
                       .format(sql.SQL(fn)), (path, *params), prepare=False).fetchone()
    return row[:-1]
