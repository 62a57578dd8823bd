"""Python values to koo's protobuf values and back.

The cache keeps a value in one of three kinds (`CacheValue.kind`): `str` is
stored as text, `bytes` (and `bytearray`, `memoryview`) as raw bytes, and
anything else JSON can hold (dict, list, tuple, int, float, bool, None) as a
`google.protobuf.Value`. A read gives back the kind that was written.

JSON numbers travel as IEEE doubles: a whole number within +-2**53 comes back
as `int` (so `3` and `3.0` both read back as `3`), other numbers as `float`.
Tuples come back as lists. NaN and infinities are refused, by koo and here,
and so are integers beyond +-2**53, which a double cannot hold exactly (a
snowflake id would come back with other digits): pass those as `str`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any, TypeAlias

from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

from koo.cache.v1 import cache_service_pb2 as cache_pb

Seconds: TypeAlias = int | float | timedelta
"""A duration: seconds as a number, or a `timedelta`."""

_EXACT = 2**53
MAX_DEPTH = 32
"""Arrays and objects nest at most this deep in a JSON value (koo's limit)."""


def strings(field: str, values: Iterable[str]) -> list[str]:
    """`values` (keys, tags) as a list, refusing one `str` (or bytes): a str
    is itself an iterable of strings, and would be read as its characters
    (`tags="user:42"` tagging `u`, `s`, `e`...), which neither koo nor mypy
    can tell from what was meant."""
    if isinstance(values, str | bytes):
        raise TypeError(f"{field}: a list of strings, not one {type(values).__name__} (pass [{values!r}])")
    return list(values)


def arguments(args: Iterable[Any]) -> list[struct_pb2.Value]:
    """A task's positional arguments, refusing a str, bytes or mapping
    (read as characters, or as its keys)."""
    if isinstance(args, str | bytes | Mapping):
        raise TypeError(
            f"args: a list or tuple of arguments, not a {type(args).__name__} (pass ({args!r},), or kwargs=)"
        )
    return [to_proto_value(a) for a in args]


def to_proto_value(obj: object, _depth: int = 0) -> struct_pb2.Value:
    """Converts a JSON-able Python object to a `google.protobuf.Value`.

    Raises `TypeError` for what JSON cannot hold and `ValueError` for NaN,
    infinities and values nested deeper than koo accepts (`MAX_DEPTH`):
    koo would refuse them anyway, and a worker's stream would end on one.
    """
    if _depth >= MAX_DEPTH and isinstance(obj, (Mapping, list, tuple)):
        raise ValueError(f"nests deeper than {MAX_DEPTH} levels of arrays and objects (koo's limit for JSON values)")
    v = struct_pb2.Value()
    if obj is None:
        v.null_value = struct_pb2.NULL_VALUE
    elif isinstance(obj, bool):
        v.bool_value = obj
    elif isinstance(obj, int) and not -_EXACT <= obj <= _EXACT:
        raise ValueError(
            f"the integer {obj} is beyond +-2**53: JSON numbers travel as doubles and it would lose digits; "
            "pass it as a str"
        )
    elif isinstance(obj, (int, float)):
        f = float(obj)
        if not math.isfinite(f):
            raise ValueError(f"JSON numbers must be finite, not {obj!r}")
        v.number_value = f
    elif isinstance(obj, str):
        v.string_value = obj
    elif isinstance(obj, Mapping):
        struct = v.struct_value
        struct.SetInParent()
        for key, item in obj.items():
            if not isinstance(key, str):
                raise TypeError(f"JSON object keys must be str, not {type(key).__name__}")
            struct.fields[key].CopyFrom(to_proto_value(item, _depth + 1))
    elif isinstance(obj, (list, tuple)):
        values = v.list_value
        values.SetInParent()
        for item in obj:
            values.values.append(to_proto_value(item, _depth + 1))
    else:
        raise TypeError(
            f"{type(obj).__name__} is not JSON-able (use str, int, float, bool, None, lists and dicts"
            " of them; convert datetimes, UUIDs and Decimals to str first)"
        )
    return v


def from_proto_value(v: struct_pb2.Value) -> Any:
    """Converts a `google.protobuf.Value` back to plain Python."""
    kind = v.WhichOneof("kind")
    if kind == "bool_value":
        return v.bool_value
    if kind == "number_value":
        n = v.number_value
        if n.is_integer() and -_EXACT <= n <= _EXACT:
            return int(n)
        return n
    if kind == "string_value":
        return v.string_value
    if kind == "struct_value":
        return {k: from_proto_value(item) for k, item in v.struct_value.fields.items()}
    if kind == "list_value":
        return [from_proto_value(item) for item in v.list_value.values]
    return None


def to_cache_value(obj: object) -> cache_pb.CacheValue:
    """Chooses the cache value kind for a Python value (see the module doc)."""
    if isinstance(obj, str):
        return cache_pb.CacheValue(text=obj)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return cache_pb.CacheValue(raw=bytes(obj))
    return cache_pb.CacheValue(json=to_proto_value(obj))


def from_cache_value(v: cache_pb.CacheValue) -> Any:
    """The Python value of a cache value, in the kind it was written."""
    kind = v.WhichOneof("kind")
    if kind == "text":
        return v.text
    if kind == "raw":
        return v.raw
    if kind == "json":
        return from_proto_value(v.json)
    return None


def to_struct(mapping: Mapping[str, object]) -> struct_pb2.Struct:
    """A `google.protobuf.Struct` from a mapping of JSON-able values."""
    s = struct_pb2.Struct()
    for key, item in mapping.items():
        # the Struct is the first level of the value koo counts
        s.fields[key].CopyFrom(to_proto_value(item, 1))
    return s


def from_struct(s: struct_pb2.Struct) -> dict[str, Any]:
    """Plain Python from a `google.protobuf.Struct`."""
    return {k: from_proto_value(item) for k, item in s.fields.items()}


def to_duration(value: float | timedelta) -> duration_pb2.Duration:
    """A protobuf Duration from seconds or a timedelta."""
    d = duration_pb2.Duration()
    if isinstance(value, timedelta):
        d.FromTimedelta(value)
    else:
        d.FromNanoseconds(round(value * 1_000_000_000))
    return d


def from_duration(d: duration_pb2.Duration) -> timedelta:
    """A timedelta from a protobuf Duration."""
    return timedelta(seconds=d.seconds, microseconds=d.nanos // 1000)


def to_timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    """A protobuf Timestamp; a naive datetime is taken as UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    t = timestamp_pb2.Timestamp()
    t.FromDatetime(value)
    return t


def from_timestamp(t: timestamp_pb2.Timestamp) -> datetime | None:
    """An aware UTC datetime, or None for an unset (zero) timestamp."""
    if t.seconds == 0 and t.nanos == 0:
        return None
    return t.ToDatetime(tzinfo=timezone.utc)
