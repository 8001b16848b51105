"""Reading a parameter block in the Kedro layer: its class's ``from_params``, errors naming
the file (``parameters_<block>.yml: <message>``), and :class:`RunParams`, a flat block made of
a core configuration's keys with run keys beside them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeVar

from fgrpo_pipeline.algorithms.params import Params, check_keys, mapping_of

T = TypeVar("T")


def read_params(cls: type[T], params: Mapping[str, Any] | None) -> T:
    """``cls.from_params(params)``; a bad value raises one ``ValueError`` that starts with the
    block's file, ``parameters_<cls.BLOCK>.yml: ``."""
    try:
        return cls.from_params(params)
    except (TypeError, ValueError) as err:
        raise ValueError(f"parameters_{cls.BLOCK}.yml: {err}") from err


@dataclass
class RunParams(Params):
    """A flat block: the keys of a core configuration (``CONFIG``, built into ``config``) and,
    beside them, the subclass's other fields (run keys such as ``progress``), e.g. the
    ``training`` block: TrainerConfig's keys, ``progress`` and ``resume_dir``."""

    CONFIG: ClassVar[type]

    config: Any

    @classmethod
    def config_keys(cls) -> tuple[str, ...]:
        """The keys of the block that go to ``CONFIG``."""
        return tuple(f.name for f in fields(cls.CONFIG) if f.init and not f.name.startswith("_"))

    @classmethod
    def build_config(cls, params: dict[str, Any], where: str) -> Any:
        return cls.CONFIG.from_params(params, where=where)

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None, *, where: str = ""):
        where = where or cls.BLOCK
        values = mapping_of(params, where)
        own = [key for key in cls.param_names() if key != "config"]
        check_keys(values, [*cls.config_keys(), *own], where)
        run = {key: values.pop(key) for key in own if key in values}
        return super().from_params({"config": cls.build_config(values, where), **run}, where=where)
