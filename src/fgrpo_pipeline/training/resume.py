"""Resume states of the online loop: everything a killed run needs to continue exactly.

Plain torch (no Kedro, no MLflow); used by :func:`fgrpo_pipeline.training.loop.train`. A state is
written atomically (staged beside its target, fsynced, renamed) and checked against a
fingerprint of the run before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from fgrpo_pipeline.models.policy import Policy

if TYPE_CHECKING:
    from fgrpo_pipeline.algorithms.rewards import RewardFn
    from fgrpo_pipeline.training.config import StepMonitor, TrainerConfig
    from fgrpo_pipeline.training.preferences import PreferenceData

# Training parameters a resumed run may change: how long, how often to save, threads.
RESUME_FREE_KEYS = ("steps", "checkpoint_every", "num_threads", "keep_freed_memory")

#
# resume_dir/step_000040/   the latest state (older ones are removed once a newer one is in place)
#     model.pt              the policy's state_dict
#     optimizer.pt          the AdamW state_dict (under FSDP its full, unsharded form, keyed by
#                           parameter name)
#     trainer_state.pt      step, skipped-step count, RNG states, monitors' state_dicts
#     metrics.json          the metrics rows of steps 1..step
#     completions.json      the logged completion tables so far (one dict of columns each)
#     fingerprint.json      what the state belongs to: config, model, start weights, data
# resume_dir/.tmp-*         a state being written or removed; never loaded, swept at start

RESUME_FORMAT = 1
_STATE_DIR = re.compile(r"step_(\d+)")
_STAGING = ".tmp-"
_STATE_FILES = (
    "model.pt",
    "optimizer.pt",
    "trainer_state.pt",
    "metrics.json",
    "completions.json",
    "fingerprint.json",
)


def _json_plain(value: Any) -> Any:
    if isinstance(value, np.generic | torch.Tensor):
        return value.item()
    raise TypeError(f"cannot save {type(value).__name__} in a resume state: {value!r}")


def _sha256_json(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=_json_plain)
    return hashlib.sha256(text.encode()).hexdigest()


def _callable_name(fn: object) -> str | None:
    if fn is None:
        return None
    target = fn if hasattr(fn, "__qualname__") else type(fn)
    return f"{getattr(target, '__module__', '?')}.{target.__qualname__}"


def _weights_sha256(model: torch.nn.Module) -> str:
    """A digest of the parameters' bytes: exact, and blind to thread counts."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            digest.update(name.encode())
            data = param.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            digest.update(memoryview(data.numpy()))
    return digest.hexdigest()


# Options added after resume states existed, left out of the fingerprint at their
# defaults (which compute what the states' runs computed), so such states still resume.
_LATER_DEFAULTS = {
    "mixed_precision": "no",
    "share_prompts": True,
    "length_buckets": 1,
    "lr_schedule": "constant",
    "warmup_steps": 0,
    "engine_is_correction": "auto",
    "engine_is_cap": 2.0,
}
_LATER_LOSS_DEFAULTS = {"hal_scaling": "paper", "epsilon_high": None, "drop_zero_spread": False}


def fingerprint(
    config: TrainerConfig,
    policy: Policy,
    prompts: pd.DataFrame,
    preferences: PreferenceData | None,
    reward_fn: RewardFn | None,
    correctness_fn: RewardFn | None,
    monitors: Sequence[StepMonitor],
    *,
    num_processes: int = 1,
    sharded_weights: bool = False,
) -> dict[str, Any]:
    """What a resume state belongs to; a state is only resumed by a run that matches it.

    Of the config: ``gradient_checkpointing`` changes memory, not what a step computes, so a
    run may resume with another value; options added later are left out at their defaults,
    as is a single process's ``num_processes``, so states written before these existed still
    resume; a state of N processes resumes only with N, and a sharded run's optimiser state
    is saved by parameter name (gathered from the shards)."""
    run = {k: v for k, v in config.to_dict().items() if k not in RESUME_FREE_KEYS}
    run.pop("gradient_checkpointing", None)
    for defaults, block in ((_LATER_DEFAULTS, run), (_LATER_LOSS_DEFAULTS, run.get("loss", {}))):
        for key, default in defaults.items():
            if key in block and block[key] == default:
                block.pop(key)
    if num_processes > 1:
        run["num_processes"] = num_processes
    if sharded_weights:
        run["sharded_weights"] = True
    return {
        "format": RESUME_FORMAT,
        "model": {
            "class": type(policy.model).__qualname__,
            "vocab_size": len(policy.tokenizer),
            "parameters": {
                name: [list(param.shape), str(param.dtype).removeprefix("torch.")]
                for name, param in policy.model.named_parameters()
            },
        },
        "start_weights": _weights_sha256(policy.model),
        # normalised through JSON, as the saved copy is (tuples become lists)
        "config": json.loads(json.dumps(run, default=_json_plain)),
        "prompts": _sha256_json(
            [prompts["prompt"].astype(str).tolist(), prompts["ground_truth"].astype(str).tolist()]
        ),
        "preferences": None if preferences is None else _sha256_json(asdict(preferences)),
        "reward_fn": _callable_name(reward_fn),
        "correctness_fn": _callable_name(correctness_fn),
        "monitors": [_callable_name(m) for m in monitors],
    }


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and key != "rewards":
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    saved, current = _flatten(saved), _flatten(current)
    return [
        f"{key}={saved.get(key, '<unset>')!r} there, {current.get(key, '<unset>')!r} here"
        for key in sorted(set(saved) | set(current))
        if saved.get(key, "<unset>") != current.get(key, "<unset>")
    ]


