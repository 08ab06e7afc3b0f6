"""Checks that the private attributes edm relies on in a library are still where it expects them.

edm reaches into pika and PyMySQL in two gated modules (``edm.amqp._pika_private`` and
``edm.db._pymysql_private``). A release that renames one of those attributes must not leave
edm on a dead path: reading a renamed attribute fails late and far from the cause, and
assigning one silently creates an attribute the library never reads. So each gated module
lists what it touches as ``Private`` entries and checks them once, at import, with
``missing()``; when anything is missing it switches its fast path off and says so.

An entry is found when the class (or a base) has the attribute, or when one of its
functions assigns it (``self._x = ...`` in ``__init__``: instance attributes exist only on
instances). An entry edm assigns or overrides for the library to use (``read_by``) must also
be read somewhere in the named classes' code, or the assignment would change nothing.
"""

from __future__ import annotations

import dis
import functools
import inspect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import CodeType

_STORES = frozenset({"STORE_ATTR"})
_LOADS = frozenset({"LOAD_ATTR", "LOAD_METHOD", "LOAD_SUPER_ATTR", "DELETE_ATTR"})


@dataclass(frozen=True)
class Private:
    """One private attribute of ``owner`` that edm reads or calls; with ``read_by``, one that
    edm assigns or overrides and that the code of those classes must read (or call)."""

    owner: type
    name: str
    read_by: tuple[type, ...] = ()

    def __str__(self) -> str:
        return f"{self.owner.__module__}.{self.owner.__qualname__}.{self.name}"


def missing(privates: Iterable[Private]) -> list[str]:
    """What of ``privates`` the installed library lacks, each in words; empty when all is there."""
    problems: list[str] = []
    for private in privates:
        if not (hasattr(private.owner, private.name) or _uses(private.owner, private.name, _STORES)):
            problems.append(f"{private} (gone)")
        elif private.read_by and not any(_uses(c, private.name, _LOADS) for c in private.read_by):
            readers = ", ".join(f"{c.__module__}.{c.__qualname__}" for c in private.read_by)
            problems.append(f"{private} (no longer used by {readers})")
    return problems


def _uses(cls: type, name: str, opnames: frozenset[str]) -> bool:
    """Whether a function of ``cls`` or its bases stores (or loads) the attribute ``name``."""
    for code in _class_codes(cls):
        if name in code.co_names:  # cheap; only then the (slower) look at the instructions
            for instruction in dis.get_instructions(code):
                if instruction.opname in opnames and instruction.argval == name:
                    return True
    return False


@functools.cache
def _class_codes(cls: type) -> tuple[CodeType, ...]:
    return tuple(
        code
        for klass in inspect.getmro(cls)
        if klass is not object
        for value in vars(klass).values()
        for code in _codes(value)
    )


def _codes(value: object) -> Iterator[CodeType]:
    """The code objects of a class member (a function, static or class method, property),
    with those nested in it (closures, comprehensions)."""
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    if isinstance(value, property):
        for accessor in (value.fget, value.fset, value.fdel):
            yield from _codes(accessor)
        return
    code = getattr(value, "__code__", None)
    if not isinstance(code, CodeType):
        return
    stack = [code]
    while stack:
        code = stack.pop()
        yield code
        stack.extend(const for const in code.co_consts if isinstance(const, CodeType))
