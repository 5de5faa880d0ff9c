"""Fuzz the image loading path: any bytes give an image or the documented DataError."""
import io

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.config import params_from_dict
from pipeline.core.sources import load_image_file
from pipeline.errors import DataError

CFG = params_from_dict({"prepare": {"source": "imagefolder", "image_size": 8, "channels": 3}}).prepare


def _png_bytes(mode: str) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (5, 7)).save(buf, format="PNG" if mode != "CMYK" else "JPEG")
    return buf.getvalue()


SEEDS = [_png_bytes(m) for m in ("L", "RGB", "RGBA", "P", "I;16", "CMYK")]


@st.composite
def mutated_image(draw):
    """A valid file with bytes flipped, cut or appended, or plain random bytes."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=512))
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut] if draw(st.booleans()) else data) + draw(st.binary(max_size=16))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=mutated_image())
def test_any_bytes_load_or_raise_data_error(tmp_path, data):
    path = tmp_path / "fuzz.img"
    path.write_bytes(data)
    try:
        arr = load_image_file(path, CFG)
    except DataError as err:
        assert str(path) in str(err)
    else:
        assert arr.shape == (8, 8, 3) and arr.dtype == np.uint8
    assert path.read_bytes() == data  # never modified
