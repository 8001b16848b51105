"""Validated parameter blocks: dataclasses built from a mapping (a block of a parameters YAML).

Plain Python. :meth:`Params.from_params` refuses unknown keys (naming the valid ones) and
builds nested blocks (fields whose type is a dataclass) from their mappings; when the object
is made, each field's type is checked against its annotation, then :meth:`Params.check`
checks ranges and relations. A bad value raises a :class:`ParameterError` naming it by its
path in the block (``base_policy.warmup.steps must be an integer ≥ 0, got -1``).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeVar

P = TypeVar("P", bound="Params")


class ParameterError(ValueError):
    """A bad parameter value: ``name`` (its key, or its path in a block) and the problem."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name} {problem}")
        self.name = name
        self.problem = problem

    def under(self, where: str) -> ParameterError:
        """The same error with ``name`` prefixed by the block it sits in."""
        return ParameterError(f"{where}.{self.name}", self.problem)


def require(ok: bool, name: str, problem: str) -> None:
    """Raise ``ParameterError(name, problem)`` unless ``ok``."""
    if not ok:
        raise ParameterError(name, problem)


def require_choice(value: object, choices: Sequence[str], name: str) -> None:
    """``value`` must be one of ``choices``; the error lists them."""
    require(value in choices, name, f"{value!r} is unknown; valid: {', '.join(choices)}")


@dataclass
class Params:
    """Base of a validated parameter block (subclass it with ``@dataclass``).

    ``BLOCK`` names the block in messages (e.g. ``"base_policy"``; a nested block is named by
    its path instead). ``RUN_KEYS`` lists the fields that say how a run is shown or resumed
    (``progress``, ``resume_dir``) rather than what it computes. Fields whose name starts
    with ``_`` are not parameters.
    """

    BLOCK: ClassVar[str] = "parameters"
    RUN_KEYS: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        for name, hint in _hints(type(self)).items():
            setattr(self, name, coerce(getattr(self, name), hint, name))
        self.check()

    def check(self) -> None:
        """Ranges and relations between fields (raise :class:`ParameterError`)."""

    def as_kwargs(self) -> dict[str, Any]:
        """The parameters as keyword arguments (nested blocks stay objects)."""
        return {name: getattr(self, name) for name in self.param_names()}

    @classmethod
    def param_names(cls) -> tuple[str, ...]:
        """The parameter names of the block, in declaration order."""
        return tuple(_hints(cls))

    @classmethod
    def from_params(cls: type[P], params: Mapping[str, Any] | None, *, where: str = "") -> P:
        """Build from a parameters mapping; ``None`` is all defaults. ``where`` is the block's
        path in messages (default ``BLOCK``)."""
        where = where or cls.BLOCK
        values = mapping_of(params, where)
        check_keys(values, cls.param_names(), where)
        missing = [
            f.name
            for f in fields(cls)
            if f.name in cls.param_names()
            and f.name not in values
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ValueError(f"{where}: missing key(s) {missing}")
        hints = _hints(cls)
        for name, value in values.items():
            block = _dataclass_in(hints[name])
            if block is not None and isinstance(value, Mapping):
                values[name] = build(block, value, f"{where}.{name}")
        try:
            return cls(**values)
        except ParameterError as err:
            raise err.under(where) from None


def mapping_of(params: object, where: str) -> dict[str, Any]:
    """``params`` as a dict (``None``: empty); anything but a mapping is an error."""
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise ValueError(f"{where} must be a mapping of parameters, got {params!r}")
    return dict(params)


def check_keys(values: Mapping[str, Any], valid: Sequence[str], where: str) -> None:
    """Unknown keys are an error naming the valid ones."""
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f"unknown {where} key(s) {unknown}; valid: {', '.join(valid)}")


def build(cls: type, params: Mapping[str, Any], where: str) -> Any:
    """A nested block of type ``cls`` from its mapping: a :class:`Params` through its
    ``from_params``, another dataclass through its own ``from_params`` if it has one, else
    after the same unknown-key check; errors are prefixed by ``where``."""
    if issubclass(cls, Params):
        return cls.from_params(params, where=where)
    try:
        if hasattr(cls, "from_params"):
            return cls.from_params(params)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None
    values = mapping_of(params, where)
    check_keys(values, [f.name for f in fields(cls) if f.init and f.name[0] != "_"], where)
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None


def coerce(value: Any, hint: Any, name: str) -> Any:
    """``value`` checked against the type ``hint`` (int, float, bool, str, a list or tuple,
    a dict, a dataclass, unions of them; anything else passes), converted where that is
    lossless: a list to a tuple for ``tuple[...]``, an int to a float, a mapping to a
    dataclass."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(value, option, name)
            except ParameterError:
                continue
        raise ParameterError(name, f"must be {' or '.join(map(_describe, args))}, got {value!r}")
    check = _CHECKS.get(origin or hint)
    if check is not None:
        require(check(value), name, f"must be {_describe(hint)}, got {value!r}")
        return _convert(value, hint, name)
    block = _dataclass_in(hint)
    if block is not None:
        if isinstance(value, Mapping):
            return build(block, value, name)
        require(isinstance(value, block), name, f"must be {_describe(hint)}, got {value!r}")
    return value


def _is_sequence(value: object) -> bool:
    return isinstance(value, (list, tuple))


_CHECKS = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
    list: _is_sequence,
    tuple: _is_sequence,
    dict: lambda v: isinstance(v, Mapping),
}
_NAMES = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    tuple: "a list",
    dict: "a mapping",
    type(None): "null",
}


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (list, tuple) and args:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if _dataclass_in(hint) is not None:
        return f"a mapping ({hint.__name__})"
    return _NAMES.get(origin or hint, getattr(hint, "__name__", str(hint)))


def _convert(value: Any, hint: Any, name: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is float:
        return float(value)
    if origin in (list, tuple) and args:
        items = [coerce(item, args[0], f"{name}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if (origin or hint) is dict:
        return dict(value)
    return value


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass ``hint`` names (alone, or beside None in a union), else None."""
    options = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(options) == 1:
        hint = options[0]
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Parameter name → resolved annotation, for the init fields not starting with ``_``."""
    resolved = typing.get_type_hints(cls)
    return {f.name: resolved[f.name] for f in fields(cls) if f.init and not f.name.startswith("_")}
