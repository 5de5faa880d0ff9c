"""Layer 5: checkpoint + resume (once), one training loop per generator family, classifier fitting."""
