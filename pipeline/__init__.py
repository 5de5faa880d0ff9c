"""synthaug: synthetic-data generation pipeline for classifier augmentation."""

__version__ = "0.1.0"

STAGE_ORDER = ("prepare", "pseudo_label", "train_generator", "sample", "filter", "train_classifier", "report")
