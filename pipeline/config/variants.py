"""``train_classifier.variants``' entries: what one classifier variant trains on."""
from __future__ import annotations

import re
from typing import Literal

from pydantic import model_validator

from pipeline.config.section import Probability, Section


class VariantSpec(Section):
    """What one classifier variant trains on; every variant gets the same steps and seeds."""
    # the stage output its extra images come from (required: dvc.yaml makes it a dependency):
    # prepared = none beyond the real splits | filtered = accepted synthetic | synthetic = every sample, unfiltered
    data: Literal["prepared", "filtered", "synthetic"]
    # the oracle, the ceiling of any synthetic set of that size: in place of the data set's images, as many
    # pool images of each class as it has, with their true labels (sources that label the pool only:
    # fashion-mnist, labeled image folders); same share of the labeled stream, same learner
    oracle: bool = False
    real: bool = True  # the labeled real images (false: synthetic only, the Classification Accuracy Score)
    pseudo: bool = False  # also the pseudo-labeled pool (data/pseudo), drawn with the labeled images
    augment: Literal["standard", "classic"] = "standard"  # crop + flip | TrivialAugmentWide, then crop + flip
    # supervised: train_classifier's arch, steps, seeds | fixmatch: the semi-supervised learner, with pseudo_label's
    # settings and seeds, the unlabeled pool beside the labeled stream (synthetic images join the labeled stream)
    learner: Literal["supervised", "fixmatch"] = "supervised"
    # share of the labeled stream drawn from synthetic (or oracle) images; None: train_classifier.synthetic_ratio
    synthetic_ratio: float | None = Probability(None)

    @property
    def uses_synthetic(self) -> bool:  # trains on generated images (an oracle trains on real pool images instead)
        return self.data != "prepared" and not self.oracle

    @property
    def adds_images(self) -> bool:  # synthetic or oracle images join the labeled stream (at the synthetic share)
        return self.data != "prepared"

    @model_validator(mode="after")
    def _trains_on_something(self):
        if self.oracle and self.data == "prepared":
            raise ValueError("oracle: true draws as many truly labeled pool images as a synthetic set has: set data: "
                             "filtered (or synthetic), the set whose per-class counts it copies")
        if not self.real and (self.pseudo or not self.adds_images):
            raise ValueError("a variant with real: false trains on synthetic images only: it needs data: filtered "
                             "or synthetic and no pseudo: true")
        if self.learner == "fixmatch" and (self.pseudo or not self.real):
            raise ValueError("learner: fixmatch already learns from the unlabeled pool and needs the labeled images: "
                             "set pseudo: false and real: true")
        return self


VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9+_.-]*")
