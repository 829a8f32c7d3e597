"""The CTranslate2 room: a reader for CTranslate2's ``model.bin`` (binary versions 1-6): header,
spec name and revision, every variable as a numpy array, and the aliases."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["DTYPES", "FormatError", "ModelBin", "read_model_bin"]

#: CTranslate2's DataType enum (include/ctranslate2/types.h), in order: type id -> numpy dtype
DTYPES: tuple[str, ...] = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
#: the newest binary version this reader knows (CTranslate2's CURRENT_BINARY_VERSION)
MAX_VERSION = 6
_ITEM_SIZES = {4: "float32", 1: "int8", 2: "float16"}  # binary versions < 4 store an item size


class FormatError(ValueError):
    """The bytes are not a CTranslate2 model.bin this reader understands (the message says where)."""


@dataclass
class ModelBin:
    """One CTranslate2 model: ``variables`` maps each stored name to its array (a read-only view
    of the file's bytes; bfloat16 is widened to float32), ``aliases`` maps a name to the stored
    variable it shares."""

    version: int
    spec: str
    revision: int
    variables: dict[str, np.ndarray] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.variables[self.aliases.get(name, name)]

    def __contains__(self, name: object) -> bool:
        return name in self.variables or name in self.aliases

    def names(self) -> list[str]:
        """Every name the model answers to: stored variables, then aliases."""
        return [*self.variables, *self.aliases]

    def scalar(self, name: str) -> int | float:
        """A 0-d variable (a flag, a count, an enum) as a Python number."""
        value = self[name]
        if value.ndim != 0:
            raise FormatError(f"variable {name!r} is not a scalar: shape {value.shape}")
        return value.item()


class _Cursor:
    def __init__(self, data: bytes | bytearray | memoryview, source: str):
        self.data, self.pos, self.source = memoryview(data), 0, source

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            left = len(self.data) - self.pos
            raise FormatError(
                f"{self.source}: truncated at byte {self.pos} reading {what} "
                f"({n} bytes needed, {left} left)"
            )
        view = self.data[self.pos : self.pos + n]
        self.pos += n
        return view

    def unpack(self, fmt: str, what: str) -> tuple:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))

    def string(self, what: str) -> str:
        (n,) = self.unpack("H", f"the length of {what}")
        if n == 0:
            raise FormatError(f"{self.source}: invalid string length 0 at byte {self.pos - 2}")
        raw = bytes(self.take(n, what))
        if raw[-1] != 0:
            raise FormatError(f"{self.source}: {what} at byte {self.pos - n} is not NUL-terminated")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(
                f"{self.source}: {what} at byte {self.pos - n} is not UTF-8"
            ) from None


def _variable(cur: _Cursor, version: int, index: int) -> tuple[str, np.ndarray, str]:
    name = cur.string(f"the name of variable {index}")
    (rank,) = cur.unpack("B", f"the rank of {name!r}")
    shape = cur.unpack(f"{rank}I", f"the shape of {name!r}") if rank else ()
    if version >= 4:
        type_id, num_bytes = cur.unpack("BI", f"the dtype of {name!r}")
        if type_id >= len(DTYPES):
            raise FormatError(f"{cur.source}: variable {name!r} has an unknown dtype id {type_id}")
        dtype = DTYPES[type_id]
    else:
        item_size, count = cur.unpack("BI", f"the item size of {name!r}")
        if item_size not in _ITEM_SIZES:
            raise FormatError(f"{cur.source}: variable {name!r} has item size {item_size}")
        dtype, num_bytes = _ITEM_SIZES[item_size], count * item_size
    size = int(np.prod(shape, dtype=np.int64))
    itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
    if num_bytes != size * itemsize:
        raise FormatError(
            f"{cur.source}: variable {name!r} has an invalid payload size: {num_bytes} bytes "
            f"for shape {tuple(shape)} of {dtype}"
        )
    raw = cur.take(num_bytes, f"the data of {name!r}")
    if dtype == "bfloat16":  # numpy has no bfloat16: widen exactly (the high half of float32)
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        array = bits.view(np.float32)
    else:
        array = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
    return name, array.reshape(shape), dtype


def _chunks(paths: Sequence[str | os.PathLike]) -> Iterator[bytes]:
    for p in paths:
        with open(p, "rb") as f:
            yield f.read()


def read_model_bin(source: str | os.PathLike | Sequence[str | os.PathLike] | bytes) -> ModelBin:
    """Read a CTranslate2 ``model.bin``.

    Args:
        source: the file, its parts in order (read as one file), or its bytes.

    Returns:
        The :class:`ModelBin` (arrays are read-only views of the bytes read).

    Raises:
        FormatError: a truncated or corrupted file, an unknown binary version or dtype, a
            payload that does not match its shape, bytes left over, an alias to nothing.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, where = source, "model.bin"
    else:
        paths = [source] if isinstance(source, (str, os.PathLike)) else list(source)
        data = b"".join(_chunks(paths))
        where = os.fspath(paths[0]) + (f" (+{len(paths) - 1} parts)" if len(paths) > 1 else "")
    cur = _Cursor(data, where)
    (version,) = cur.unpack("I", "the binary version")
    if not 1 <= version <= MAX_VERSION:
        raise FormatError(
            f"{where}: binary version {version} is not a CTranslate2 model.bin this reader knows "
            f"(1-{MAX_VERSION}); is it a CTranslate2 model?"
        )
    spec, revision = "", 1
    if version >= 2:
        spec = cur.string("the spec name")
        (revision,) = cur.unpack("I", "the spec revision")
    model = ModelBin(version=version, spec=spec, revision=revision)
    (count,) = cur.unpack("I", "the number of variables")
    for i in range(count):
        name, array, dtype = _variable(cur, version, i)
        if name in model.variables:
            raise FormatError(f"{where}: variable {name!r} is stored twice")
        model.variables[name], model.dtypes[name] = array, dtype
    if version >= 3:
        (count,) = cur.unpack("I", "the number of aliases")
        for i in range(count):
            alias = cur.string(f"alias {i}")
            target = cur.string(f"the target of alias {alias!r}")
            if target not in model.variables:
                raise FormatError(f"{where}: alias {alias!r} names a missing variable {target!r}")
            model.aliases[alias] = target
    if cur.pos != len(cur.data):
        raise FormatError(f"{where}: {len(cur.data) - cur.pos} bytes left over after the aliases")
    return model
