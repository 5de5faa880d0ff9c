"""Layer 3: file I/O, dataset conversions, image sources, splits, seeding, stats, plotting,
run provenance. Imports only ``pipeline.errors`` and ``pipeline.config``."""
