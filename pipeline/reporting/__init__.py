"""Layer 5: report tables, figures and the generator comparison across runs."""
