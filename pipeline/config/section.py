"""What every typed section of ``params.yaml`` shares: unknown keys and wrong types are errors, values frozen;
every number has a range and a reason for it (``number``), which an out-of-range value's error states."""
from __future__ import annotations

import os
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticUndefined


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


Location = Annotated[str, AfterValidator(os.path.expanduser)]  # a file or folder; ``~`` is expanded

MAX_STEPS = 10**7  # optimizer steps: 10 million take weeks even on a GPU
MAX_BATCH = 2**16  # images in one batch
MAX_SEEDS = 1000  # seed k of a run is base.seed * 1000 + k
MAX_IMAGES = 10**7  # images of one set, held in memory
MAX_WIDTH = 4096  # channels, features or a network's depth-independent width


def Number(default: Any = PydanticUndefined, why: str = "", **limits) -> Any:
    """A number in params: its default, its range (pydantic's ``ge`` / ``gt`` / ``le`` / ``lt``) and why the
    range is what it is; a value outside it is refused with both (pipeline/config/__init__.py). No default
    (``PydanticUndefined``): the bounds of a number inside ``Annotated`` (a tuple's items)."""
    return Field(default, description=why, **limits)


def Steps(default: int, ge: int = 1, **kw) -> Any:
    return Number(default, f"optimizer steps: {MAX_STEPS:,} take weeks even on a GPU (a typo?)", ge=ge,
                  le=MAX_STEPS, **kw)


def Every(default: int) -> Any:
    return Number(default, "steps between two events, at most the most steps a run may have", ge=1, le=MAX_STEPS)


def Batch(default: int, ge: int = 1, **kw) -> Any:
    return Number(default, f"images in one batch, held in memory at once: {MAX_BATCH:,} is past any that fits",
                  ge=ge, le=MAX_BATCH, **kw)


def Seeds(default: int) -> Any:
    return Number(default, f"seed k of a run is base.seed x {MAX_SEEDS:,} + k: more than {MAX_SEEDS:,} would repeat "
                  "the seeds of the next base.seed", ge=1, le=MAX_SEEDS)


def LR(default: float) -> Any:
    return Number(default, "a peak learning rate: above 1 Adam(W) diverges", gt=0, le=1)


def WeightDecay(default: float) -> Any:
    return Number(default, "AdamW's decoupled weight decay (0 to 0.1 usual): above 1 the weights shrink faster "
                  "than they learn", ge=0, le=1)


def EMA(default: float) -> Any:
    return Number(default, "the decay of an average of the weights: 1 would never update it", ge=0, lt=1)


def Probability(default: float | None = PydanticUndefined, why: str = "a probability (or a share)", **kw) -> Any:
    return Number(default, why, ge=0, le=1, **kw)


def Images(default: int, ge: int = 1, why: str = "images") -> Any:
    return Number(default, f"{why}, held in memory: {MAX_IMAGES:,} is past any set that fits", ge=ge, le=MAX_IMAGES)


def Width(default: int = PydanticUndefined, ge: int = 1, why: str = "a network's size") -> Any:
    return Number(default, f"{why}: beyond {MAX_WIDTH:,} the network does not fit in memory", ge=ge, le=MAX_WIDTH)
