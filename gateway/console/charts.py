"""Small bar charts as inline SVG, laid out here so the page needs no script."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

WIDTH, HEIGHT = 240, 64


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    value: float
    css: str


@dataclass(frozen=True)
class Chart:
    title: str
    total: float
    peak: float
    unit: str
    bars: list[Bar]
    legend: list[tuple[str, str]]  # (css class, label)


def stacked(
    title: str, series: Sequence[tuple[str, str, Sequence[float]]], *, unit: str = ""
) -> Chart:
    """Bars per bucket, each (css class, label, values) stacked on the previous ones."""
    count = max((len(values) for _, _, values in series), default=0)
    sums = [sum(values[i] for _, _, values in series) for i in range(count)]
    peak = max(sums, default=0.0)
    scale = (HEIGHT - 2) / peak if peak else 0.0
    slot = WIDTH / count if count else WIDTH
    bars = []
    for i in range(count):
        base = float(HEIGHT)
        for css, _, values in series:
            height = values[i] * scale
            if height > 0:
                base -= height
                bars.append(Bar(i * slot + 1, base, slot - 2, height, values[i], css))
    legend = [(css, label) for css, label, _ in series]
    return Chart(title, sum(sums), peak, unit, bars, legend)


def single(title: str, values: Sequence[float], css: str, *, unit: str = "") -> Chart:
    return stacked(title, [(css, title, values)], unit=unit)
