"""Layer 4: networks and sampling only (classifier, diffusion, gan, datasetgan, the
generator registry). No training loops, no file layout beyond a generator folder."""
