"""Vectors in a target's own type on the wire: the binary COPY framing and tuples (key text,
content hash bytea, vector|halfvec) that the drain, the backfill and the chunk write stream."""

from __future__ import annotations

import struct

import numpy as np

from .catalog import Target


COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)


COPY_TRAILER = struct.pack(">h", -1)


def copy_records(target: Target, rows: list[tuple[str, bytes, np.ndarray]], encoding: str) -> list[bytes]:
    """The binary COPY tuple of each (key text, content hash bytea, vector|halfvec) row.

    The vectors are converted to big-endian float32/float16 in one numpy call; each tuple is then
    three length-prefixed fields. pgvector's binary format: int16 dim, int16 unused, elements.
    """
    if not rows:
        return []
    dims = target.dimensions
    elem = np.dtype(">f2") if target.vector_type == "halfvec" else np.dtype(">f4")
    matrix = np.asarray(np.stack([r[2] for r in rows]), dtype=np.float32).astype(elem)
    if matrix.shape[1] != dims:
        raise ValueError(f"vectors have {matrix.shape[1]} dimensions, the column {dims}")
    vector_head = struct.pack(">ihh", 4 + dims * elem.itemsize, dims, 0)
    pack = struct.Struct(">hi").pack
    pack_length = struct.Struct(">i").pack
    records = []
    for (key, content_hash, _), vector in zip(rows, matrix):
        kb = key.encode(encoding)
        records.append(b"".join((pack(3, len(kb)), kb, pack_length(len(content_hash)), content_hash,
                                 vector_head, vector.tobytes())))
    return records
