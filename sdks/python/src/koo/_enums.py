"""`OpenEnum`: the base of the SDK's enums of koo's protobuf values.

Why: protobuf enums are open. A newer koo may send a value this SDK was
built before (a new task state, category or policy: additive within v1),
and a plain `IntEnum` raises `ValueError` on it, so one new value on the
server would break every old client that reads a task. An `OpenEnum` keeps
such a value as a member named `UNRECOGNIZED_<n>` instead, equal to its
number; code that matches the members it knows goes on working.

They also print by name (`RUNNING`, not `4`): Python 3.11 made an
`IntEnum` print as its number.
"""

from __future__ import annotations

from enum import IntEnum


class OpenEnum(IntEnum):
    """An `IntEnum` that accepts any integer (see the module's doc)."""

    @classmethod
    def _missing_(cls, value: object) -> OpenEnum | None:
        if not isinstance(value, int) or isinstance(value, bool):
            return None
        member = int.__new__(cls, value)
        member._name_ = f"UNRECOGNIZED_{value}"
        member._value_ = value
        return member

    def __str__(self) -> str:
        return self.name

    def __format__(self, spec: str) -> str:
        # a number's format (`:d`, `:x`, `:03`) formats the number, as an
        # IntEnum's did; anything else the name
        if spec and spec[-1] in "bcdeEfFgGnoxX%":
            return int.__format__(int(self), spec)
        return format(self.name, spec)
