"""TensorFlow checkpoints (``tf.train.Saver`` / ``tf.train.Checkpoint`` "V2" bundles) read with numpy.

No TensorFlow and no protobuf library: the two small file formats are parsed here.

A checkpoint is a *prefix* ``.../model.ckpt`` naming a group of files:

``<prefix>.index``
    A sorted key/value table in the LevelDB "SSTable" layout. Reading it from the end:

    * the last 48 bytes are the *footer*: two block handles (metaindex block, index block), each a
      pair of varints (offset, size), zero-padded to 40 bytes, then the 8-byte little-endian magic
      number ``0xdb4775248b80fb57``;
    * every block is followed by a 5-byte trailer: one compression-type byte (0: none, 1: snappy)
      and a little-endian uint32 CRC-32C of the block bytes plus that type byte, stored *masked*
      (rotated right by 15 bits, plus ``0xa282ead8``). TensorFlow writes its index tables
      uncompressed, so a snappy block is refused here;
    * a block is a run of entries, each ``varint shared, varint unshared, varint value_len,
      key[shared:], value``: a key repeats ``shared`` bytes of the previous key (prefix compression).
      Every 16th entry (a *restart point*) stores its key whole; the block ends with the uint32
      offsets of the restart points and their count;
    * the index block maps a separator key per data block to that block's handle; the data blocks
      hold the checkpoint's own entries, in key order.

    In those entries the empty key holds a ``BundleHeaderProto`` (number of data shards, byte
    order of the tensor data, format version); every other key is a variable's name and its value
    a ``BundleEntryProto``: dtype, shape, data shard, byte offset and size in that shard, and the
    masked CRC-32C of the tensor bytes (a partitioned variable lists ``slices`` instead and its
    pieces sit under encoded keys of their own). Both are protobuf messages; the few fields needed
    are decoded here by hand (varints, fixed32 and length-delimited fields).

``<prefix>.data-00000-of-00001`` (``-of-NNNNN`` shards)
    The tensors' raw bytes, C order, in the byte order the header names.

Every check TensorFlow makes is made here too (block and tensor checksums, sizes, magic number),
and every failure is a one-line ``ValueError`` (``FileNotFoundError`` for a missing file) naming
the file and, where there is one, the variable.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["TFCheckpointEntry", "crc32c", "read_tf_checkpoint", "read_tf_checkpoint_index"]

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_LEN = 48  # two block handles of at most 2 x 10 varint bytes each, padded, + 8-byte magic
_TRAILER_LEN = 5  # compression type + masked crc32c
_NO_COMPRESSION, _SNAPPY = 0, 1
_MASK_DELTA = 0xA282EAD8
_BUNDLE_VERSION = 1  # the tensor-bundle format version this reader understands

# TensorFlow DataType enum (types.proto) -> numpy dtype of the stored bytes (little-endian).
_NUMPY_DTYPES = {
    1: "f4",  # DT_FLOAT
    2: "f8",  # DT_DOUBLE
    3: "i4",  # DT_INT32
    4: "u1",  # DT_UINT8
    5: "i2",  # DT_INT16
    6: "i1",  # DT_INT8
    8: "c8",  # DT_COMPLEX64
    9: "i8",  # DT_INT64
    10: "?",  # DT_BOOL
    14: "u2",  # DT_BFLOAT16: read as its 16 bits, widened to float32 below (exactly)
    17: "u2",  # DT_UINT16
    18: "c16",  # DT_COMPLEX128
    19: "f2",  # DT_HALF
    22: "u4",  # DT_UINT32
    23: "u8",  # DT_UINT64
}
_DT_BFLOAT16 = 14
_DTYPE_NAMES = {
    1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8", 7: "string",
    8: "complex64", 9: "int64", 10: "bool", 11: "qint8", 12: "quint8", 13: "qint32",
    14: "bfloat16", 15: "qint16", 16: "quint16", 17: "uint16", 18: "complex128", 19: "float16",
    20: "resource", 21: "variant", 22: "uint32", 23: "uint64",
}  # fmt: skip


# ------------------------------------------------------------------------------------ crc32c


def _make_crc_table() -> np.ndarray:
    table = np.zeros(256, dtype=np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)  # Castagnoli polynomial, bit-reflected
        table[i] = c
    return table


_CRC_TABLE = _make_crc_table()


def _make_crc_tables4() -> tuple[np.ndarray, ...]:
    """Tables for four bytes a step: ``T[k][i]`` = register after byte ``i`` then ``k`` zero bytes."""
    tables = [_CRC_TABLE]
    for _ in range(3):
        prev = tables[-1]
        tables.append((prev >> np.uint32(8)) ^ _CRC_TABLE[(prev & np.uint32(0xFF)).astype(np.uint8)])
    return tuple(tables)


_CRC_TABLES4 = _make_crc_tables4()
_CRC_TABLE_LIST = [int(v) for v in _CRC_TABLE]
_CRC_VECTOR_MIN = 1 << 16  # below this many bytes a plain loop is as quick


def _crc_register_small(reg: int, data: bytes | memoryview) -> int:
    table = _CRC_TABLE_LIST
    for b in bytes(data):
        reg = table[(reg ^ b) & 0xFF] ^ (reg >> 8)
    return reg


def _zero_operator(columns: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Apply a linear map on the 32-bit register (given by its 32 columns) to every value of ``v``."""
    out = np.zeros_like(v)
    for bit in range(32):
        out ^= np.where((v >> np.uint32(bit)) & np.uint32(1), columns[bit], np.uint32(0))
    return out


