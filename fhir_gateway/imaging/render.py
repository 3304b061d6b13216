"""Rendered images of stored instances: one frame -> 8-bit JPEG or PNG (PS3.18 §8.3.5, §9.5).

Decoding is pydicom's (its pixel data handlers: native, RLE and deflate always; JPEG and JPEG 2000
through Pillow; others when a plugin such as pylibjpeg is installed); scaling, windowing and the
encoders are numpy and Pillow. Nothing is burnt in: the output carries no patient-identifying
text, so the same function makes thumbnails (PS3.18 §9.5: thumbnails hold no PHI).

The grey-level pipeline is the standard's: Modality LUT (rescale slope/intercept) -> VOI window
(the `window=` query parameter, else the dataset's first Window Center/Width, else the frame's
own range) -> MONOCHROME1 inverted. Colour frames are shown as stored (YBR converted to RGB).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import BinaryIO, Literal

import numpy as np
import pydicom
from numpy.typing import NDArray
from PIL import Image
from pydicom.pixels.processing import apply_rescale
from pydicom.pixels.utils import pixel_array
from pydicom.uid import UID

from fhir_gateway.errors import InputError, NotAcceptableError, NotFoundError

JPEG, PNG = "image/jpeg", "image/png"
MEDIA_TYPES = (JPEG, PNG)  # the first is the default (PS3.18 §8.7.4: image/jpeg)
THUMBNAIL_SIZE = (128, 128)  # longest side; a thumbnail is "a small image" (§9.5)
MAX_VIEWPORT = 4096
WindowFunction = Literal["linear", "linear-exact", "sigmoid"]


@dataclass(frozen=True)
class Window:
    """A VOI window: centre and width in modality units, and the PS3.3 C.11.2.1.3 function."""

    center: float
    width: float
    function: WindowFunction = "linear"


@dataclass(frozen=True)
class RenderOptions:
    """What the caller asked for: media type, window, viewport, JPEG quality."""

    media_type: str = JPEG
    window: Window | None = None
    viewport: tuple[int, int] | None = None  # fit inside (columns, rows), aspect kept
    quality: int = 90


def choose_media_type(accept: str) -> str:
    """The rendered media type from an Accept header or `accept=` query value.

    Raises:
        NotAcceptableError: the caller accepts neither JPEG nor PNG (406).
    """
    if not accept.strip():
        return JPEG
    ranked: list[tuple[float, int, str]] = []
    for n, item in enumerate(accept.split(",")):
        mtype, *params = (p.strip() for p in item.split(";"))
        q = 1.0
        for p in params:
            name, _, value = p.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        mtype = mtype.lower()
        if q <= 0:
            continue
        if mtype in ("*/*", "image/*"):
            ranked.append((q, n, JPEG))
        elif mtype in MEDIA_TYPES:
            ranked.append((q, n, mtype))
    if not ranked:
        raise NotAcceptableError(
            "rendered images are served as image/jpeg or image/png; "
            "the Accept header (or accept parameter) allows neither"
        )
    return max(ranked, key=lambda r: (r[0], -r[1]))[2]


def parse_window(value: str) -> Window:
    """`window=center,width[,function]` (PS3.18 §8.3.5.1.4).

    Raises:
        InputError: not two numbers (width > 0) and an optional known function.
    """
    parts = [p.strip() for p in value.split(",")]
    rule = "window must be center,width[,function] with width > 0 and function one of "
    rule += "linear, linear-exact, sigmoid"
    if len(parts) not in (2, 3):
        raise InputError(rule, expression=["window"])
    try:
        center, width = float(parts[0]), float(parts[1])
    except ValueError as exc:
        raise InputError(rule, expression=["window"]) from exc
    function = parts[2].lower() if len(parts) == 3 else "linear"
    if not (math.isfinite(center) and math.isfinite(width)) or width <= 0:
        raise InputError(rule, expression=["window"])
    if function not in ("linear", "linear-exact", "sigmoid"):
        raise InputError(rule, expression=["window"])
    return Window(center, width, function)  # type: ignore[arg-type]


def parse_viewport(value: str) -> tuple[int, int]:
    """`viewport=vw,vh` (PS3.18 §8.3.5.1.3; the optional source region is not supported).

    Raises:
        InputError: not two positive integers up to MAX_VIEWPORT.
    """
    parts = [p.strip() for p in value.split(",")]
    if len(parts) != 2 or not all(p.isdigit() and 0 < int(p) <= MAX_VIEWPORT for p in parts):
        raise InputError(
            f"viewport must be vw,vh: two integers from 1 to {MAX_VIEWPORT}",
            expression=["viewport"],
        )
    return int(parts[0]), int(parts[1])


def parse_quality(value: str) -> int:
    """`quality=1..100` (PS3.18 §8.3.5.1.2).

    Raises:
        InputError: not an integer from 1 to 100.
    """
    if not value.strip().isdigit() or not 1 <= int(value) <= 100:
        raise InputError("quality must be an integer from 1 to 100", expression=["quality"])
    return int(value)


def dataset_window(ds: pydicom.Dataset) -> Window | None:
    """The dataset's first Window Center / Width (VOI LUT module), if any."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    c = center[0] if isinstance(center, pydicom.multival.MultiValue) else center
    w = width[0] if isinstance(width, pydicom.multival.MultiValue) else width
    try:
        cf, wf = float(c), float(w)
    except (TypeError, ValueError):
        return None
    if wf <= 0:
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR")).lower().replace("_", "-")
    return Window(cf, wf, function if function in ("linear-exact", "sigmoid") else "linear")  # type: ignore[arg-type]


