"""Task data sources: tables of prompts with reference answers.

Every source returns a pandas table with at least ``PROMPT_COLUMNS`` (all strings):
``id`` (e.g. ``"arith-train-00012"``), ``prompt``, ``ground_truth`` (the reference answer as a
plain number string such as ``"19"`` or ``"-4"``) and ``split`` (``"train"``, ``"test"`` or, for
the synthetic task only, ``"ood"``: held-out problems with operands beyond the training range).
The synthetic task's tables also have ``DIFFICULTY`` (see :func:`arithmetic_difficulty`), the
strata of ``evaluation.strata``; GSM8K's have no such column.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fgrpo_pipeline.algorithms.params import ParameterError, Params, require, require_choice

PROMPT_COLUMNS = ("id", "prompt", "ground_truth", "split")
# Optional column: a prompt's difficulty stratum (a string), present in arithmetic tables.
DIFFICULTY = "difficulty"
ARITHMETIC_COLUMNS = (*PROMPT_COLUMNS, DIFFICULTY)
SPLITS = ("train", "test", "ood")
# GSM8K ships these two; ood exists only for the synthetic task (it needs an operand range).
GSM8K_SPLITS = ("train", "test")

_OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
# GSM8K's last answer line: "#### 72", "#### -3", "#### 2.5", "#### 1,200".
_GSM8K_FINAL = re.compile(r"####\s*(-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)")


def _check_int(value: object, name: str) -> int:
    require(
        isinstance(value, int) and not isinstance(value, bool),
        name,
        f"must be an integer, got {value!r}",
    )
    return value


@dataclass
class ArithmeticConfig(Params):
    """The synthetic arithmetic problems (``data_preparation.arithmetic``)."""

    BLOCK = "arithmetic"

    n_train: int = 720
    n_test: int = 180
    operations: tuple[str, ...] = ("+", "-", "*")
    operand_min: int = 0
    operand_max: int = 29
    n_ood: int = 180
    ood_operand_max: int = 39
    seed: int = 0

    def check(self) -> None:
        for name in ("n_train", "n_test", "n_ood"):
            value = getattr(self, name)
            require(value >= 0, name, f"must be >= 0, got {value}")
        require(
            self.operand_min <= self.operand_max,
            "operand_min",
            f"({self.operand_min}) must be <= operand_max ({self.operand_max})",
        )
        require(bool(self.operations), "operations", "must name at least one operation")
        for op in self.operations:
            require_choice(op, tuple(_OPERATIONS), "operations")
        require(
            len(set(self.operations)) == len(self.operations),
            "operations",
            f"has duplicates: {self.operations!r}",
        )
        require(
            self.n_train + self.n_test <= self.n_distinct(),
            "n_train + n_test",
            f"= {self.n_train + self.n_test} exceeds the {self.n_distinct()} distinct problems "
            f"for operations={self.operations!r}, operands in "
            f"[{self.operand_min}, {self.operand_max}]",
        )
        if self.n_ood:
            self._check_ood()

    def _check_ood(self) -> None:
        require(
            self.ood_operand_max > self.operand_max,
            "ood_operand_max",
            f"({self.ood_operand_max}) must be > operand_max ({self.operand_max}) when "
            f"n_ood > 0 (n_ood = {self.n_ood}): ood problems need an operand above operand_max",
        )
        require(
            self.n_ood <= self.n_distinct_ood(),
            "n_ood",
            f"= {self.n_ood} exceeds the {self.n_distinct_ood()} distinct ood problems for "
            f"operations={self.operations!r}, operands in [{self.operand_min}, "
            f"{self.ood_operand_max}] with at least one > operand_max ({self.operand_max})",
        )

    def n_distinct(self) -> int:
        """How many distinct ``(a, op, b)`` problems there are."""
        return len(self.operations) * (self.operand_max - self.operand_min + 1) ** 2

    def n_distinct_ood(self) -> int:
        """How many distinct ood problems there are: both operands in [operand_min,
        ood_operand_max], at least one above operand_max."""
        wide = max(self.ood_operand_max, self.operand_max) - self.operand_min + 1
        return len(self.operations) * wide**2 - self.n_distinct()


def make_arithmetic_prompts(
    *,
    n_train: int,
    n_test: int,
    operations: tuple[str, ...] | list[str] = ("+", "-", "*"),
    operand_min: int = 0,
    operand_max: int = 29,
    seed: int = 0,
    n_ood: int = 0,
    ood_operand_max: int = 39,
) -> pd.DataFrame:
    """Seeded synthetic problems ``"{a}{op}{b}="`` with their integer answers and their
    ``difficulty`` (:func:`arithmetic_difficulty`).

    Distinct ``(a, op, b)`` triples are drawn without replacement, so no prompt appears in
    two splits; the same arguments always give the same table. The arguments are checked
    as :class:`ArithmeticConfig` checks them, but ``n_ood`` defaults to 0 here (the config's
    default is 180): a table built in code holds only the splits its caller asks for.
    """
    config = ArithmeticConfig(
        n_train=n_train,
        n_test=n_test,
        operations=operations,
        operand_min=operand_min,
        operand_max=operand_max,
        seed=seed,
        n_ood=n_ood,
        ood_operand_max=ood_operand_max,
    )
    return arithmetic_prompts(config)


def arithmetic_difficulty(a: int, op: str, b: int) -> str:
    """The difficulty stratum of ``a op b``: ``"carry"`` / ``"no_carry"`` for a sum of two
    operands ≥ 0 whose units digits do / do not carry into the tens (5+7, 19+1 carry; 12+3
    does not), ``"other"`` for every other problem.

    Only "+" is stratified: a borrow or a units-digit product is a different skill, and with a
    negative operand a "sum" is a subtraction, so one carry rule would not mean one thing
    there; "other" keeps those rows in a stratum of their own rather than mislabelled.
    """
    if op == "+" and a >= 0 and b >= 0:
        return "carry" if a % 10 + b % 10 >= 10 else "no_carry"
    return "other"


def _arithmetic_row(split: str, number: int, a: int, op: str, b: int) -> dict[str, str]:
    return {
        "id": f"arith-{split}-{number:05d}",
        "prompt": f"{a}{op}{b}=",
        "ground_truth": str(_OPERATIONS[op](a, b)),
        "split": split,
        DIFFICULTY: arithmetic_difficulty(a, op, b),
    }


def _ood_problem(config: ArithmeticConfig, index: int) -> tuple[int, str, int]:
    """Problem ``index`` of the ood grid: per operation, the ``wide``² operand pairs of
    [operand_min, ood_operand_max] minus the ``inner``² of [operand_min, operand_max], listed
    as the rows a ≤ operand_max (b above it only), then the rows a > operand_max (any b)."""
    inner = config.operand_max - config.operand_min + 1
    wide = config.ood_operand_max - config.operand_min + 1
    op_index, rest = divmod(index, wide**2 - inner**2)
    if rest < inner * (wide - inner):
        a_offset, b_offset = divmod(rest, wide - inner)
        b_offset += inner
    else:
        a_offset, b_offset = divmod(rest - inner * (wide - inner), wide)
        a_offset += inner
    return config.operand_min + a_offset, config.operations[op_index], config.operand_min + b_offset


def arithmetic_prompts(config: ArithmeticConfig) -> pd.DataFrame:
    """The prompts table of :func:`make_arithmetic_prompts` for a checked ``config``."""
    n_train, n_test, operations = config.n_train, config.n_test, config.operations
    n_operands = config.operand_max - config.operand_min + 1
    # Sampling indices of the (op, a, b) grid keeps memory small and the draw deterministic.
    picks = random.Random(config.seed).sample(range(config.n_distinct()), n_train + n_test)
    rows = []
    for i, index in enumerate(picks):
        op_index, rest = divmod(index, n_operands**2)
        a_offset, b_offset = divmod(rest, n_operands)
        op = operations[op_index]
        a, b = config.operand_min + a_offset, config.operand_min + b_offset
        split, number = ("train", i) if i < n_train else ("test", i - n_train)
        rows.append(_arithmetic_row(split, number, a, op, b))
    if config.n_ood:
        # A stream of its own (a string seed is hashed deterministically), so adding or
        # resizing the ood split never moves a train or test problem.
        ood_rng = random.Random(f"arithmetic-ood-{config.seed}")
        ood_picks = ood_rng.sample(range(config.n_distinct_ood()), config.n_ood)
        for number, index in enumerate(ood_picks):
            rows.append(_arithmetic_row("ood", number, *_ood_problem(config, index)))
    return pd.DataFrame(rows, columns=list(ARITHMETIC_COLUMNS), dtype=object)


def read_jsonl_objects(path: Path):
    """Yield ``(line_number, where, object)`` for the non-blank lines of a jsonl file."""
    seen_any = False
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            seen_any = True
            where = f"{path}, line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: invalid JSON ({error})") from error
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield line_number, where, record
    if not seen_any:
        raise ValueError(f"{path}: no records (the file is empty or blank)")


def hub_records(name: str, config: str | None, split: str):
    """Yield ``(index, where, record)`` of a dataset on the Hugging Face hub (e.g.
    ``openai/gsm8k``, config ``main``) through the optional ``datasets`` package."""
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"loading {name!r} from the hub needs the optional `datasets` package "
            "(pip install datasets), or copy the jsonl files and set train_path / test_path"
        ) from None
    for index, record in enumerate(datasets.load_dataset(name, config, split=split)):
        yield index, f"{name}[{split}] row {index}", dict(record)


def load_gsm8k(
    path: str | Path | None,
    *,
    split: str,
    limit: int | None = None,
    prompt_template: str = "{question}\nAnswer:",
    hub_name: str | None = None,
    hub_config: str | None = "main",
) -> pd.DataFrame:
    """Read GSM8K (a jsonl file, or ``hub_name`` from the hub) into a prompts table plus a
    ``solution`` column.

    ``ground_truth`` is the number on the answer's final ``#### <n>`` line without thousands
    commas; ``solution`` is the full worked answer. Every record is validated, and the first
    bad one raises a ``ValueError`` naming the file and its 1-based line (or the hub row).
    """
    if split not in GSM8K_SPLITS:
        raise ValueError(f"split must be one of {GSM8K_SPLITS}, got {split!r}")
    if limit is not None and (_check_int(limit, "limit") < 0):
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    _check_template(prompt_template)

    if hub_name:
        records = hub_records(hub_name, hub_config, split)
    elif path:
        records = read_jsonl_objects(Path(path))
    else:
        raise ValueError(f"GSM8K {split}: set a jsonl path or hub_name")
    rows = []
    for _, where, record in records:
        for key in ("question", "answer"):
            if key not in record:
                raise ValueError(f"{where}: missing field {key!r}")
        question, answer = record["question"], record["answer"]
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where}: 'question' must be a non-empty string")
        if not isinstance(answer, str):
            raise ValueError(f"{where}: 'answer' must be a string")
        lines = answer.strip().splitlines()
        final = _GSM8K_FINAL.fullmatch(lines[-1].strip()) if lines else None
        if final is None:
            raise ValueError(f"{where}: 'answer' does not end with a '#### <number>' line")
        number = len(rows)
        rows.append(
            {
                "id": f"gsm8k-{split}-{number:05d}",
                "prompt": prompt_template.format(question=question),
                "ground_truth": final.group(1).replace(",", ""),
                "split": split,
                "solution": answer,
            }
        )
    if limit is not None:
        rows = rows[:limit]
    return pd.DataFrame(rows, columns=[*PROMPT_COLUMNS, "solution"], dtype=object)


def _check_template(prompt_template: str) -> None:
    try:
        prompt_template.format(question="")
    except (KeyError, IndexError, ValueError, AttributeError) as error:
        raise ParameterError(
            "prompt_template",
            f"must only use the field {{question}}: {prompt_template!r} ({error})",
        ) from error


@dataclass
class GSM8KConfig(Params):
    """GSM8K from jsonl files or the hub (``data_preparation.gsm8k``)."""

    BLOCK = "gsm8k"

    train_path: str | None = None
    test_path: str | None = None
    limit_train: int | None = None
    limit_test: int | None = None
    prompt_template: str = "{question}\nAnswer:"
    hub_name: str | None = None
    hub_config: str | None = "main"

    def check(self) -> None:
        for split in GSM8K_SPLITS:
            limit = getattr(self, f"limit_{split}")
            require(
                limit is None or limit >= 0, f"limit_{split}", f"must be >= 0 or null, got {limit}"
            )
            require(
                bool(self.hub_name or getattr(self, f"{split}_path")),
                f"{split}_path",
                "is not set: give a jsonl path, or hub_name",
            )
        _check_template(self.prompt_template)

    def load(self) -> pd.DataFrame:
        """Both splits' prompts tables, train first."""
        return pd.concat(
            [
                load_gsm8k(
                    getattr(self, f"{split}_path"),
                    split=split,
                    limit=getattr(self, f"limit_{split}"),
                    prompt_template=self.prompt_template,
                    hub_name=self.hub_name,
                    hub_config=self.hub_config,
                )
                for split in GSM8K_SPLITS
            ],
            ignore_index=True,
        )


