"""What every typed section of ``params.yaml`` shares: unknown keys and wrong types are errors, values frozen."""
from __future__ import annotations

import os
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


Location = Annotated[str, AfterValidator(os.path.expanduser)]  # a file or folder; ``~`` is expanded