def _model_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    out = [
        f"{key} {saved.get(key)!r} there, {current.get(key)!r} here"
        for key in ("class", "vocab_size")
        if saved.get(key) != current.get(key)
    ]
    there, here = saved.get("parameters", {}), current.get("parameters", {})
    if only := sorted(set(there) - set(here)):
        out.append(f"parameters only in the checkpoint: {only[:3]}{' …' * (len(only) > 3)}")
    if only := sorted(set(here) - set(there)):
        out.append(f"parameters only in this model: {only[:3]}{' …' * (len(only) > 3)}")
    out += [
        f"{name} is {there[name][0]} {there[name][1]} there, {here[name][0]} {here[name][1]} here"
        for name in here
        if name in there and there[name] != here[name]
    ][:3]
    return out


def _checkfingerprint(saved: Mapping[str, Any], current: Mapping[str, Any], path: Path) -> None:
    """Raise a ValueError naming what differs between a resume state and this run."""

    def fail(what: str, details: list[str] | str) -> None:
        if isinstance(details, list):
            details = "; ".join(details)
        raise ValueError(
            f"checkpoint {path} is from {what}: {details}. Resume with the run's own "
            "policy, data and parameters, or point resume_dir at an empty directory."
        )

    if saved.get("format") != current["format"]:
        fail("another resume format", f"{saved.get('format')!r} there, {current['format']} here")
    if saved.get("model") != current["model"]:
        fail("a different model", _model_differences(saved.get("model", {}), current["model"]))
    if saved.get("start_weights") != current["start_weights"]:
        fail(
            "a different starting policy",
            "same parameter names and shapes, other weights (the reference π_ref must be the "
            "policy the run started from)",
        )
    if saved.get("config") != current["config"]:
        fail(
            "a different training config", _differences(saved.get("config", {}), current["config"])
        )
    for key, what in (
        ("prompts", "different training prompts"),
        ("preferences", "different preference data"),
        ("reward_fn", "a different reward function"),
        ("correctness_fn", "a different correctness function"),
        ("monitors", "different monitors"),
    ):
        if saved.get(key) != current[key]:
            fail(what, f"{saved.get(key)!r} there, {current[key]!r} here")


def resume_states(resume_dir: Path) -> list[tuple[int, Path]]:
    """The complete resume states in ``resume_dir`` by step (staging dirs are not states)."""
    if not resume_dir.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in resume_dir.iterdir()
        if path.is_dir() and (match := _STATE_DIR.fullmatch(path.name))
    ]
    return sorted(found)


