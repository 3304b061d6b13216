"""The tumour-marker chart as data for an inline SVG (pure): one series per marker and unit,
one point per result, the reference range as a band. Rendered server-side, so the chart needs
no JavaScript and reads the same in every browser and in a screenshot."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

WIDTH, HEIGHT = 640, 220
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 12, 36


@dataclass
class Point:
    date: str
    value: float
    x: float = 0.0
    y: float = 0.0
    high: bool = False  # above the reference range


@dataclass
class Series:
    name: str
    unit: str
    points: list[Point] = field(default_factory=list)
    low: float | None = None
    high: float | None = None
    y_ticks: list[tuple[float, float]] = field(default_factory=list)  # (value, y)
    x_ticks: list[tuple[str, float]] = field(default_factory=list)  # (label, x)
    band: tuple[float, float] | None = None  # (y top, y bottom) of the reference range
    path: str = ""
    width: int = WIDTH
    height: int = HEIGHT


def _instant(date: str) -> float:
    text = date if "T" in date else f"{date[:10]}T00:00:00+00:00"
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def marker_series(
    events: Iterable[Mapping[str, Any]], ranges: Mapping[str, Sequence[float | None]]
) -> list[Series]:
    """Series from the timeline's `tumour-marker` events with a numeric value and a date; the
    reference range (`ranges`: resource -> [low, high], `casebundle.derived`) is that of the
    marker's latest result that has one."""
    by_key: dict[tuple[str, str], Series] = {}
    for ev in events:
        value = ev.get("value") or {}
        if ev.get("kind") != "tumour-marker" or not ev.get("date"):
            continue
        number = value.get("value")
        if not isinstance(number, int | float) or isinstance(number, bool):
            continue
        unit = str(value.get("unit") or value.get("code") or "")
        key = (str(ev.get("display") or "marker"), unit)
        series = by_key.setdefault(key, Series(name=key[0], unit=unit))
        series.points.append(Point(date=str(ev["date"]), value=float(number)))
        found = ranges.get(str(ev.get("resource")))
        if found is not None and (found[0] is not None or found[1] is not None):
            series.low, series.high = found[0], found[1]
    out = list(by_key.values())
    for series in out:
        _layout(series)
    return out


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    magnitude = float(10 ** len(str(int(value)))) / 10
    for step in (1, 2, 2.5, 5, 10):
        if step * magnitude >= value:
            return step * magnitude
    return value


def _layout(series: Series) -> None:
    points = sorted(series.points, key=lambda p: _instant(p.date))
    series.points = points
    times = [_instant(p.date) for p in points]
    t0, t1 = min(times), max(times)
    span_t = (t1 - t0) or 1.0
    top_value = max([p.value for p in points] + [series.high or 0.0, series.low or 0.0])
    y_max = _nice_max(top_value * 1.1)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def y_of(v: float) -> float:
        return round(TOP + plot_h * (1 - v / y_max), 1)

    for p, t in zip(points, times, strict=True):
        p.x = round(LEFT + (plot_w * (t - t0) / span_t if t1 > t0 else plot_w / 2), 1)
        p.y = y_of(p.value)
        p.high = series.high is not None and p.value > series.high
    series.y_ticks = [(round(y_max * i / 4, 3), y_of(y_max * i / 4)) for i in range(5)]
    labels = {points[0].date[:10]: points[0].x, points[-1].date[:10]: points[-1].x}
    series.x_ticks = sorted(labels.items(), key=lambda kv: kv[1])
    if series.low is not None or series.high is not None:
        series.band = (
            y_of(series.high if series.high is not None else y_max),
            y_of(series.low or 0),
        )
    series.path = " ".join(f"{'M' if i == 0 else 'L'}{p.x},{p.y}" for i, p in enumerate(points))


__all__ = ["Point", "Series", "marker_series"]