@dataclass
class DataPreparationConfig(Params):
    """Where the prompts table comes from (``data_preparation`` in
    parameters_data_preparation.yml): the block named by ``source`` is the one used."""

    BLOCK = "data_preparation"
    SOURCES = ("arithmetic", "gsm8k")

    source: str = "arithmetic"
    arithmetic: ArithmeticConfig | None = None
    gsm8k: GSM8KConfig | None = None

    def check(self) -> None:
        require_choice(self.source, self.SOURCES, "source")
        require(getattr(self, self.source) is not None, self.source, "is missing")

    def prompts(self) -> pd.DataFrame:
        """The prompts table (id, prompt, ground_truth, split; arithmetic adds difficulty) of
        the selected source."""
        if self.source == "arithmetic":
            return arithmetic_prompts(self.arithmetic)
        return self.gsm8k.load()


def validate_prompts(df: pd.DataFrame, source: str, splits: tuple[str, ...] = SPLITS) -> None:
    """Raise a ``ValueError`` naming ``source``, column and row if ``df`` is not a prompts table.

    Checks: all ``PROMPT_COLUMNS`` present and string-valued, non-blank prompts, unique ids,
    and splits in ``splits`` (default ``SPLITS``: train, test and the optional ood). The
    optional ``DIFFICULTY`` column, where present, must hold non-blank strings: a missing
    value would drop its prompt from every stratum of ``evaluation.strata``.
    """
    missing = [column for column in PROMPT_COLUMNS if column not in df.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; expected {list(PROMPT_COLUMNS)}")
    optional = [DIFFICULTY] if DIFFICULTY in df.columns else []
    for column in (*PROMPT_COLUMNS, *optional):
        for row, value in df[column].items():
            if not isinstance(value, str):
                raise ValueError(
                    f"{source}: column {column!r}, row {row!r}: expected a string, got {value!r}"
                )
    for column in ("prompt", *optional):
        for row, value in df[column].items():
            if not value.strip():
                raise ValueError(f"{source}: column {column!r}, row {row!r}: empty {column}")
    duplicated = df["id"].duplicated()
    if duplicated.any():
        row = duplicated.idxmax()
        raise ValueError(f"{source}: column 'id', row {row!r}: duplicate id {df['id'][row]!r}")
    for row, value in df["split"].items():
        if value not in splits:
            raise ValueError(
                f"{source}: column 'split', row {row!r}: {value!r} is not one of {splits}"
            )
