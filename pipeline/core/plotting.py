"""Matplotlib without a display, and figures as PNG bytes for self-contained HTML."""
from __future__ import annotations

import base64
import io


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def png_b64(fig_or_img) -> str:
    """A matplotlib figure or PIL image as base64 PNG."""
    buf = io.BytesIO()
    if hasattr(fig_or_img, "savefig"):
        fig_or_img.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    else:
        fig_or_img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