def _crc_register_large(data: np.ndarray) -> int:
    """The CRC register after ``data`` starting from 0, computed over many rows at once.

    The register update is linear, so a message split into rows R0 R1 ... has register
    ``Z(...Z(Z(r0) ^ r1)...) ^ rk`` where ``ri`` is row i's register from 0 and ``Z`` feeds one row
    length of zero bytes. Leading zero bytes leave a zero register unchanged, so the message is
    zero-padded at the front to whole rows. Each row is consumed four bytes a step
    ("slicing-by-4" tables), all rows in parallel.
    """
    n = data.size
    row_len = 1 << max(6, (int(np.sqrt(n)).bit_length() - 1))
    rows = -(-n // row_len)
    padded = np.zeros(rows * row_len, dtype=np.uint8)
    padded[padded.size - n :] = data
    words = np.ascontiguousarray(padded.view("<u4").reshape(rows, row_len // 4).T)  # (steps, rows)
    del padded
    reg = np.zeros(rows, dtype=np.uint32)
    tmp = np.empty(rows, dtype=np.uint32)
    acc = np.empty(rows, dtype=np.uint32)
    le = reg.view(np.uint8).reshape(rows, 4)
    low_first = np.little_endian
    t0, t1, t2, t3 = _CRC_TABLES4
    for step in words:
        reg ^= step
        b = [le[:, i] for i in ((0, 1, 2, 3) if low_first else (3, 2, 1, 0))]
        np.take(t3, b[0], out=acc)
        np.take(t2, b[1], out=tmp)
        acc ^= tmp
        np.take(t1, b[2], out=tmp)
        acc ^= tmp
        np.take(t0, b[3], out=tmp)
        np.bitwise_xor(acc, tmp, out=reg)
    eight = np.uint32(8)
    # Z for one zero byte, then squared up to one row length.
    basis = np.uint32(1) << np.arange(32, dtype=np.uint32)
    cols = _CRC_TABLE[(basis & np.uint32(0xFF)).astype(np.uint8)] ^ (basis >> eight)
    length = 1
    while length < row_len:
        cols = _zero_operator(cols, cols)
        length *= 2
    while reg.size > 1:
        if reg.size % 2:
            reg = np.concatenate([np.zeros(1, dtype=np.uint32), reg])  # a zero row in front
        reg = _zero_operator(cols, reg[0::2]) ^ reg[1::2]
        cols = _zero_operator(cols, cols)
    return int(reg[0])


def crc32c(data: bytes | bytearray | memoryview | np.ndarray) -> int:
    """CRC-32C (Castagnoli) of ``data``, as LevelDB and TensorFlow compute it (unmasked)."""
    buf = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    if buf.size < _CRC_VECTOR_MIN:
        return _crc_register_small(0xFFFFFFFF, buf.tobytes()) ^ 0xFFFFFFFF
    # Starting from 0xFFFFFFFF equals starting from 0 with the first four bytes complemented.
    head = buf[:4] ^ np.uint8(0xFF)
    return _crc_register_large(np.concatenate([head, buf[4:]])) ^ 0xFFFFFFFF


def _unmask(masked: int) -> int:
    rot = (masked - _MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# ---------------------------------------------------------------------- varints and protobuf


class _Truncated(Exception):
    """Internal: a varint or field ran past the end of its buffer."""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _Truncated
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _signed64(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >> 63 else v


def _fields(buf: bytes) -> list[tuple[int, int, int | bytes]]:
    """A protobuf message's fields in order: (number, wire type, int or bytes)."""
    out, pos = [], 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            if pos + 8 > len(buf):
                raise _Truncated
            value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > len(buf):
                raise _Truncated
            value, pos = buf[pos : pos + n], pos + n
        elif wire == 5:
            if pos + 4 > len(buf):
                raise _Truncated
            value, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} (field {number})")
        out.append((number, wire, value))
    return out


@dataclass(frozen=True)
class TFCheckpointEntry:
    """One variable's record in the ``.index`` file (a ``BundleEntryProto``)."""

    name: str
    dtype: int  # TensorFlow DataType enum value
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int | None  # masked, as stored; None if absent
    partitioned: bool

    @property
    def dtype_name(self) -> str:
        return _DTYPE_NAMES.get(self.dtype, f"dtype#{self.dtype}")


def _parse_shape(buf: bytes) -> tuple[int, ...]:
    dims = []
    for number, wire, value in _fields(buf):
        if number == 2 and wire == 2:  # repeated Dim dim
            size = 0
            for n2, w2, v2 in _fields(value):
                if n2 == 1 and w2 == 0:
                    size = _signed64(v2)
            dims.append(size)
        elif number == 3 and wire == 0 and value:  # unknown_rank
            raise ValueError("the shape has unknown rank")
    if any(d < 0 for d in dims):
        raise ValueError(f"the shape {tuple(dims)} has unknown dimensions")
    return tuple(dims)


def _parse_entry(name: str, buf: bytes) -> TFCheckpointEntry:
    dtype, shape, shard, offset, size, crc, partitioned = 0, (), 0, 0, 0, None, False
    for number, wire, value in _fields(buf):
        if number == 1 and wire == 0:
            dtype = value
        elif number == 2 and wire == 2:
            shape = _parse_shape(value)
        elif number == 3 and wire == 0:
            shard = _signed64(value)
        elif number == 4 and wire == 0:
            offset = _signed64(value)
        elif number == 5 and wire == 0:
            size = _signed64(value)
        elif number == 6 and wire == 5:
            crc = value
        elif number == 7 and wire == 2:
            partitioned = True
    return TFCheckpointEntry(name, dtype, shape, shard, offset, size, crc, partitioned)


@dataclass(frozen=True)
class _Header:
    num_shards: int
    big_endian: bool
    producer: int
    min_consumer: int


def _parse_header(buf: bytes) -> _Header:
    num_shards, endianness, producer, min_consumer = 0, 0, 0, 0
    for number, wire, value in _fields(buf):
        if number == 1 and wire == 0:
            num_shards = _signed64(value)
        elif number == 2 and wire == 0:
            endianness = value
        elif number == 3 and wire == 2:  # VersionDef
            for n2, w2, v2 in _fields(value):
                if n2 == 1 and w2 == 0:
                    producer = _signed64(v2)
                elif n2 == 2 and w2 == 0:
                    min_consumer = _signed64(v2)
    if endianness not in (0, 1):
        raise ValueError(f"unknown byte order {endianness}")
    return _Header(num_shards, endianness == 1, producer, min_consumer)


# -------------------------------------------------------------------------------- the table


def _read_block(data: bytes, offset: int, size: int, what: str) -> bytes:
    end = offset + size + _TRAILER_LEN
    if offset < 0 or size < 0 or end > len(data) - _FOOTER_LEN:
        raise ValueError(f"truncated or corrupt: {what} at bytes {offset}..{end} lies outside the table")
    block = data[offset : offset + size]
    kind = data[offset + size]
    (stored,) = struct.unpack_from("<I", data, offset + size + 1)
    if crc32c(data[offset : offset + size + 1]) != _unmask(stored):
        raise ValueError(f"checksum mismatch in {what} at byte {offset}")
    if kind == _SNAPPY:
        raise ValueError(f"{what} at byte {offset} is snappy-compressed (TensorFlow never writes that; not supported)")
    if kind != _NO_COMPRESSION:
        raise ValueError(f"unknown compression type {kind} of {what} at byte {offset}")
    return block


def _block_entries(block: bytes, what: str) -> list[tuple[bytes, bytes]]:
    """The (key, value) pairs of one block, keys expanded; restart points checked."""
    if len(block) < 4:
        raise ValueError(f"the {what} is too short")
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    limit = len(block) - 4 * (num_restarts + 1)
    if num_restarts < 1 or limit < 0:
        raise ValueError(f"the {what} has a bad restart array")
    restarts = struct.unpack_from(f"<{num_restarts}I", block, limit)
    entries, starts, key, pos = [], {}, b"", 0
    try:
        while pos < limit:
            start = pos
            shared, pos = _varint(block, pos)
            unshared, pos = _varint(block, pos)
            value_len, pos = _varint(block, pos)
            if shared > len(key) or pos + unshared + value_len > limit:
                raise _Truncated
            key = key[:shared] + block[pos : pos + unshared]
            pos += unshared
            entries.append((key, block[pos : pos + value_len]))
            pos += value_len
            starts[start] = shared
    except _Truncated:
        raise ValueError(f"the {what} has a malformed entry") from None
    if entries and any(starts.get(r) != 0 for r in restarts):
        raise ValueError(f"the {what} has a restart point that is not a whole key")
    return entries


def _read_sstable(data: bytes) -> tuple[list[tuple[bytes, bytes]], int]:
    """Every (key, value) of a LevelDB-format table and the number of its data blocks."""
    if len(data) < _FOOTER_LEN:
        raise ValueError(f"too short for a TensorFlow checkpoint index ({len(data)} bytes)")
    footer = data[len(data) - _FOOTER_LEN :]
    (magic,) = struct.unpack_from("<Q", footer, _FOOTER_LEN - 8)
    if magic != _TABLE_MAGIC:
        raise ValueError("bad magic number (truncated, or not a TensorFlow checkpoint index)")
    try:
        _meta_off, pos = _varint(footer, 0)
        _meta_size, pos = _varint(footer, pos)
        index_off, pos = _varint(footer, pos)
        index_size, pos = _varint(footer, pos)
    except _Truncated:
        raise ValueError("corrupt footer") from None
    index = _block_entries(_read_block(data, index_off, index_size, "index block"), "index block")
    entries: list[tuple[bytes, bytes]] = []
    for n, (_sep, handle) in enumerate(index):
        try:
            off, p = _varint(handle, 0)
            size, _ = _varint(handle, p)
        except _Truncated:
            raise ValueError(f"corrupt handle of data block {n}") from None
        what = f"data block {n}"
        entries += _block_entries(_read_block(data, off, size, what), what)
    for (a, _), (b, _) in itertools.pairwise(entries):
        if not a < b:
            raise ValueError(f"keys out of order ({a!r} before {b!r})")
    return entries, len(index)


# --------------------------------------------------------------------------------- bundles


def _resolve_prefix(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("*.index"))
        if not found:
            raise FileNotFoundError(f"{p}: no *.index file (not a TensorFlow checkpoint directory)")
        if len(found) > 1:
            names = ", ".join(f.name for f in found)
            raise ValueError(f"{p}: several checkpoints ({names}); name one by its prefix")
        return found[0].with_suffix("")
    if p.suffix == ".index":
        return p.with_suffix("")
    m = re.fullmatch(r"(.*)\.data-\d{5}-of-\d{5}", p.name)
    if m:
        return p.with_name(m[1])
    return p


def _shard_path(prefix: Path, shard: int, num_shards: int) -> Path:
    return prefix.with_name(f"{prefix.name}.data-{shard:05d}-of-{num_shards:05d}")


@dataclass(frozen=True)
class _Index:
    prefix: Path
    header: _Header
    entries: dict[str, TFCheckpointEntry]
    data_blocks: int


def _load_index(path: str | os.PathLike) -> _Index:
    prefix = _resolve_prefix(path)
    index_path = prefix.with_name(prefix.name + ".index")
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path}: no such checkpoint index (looked for '<prefix>.index')")
    data = index_path.read_bytes()
    try:
        table, data_blocks = _read_sstable(data)
        if not table or table[0][0] != b"":
            raise ValueError("no bundle header (the empty key)")
        header = _parse_header(table[0][1])
    except (ValueError, _Truncated) as e:
        msg = str(e) or "truncated protobuf message"
        raise ValueError(f"{index_path}: {msg}") from None
    if header.min_consumer > _BUNDLE_VERSION:
        raise ValueError(
            f"{index_path}: written for readers of bundle version >= {header.min_consumer}; "
            f"this reader knows version {_BUNDLE_VERSION}"
        )
    if header.num_shards < 1:
        raise ValueError(f"{index_path}: the header gives {header.num_shards} data shards")
    entries: dict[str, TFCheckpointEntry] = {}
    slice_keys = 0
    for key, value in table[1:]:
        if key.startswith(b"\x00"):  # an encoded (name, slice) key: a piece of a partitioned variable
            slice_keys += 1
            continue
        try:
            name = key.decode("utf8")
        except UnicodeDecodeError:
            raise ValueError(f"{index_path}: a key is not UTF-8: {key!r}") from None
        try:
            entry = _parse_entry(name, value)
        except (ValueError, _Truncated) as e:
            raise ValueError(f"{index_path}: variable {name!r}: {str(e) or 'truncated entry'}") from None
        if entry.partitioned:
            raise ValueError(
                f"{index_path}: variable {name!r} is partitioned into slices, which this reader "
                "does not support (restore it with TensorFlow and save it whole)"
            )
        if not 0 <= entry.shard_id < header.num_shards:
            raise ValueError(
                f"{index_path}: variable {name!r} names data shard {entry.shard_id} of {header.num_shards}"
            )
        entries[name] = entry
    if slice_keys:
        raise ValueError(f"{index_path}: {slice_keys} partitioned-variable slice entries (not supported)")
    return _Index(prefix, header, entries, data_blocks)


def read_tf_checkpoint_index(path: str | os.PathLike) -> dict[str, TFCheckpointEntry]:
    """Every variable's record (dtype, shape, where its bytes lie) without reading the tensors."""
    return dict(_load_index(path).entries)


def _to_array(entry: TFCheckpointEntry, raw: bytearray, big_endian: bool, where: Path) -> np.ndarray:
    code = _NUMPY_DTYPES[entry.dtype]
    dtype = np.dtype(code if code == "?" else (">" if big_endian else "<") + code)
    count = int(np.prod(entry.shape, dtype=np.int64))
    if len(raw) != count * dtype.itemsize:
        raise ValueError(
            f"{where}: variable {entry.name!r} ({entry.dtype_name}, shape {list(entry.shape)}) "
            f"has {len(raw)} bytes, expected {count * dtype.itemsize}"
        )
    array = np.frombuffer(raw, dtype=dtype).reshape(entry.shape)
    if entry.dtype == _DT_BFLOAT16:  # the upper half of a float32
        bits = array.astype(np.uint32)
        bits <<= np.uint32(16)
        return bits.view(np.float32)
    native = np.dtype(code)
    if array.dtype != native:  # big-endian data
        array = array.astype(native)
    return array


def read_tf_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every numeric variable of a TensorFlow V2 checkpoint, by its name.

    Args:
        path: the checkpoint prefix (``.../model.ckpt``), its ``.index`` file, one of its data
            files, or a directory holding exactly one ``*.index``.

    Returns:
        ``{variable name: array}`` in the index's (sorted) order, with TensorFlow's dtype
        (bfloat16 widened exactly to float32) and shape. Variables of non-numeric dtypes
        (strings, resources, variants, quantized types) are left out and logged at debug level.

    Raises:
        FileNotFoundError: the ``.index`` file or a data shard it needs is missing.
        ValueError: anything wrong with the files (truncation, bad magic number, checksum
            mismatch, partitioned variable, ...): one line naming the file and the variable.
    """
    index = _load_index(path)
    header, prefix = index.header, index.prefix
    wanted: dict[int, list[TFCheckpointEntry]] = {}
    for entry in index.entries.values():
        if entry.dtype not in _NUMPY_DTYPES:
            log.debug("%s: skipping %r of dtype %s", prefix, entry.name, entry.dtype_name)
            continue
        wanted.setdefault(entry.shard_id, []).append(entry)
    out: dict[str, np.ndarray] = {}
    for shard, entries in sorted(wanted.items()):
        shard_path = _shard_path(prefix, shard, header.num_shards)
        if not shard_path.is_file():
            raise FileNotFoundError(f"{shard_path}: missing data shard of checkpoint {prefix}")
        file_size = shard_path.stat().st_size
        with open(shard_path, "rb") as f:
            for entry in sorted(entries, key=lambda e: e.offset):
                if entry.offset < 0 or entry.size < 0 or entry.offset + entry.size > file_size:
                    raise ValueError(
                        f"{shard_path}: truncated: variable {entry.name!r} needs bytes "
                        f"{entry.offset}..{entry.offset + entry.size}, the file has {file_size}"
                    )
                f.seek(entry.offset)
                raw = bytearray(entry.size)
                if f.readinto(raw) != entry.size:
                    raise ValueError(f"{shard_path}: truncated while reading variable {entry.name!r}")
                if entry.crc32c is not None and crc32c(raw) != _unmask(entry.crc32c):
                    raise ValueError(f"{shard_path}: checksum mismatch in variable {entry.name!r}")
                out[entry.name] = _to_array(entry, raw, header.big_endian, shard_path)
    return {name: out[name] for name in index.entries if name in out}
