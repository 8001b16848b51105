"""glibc's malloc set to keep freed tensor memory (training.keep_freed_memory)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from fgrpo_pipeline.training.config import TrainerConfig
from fgrpo_pipeline.training.malloc import _glibc

# Page faults of allocating and freeing 64 MB of tensors, as a training step's activations
# come and go, before and after keep_freed_memory(); in a fresh interpreter, as the setting
# is process-wide.
SCRIPT = textwrap.dedent(
    """
    import resource, torch
    from fgrpo_pipeline.training.malloc import keep_freed_memory

    def faults(rounds=6):
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(rounds):
            held = [torch.ones(2_000_000) for _ in range(8)]
            del held
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

    faults(2)
    before = faults()
    applied = keep_freed_memory()
    again = keep_freed_memory()
    faults(2)
    print(applied, again, before, faults())
    """
)


@pytest.mark.skipif(_glibc() is None, reason="glibc's malloc only")
def test_freed_memory_is_not_faulted_in_again():
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True
    ).stdout.split()
    applied, again, before, after = out[0] == "True", out[1] == "True", int(out[2]), int(out[3])
    assert applied and again
    # 6 rounds × 64 MB is ~96k pages; glibc's defaults give most of them back every round.
    assert before > 20_000
    assert after < before / 4


def test_keep_freed_memory_must_be_a_bool():
    with pytest.raises(ValueError, match="keep_freed_memory"):
        TrainerConfig(keep_freed_memory="yes")