def apply_window(values: NDArray[np.float64], window: Window) -> NDArray[np.uint8]:
    """Modality values -> 0..255 by the window (PS3.3 C.11.2.1.2.1 and C.11.2.1.3.1)."""
    c, w = window.center, window.width
    if window.function == "sigmoid":
        out = 255.0 / (1.0 + np.exp(-4.0 * (values - c) / w))
    elif window.function == "linear-exact":
        out = ((values - c) / w + 0.5) * 255.0
    else:
        if w <= 1:  # C.11.2.1.2.1: width >= 1; a width of 1 is a threshold at the centre
            out = np.where(values <= c - 0.5, 0.0, 255.0)
        else:
            out = ((values - (c - 0.5)) / (w - 1) + 0.5) * 255.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _grey(ds: pydicom.Dataset, frame: NDArray[np.generic], window: Window | None) -> Image.Image:
    values = np.asarray(apply_rescale(frame, ds), dtype=np.float64)
    chosen = window or dataset_window(ds)
    if chosen is None:  # no window anywhere: the frame's own range
        low, high = float(values.min()), float(values.max())
        chosen = Window((low + high) / 2 + 0.5, max(high - low + 1, 1.0))
    out = apply_window(values, chosen)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        out = 255 - out
    return Image.fromarray(out, mode="L")


def _colour(ds: pydicom.Dataset, frame: NDArray[np.generic]) -> Image.Image:
    bits = int(ds.get("BitsStored", 8))
    arr = frame.astype(np.float64)
    if bits > 8:
        arr = arr * (255.0 / ((1 << bits) - 1))
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="RGB")


def decode_frame(
    fh: BinaryIO, transfer_syntax_uid: str, frame: int
) -> tuple[pydicom.Dataset, NDArray[np.generic]]:
    """One frame (1-based) of a stored instance, decoded, with the dataset's other elements.

    Raises:
        NotFoundError: no pixel data, or no such frame.
        NotAcceptableError: compressed pixel data that no installed handler decodes.
    """
    header = pydicom.dcmread(fh, stop_before_pixels=True)
    if frame < 1:
        raise InputError("frames are numbered from 1", expression=["frames"])
    count = int(header.get("NumberOfFrames", 1) or 1)
    if frame > count:
        raise NotFoundError(f"the instance has {count} frame(s)")
    fh.seek(0)
    ds = pydicom.Dataset()
    try:
        arr = pixel_array(fh, ds_out=ds, index=frame - 1 if count > 1 else None)
    except AttributeError as exc:
        raise NotFoundError("the instance has no pixel data") from exc
    except (RuntimeError, NotImplementedError, ValueError) as exc:
        ts = UID(transfer_syntax_uid)
        raise NotAcceptableError(
            f"pixel data in {ts.name or 'this transfer syntax'} cannot be decoded here "
            "(no installed decoder); retrieve the instance instead"
        ) from exc
    if arr.ndim == 3 and count > 1 and int(ds.get("SamplesPerPixel", 1)) == 1:
        arr = arr[0]
    return ds, arr


def render(ds: pydicom.Dataset, frame: NDArray[np.generic], options: RenderOptions) -> bytes:
    """One decoded frame as JPEG or PNG bytes, windowed, fitted into the viewport."""
    if int(ds.get("SamplesPerPixel", 1)) == 1:
        image = _grey(ds, frame, options.window)
    else:
        image = _colour(ds, frame)
    if options.viewport is not None:
        image = _fit(image, options.viewport)
    buf = io.BytesIO()
    if options.media_type == PNG:
        image.save(buf, format="PNG")
    else:
        image.save(buf, format="JPEG", quality=options.quality)
    return buf.getvalue()


def _fit(image: Image.Image, box: tuple[int, int]) -> Image.Image:
    """Scale to fit inside box, aspect kept (up or down, as viewport asks)."""
    scale = min(box[0] / image.width, box[1] / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS)
