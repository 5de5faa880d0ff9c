"""Layer 5: feature spaces, set metrics, the judge, CLIP scores and the selection rule."""
