"""Layer 5: feature spaces, set metrics, the judge, CLIP scores, the selection rule and the filter's score table."""