def _remove(path: Path) -> None:
    """Remove a state directory: renamed out of the ``step_*`` names first, so a removal cut
    short never leaves a half-deleted state that could be loaded."""
    doomed = path.with_name(f"{_STAGING}old-{path.name}-{uuid.uuid4().hex}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def sweep_staging(resume_dir: Path) -> None:
    """Remove what an interrupted write or removal left (``.tmp-*`` entries only)."""
    if resume_dir.is_dir():
        for path in resume_dir.iterdir():
            if path.name.startswith(_STAGING):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. directories on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _rng_states(gen: torch.Generator) -> dict[str, Any]:
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()  # noqa: NPY002
    return {
        "python": random.getstate(),
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generator": gen.get_state(),
    }


def _set_rng_states(states: Mapping[str, Any], gen: torch.Generator) -> None:
    random.setstate(states["python"])
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = states["numpy"]
    np.random.set_state(  # noqa: NPY002
        (np_name, np.asarray(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_gauss)
    )
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        if len(states["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states["cuda"])
        else:
            warnings.warn(
                f"resume state has {len(states['cuda'])} CUDA RNG states, this machine "
                f"{torch.cuda.device_count()} devices: CUDA RNGs are not restored",
                stacklevel=3,
            )
    gen.set_state(states["generator"])


def _stateful(monitor: object) -> bool:
    return callable(getattr(monitor, "state_dict", None)) and callable(
        getattr(monitor, "load_state_dict", None)
    )


@dataclass
class ResumeState:
    step: int
    skipped: int
    rows: list[dict[str, Any]]
    completion_tables: list[pd.DataFrame]
    # the optimiser's state_dict as saved; loaded by the caller, which knows when it can be
    # (a plain optimiser at once, a sharded one once FSDP has prepared it)
    optimizer_state: dict[str, Any] | None = None


def save_resume_state(
    resume_dir: Path,
    fingerprint: Mapping[str, Any],
    state: ResumeState,
    model_state: Mapping[str, torch.Tensor],
    optimizer_state: Mapping[str, Any],
    gen: torch.Generator,
    monitors: Sequence[StepMonitor],
) -> Path:
    """Write ``resume_dir/step_XXXXXX`` atomically (staged beside it, then renamed), then
    remove the older states. ``model_state`` / ``optimizer_state``: the full (unsharded)
    state dicts."""
    resume_dir.mkdir(parents=True, exist_ok=True)
    target = resume_dir / f"step_{state.step:06d}"
    staging = resume_dir / f"{_STAGING}{target.name}-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        torch.save(dict(model_state), staging / "model.pt")
        torch.save(dict(optimizer_state), staging / "optimizer.pt")
        torch.save(
            {
                "step": state.step,
                "skipped": state.skipped,
                "rng": _rng_states(gen),
                "monitors": [m.state_dict() if _stateful(m) else None for m in monitors],
            },
            staging / "trainer_state.pt",
        )
        texts = {
            "metrics.json": state.rows,
            "completions.json": [t.to_dict(orient="list") for t in state.completion_tables],
            "fingerprint.json": fingerprint,
        }
        for name, value in texts.items():
            (staging / name).write_text(json.dumps(value, indent=1, default=_json_plain))
        for name in _STATE_FILES:
            _fsync(staging / name)
        _fsync(staging)
        if target.exists():  # a state of the same step (an earlier attempt): the new one wins
            _remove(target)
        os.replace(staging, target)
        _fsync(resume_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for step, path in resume_states(resume_dir):
        if step != state.step:
            _remove(path)
    return target


def load_resume_state(
    path: Path,
    fingerprint: Mapping[str, Any],
    model: torch.nn.Module,
    gen: torch.Generator,
    monitors: Sequence[StepMonitor],
) -> ResumeState:
    """Check ``path`` belongs to this run, then restore the model, RNGs and monitors from
    it; returns the step counter, rows, tables and the optimiser state to continue from."""
    missing = [name for name in _STATE_FILES if not (path / name).is_file()]
    if missing:
        raise ValueError(f"resume state {path} is incomplete: {', '.join(missing)} missing")
    _checkfingerprint(json.loads((path / "fingerprint.json").read_text()), fingerprint, path)
    saved = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(torch.load(path / "model.pt", map_location="cpu", weights_only=True))
    optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    _set_rng_states(saved["rng"], gen)
    for monitor, monitor_state in zip(monitors, saved["monitors"], strict=True):
        if _stateful(monitor):
            monitor.load_state_dict(monitor_state)
        else:
            warnings.warn(
                f"monitor {_callable_name(monitor)} has no state_dict/load_state_dict: it "
                f"resumes at step {saved['step'] + 1} without the state of the earlier steps",
                stacklevel=3,
            )
    tables = json.loads((path / "completions.json").read_text())
    return ResumeState(
        step=saved["step"],
        skipped=saved["skipped"],
        rows=json.loads((path / "metrics.json").read_text()),
        completion_tables=[pd.DataFrame(table) for table in tables],
        optimizer_state=optimizer_state,
    )
