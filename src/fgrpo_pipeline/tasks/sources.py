"""Task data sources: tables of prompts with reference answers.

Every source returns a pandas table with at least ``PROMPT_COLUMNS`` (all strings):
``id`` (e.g. ``"arith-train-00012"``), ``prompt``, ``ground_truth`` (the reference answer as a
plain number string such as ``"19"`` or ``"-4"``) and ``split`` (``"train"`` or ``"test"``).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pandas as pd

PROMPT_COLUMNS = ("id", "prompt", "ground_truth", "split")
SPLITS = ("train", "test")

_OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
# GSM8K's last answer line: "#### 72", "#### -3", "#### 2.5", "#### 1,200".
_GSM8K_FINAL = re.compile(r"####\s*(-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)")


def _check_int(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


def make_arithmetic_prompts(
    *,
    n_train: int,
    n_test: int,
    operations: tuple[str, ...] | list[str] = ("+", "-", "*"),
    operand_min: int = 0,
    operand_max: int = 29,
    seed: int = 0,
) -> pd.DataFrame:
    """Seeded synthetic problems ``"{a}{op}{b}="`` with their integer answers.

    Distinct ``(a, op, b)`` triples are drawn without replacement, so no prompt appears in
    both splits; the same arguments always give the same table.
    """
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if _check_int(value, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    _check_int(operand_min, "operand_min")
    _check_int(operand_max, "operand_max")
    _check_int(seed, "seed")
    if operand_min > operand_max:
        raise ValueError(f"operand_min ({operand_min}) must be <= operand_max ({operand_max})")
    operations = tuple(operations)
    if not operations:
        raise ValueError("operations must name at least one operation")
    for op in operations:
        if op not in _OPERATIONS:
            raise ValueError(
                f"unknown operation {op!r} in operations; valid: {', '.join(_OPERATIONS)}"
            )
    if len(set(operations)) != len(operations):
        raise ValueError(f"operations has duplicates: {operations!r}")

    n_operands = operand_max - operand_min + 1
    n_distinct = len(operations) * n_operands**2
    if n_train + n_test > n_distinct:
        raise ValueError(
            f"n_train + n_test = {n_train + n_test} exceeds the {n_distinct} distinct problems "
            f"for operations={operations!r}, operands in [{operand_min}, {operand_max}]"
        )

    # Sampling indices of the (op, a, b) grid keeps memory small and the draw deterministic.
    picks = random.Random(seed).sample(range(n_distinct), n_train + n_test)
    rows = []
    for i, index in enumerate(picks):
        op_index, rest = divmod(index, n_operands**2)
        a_offset, b_offset = divmod(rest, n_operands)
        op, a, b = operations[op_index], operand_min + a_offset, operand_min + b_offset
        split, number = ("train", i) if i < n_train else ("test", i - n_train)
        rows.append(
            {
                "id": f"arith-{split}-{number:05d}",
                "prompt": f"{a}{op}{b}=",
                "ground_truth": str(_OPERATIONS[op](a, b)),
                "split": split,
            }
        )
    return pd.DataFrame(rows, columns=list(PROMPT_COLUMNS), dtype=object)


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
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if limit is not None and (_check_int(limit, "limit") < 0):
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    try:
        prompt_template.format(question="")
    except (KeyError, IndexError, ValueError, AttributeError) as error:
        raise ValueError(
            f"prompt_template must only use the field {{question}}: {prompt_template!r} ({error})"
        ) from error

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


def validate_prompts(df: pd.DataFrame, source: str, splits: tuple[str, ...] = SPLITS) -> None:
    """Raise a ``ValueError`` naming ``source``, column and row if ``df`` is not a prompts table.

    Checks: all ``PROMPT_COLUMNS`` present and string-valued, non-blank prompts, unique ids,
    and splits in ``SPLITS``.
    """
    missing = [column for column in PROMPT_COLUMNS if column not in df.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; expected {list(PROMPT_COLUMNS)}")
    for column in PROMPT_COLUMNS:
        for row, value in df[column].items():
            if not isinstance(value, str):
                raise ValueError(
                    f"{source}: column {column!r}, row {row!r}: expected a string, got {value!r}"
                )
    for row, value in df["prompt"].items():
        if not value.strip():
            raise ValueError(f"{source}: column 'prompt', row {row!r}: empty prompt")
    duplicated = df["id"].duplicated()
    if duplicated.any():
        row = duplicated.idxmax()
        raise ValueError(f"{source}: column 'id', row {row!r}: duplicate id {df['id'][row]!r}")
    for row, value in df["split"].items():
        if value not in splits:
            raise ValueError(
                f"{source}: column 'split', row {row!r}: {value!r} is not one of {splits}"
            )
