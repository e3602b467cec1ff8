"""Inline SVG for the dashboard: per-minute bar charts and the workflow DAG.

Pure geometry: the templates draw what these return. Colours come from CSS
classes (``prefers-color-scheme`` applies), never inline styles (the CSP).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from conveyor.domain.dashboard import MinuteBucket
from conveyor.domain.workflow import StepDetail

CHART_W, CHART_H = 600, 120


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    css: str
    title: str


@dataclass(frozen=True, slots=True)
class Chart:
    title: str
    bars: list[Bar]
    peak: int
    total: int
    width: int = CHART_W
    height: int = CHART_H


def minute_chart(
    title: str, buckets: list[MinuteBucket], now: datetime, series: tuple[str, ...]
) -> Chart:
    """60 one-minute columns ending at ``now``; ``series`` (bucket fields) stack."""
    start = now.replace(second=0, microsecond=0) - timedelta(minutes=59)
    by_minute = {b.minute.replace(tzinfo=start.tzinfo): b for b in buckets}
    columns = []
    for i in range(60):
        minute = start + timedelta(minutes=i)
        b = by_minute.get(minute)
        columns.append((minute, [getattr(b, s) if b else 0 for s in series]))
    peak = max([sum(v) for _, v in columns] + [1])
    slot = CHART_W / 60
    bars = []
    for i, (minute, values) in enumerate(columns):
        y = float(CHART_H)
        for name, v in zip(series, values, strict=True):
            if not v:
                continue
            h = max(1.0, v / peak * (CHART_H - 4))
            y -= h
            label = f"{minute:%H:%M} UTC: {v} {name}"
            bars.append(
                Bar(
                    round(i * slot + 1, 1),
                    round(y, 1),
                    round(slot - 2, 1),
                    round(h, 1),
                    name,
                    label,
                )
            )
    total = sum(sum(v) for _, v in columns)
    return Chart(title, bars, peak, total)


@dataclass(frozen=True, slots=True)
class Node:
    step: StepDetail
    x: float
    y: float


@dataclass(frozen=True, slots=True)
class Edge:
    x1: float
    y1: float
    x2: float
    y2: float


@dataclass(frozen=True, slots=True)
class Dag:
    nodes: list[Node]
    edges: list[Edge]
    width: int
    height: int
    node_w: int
    node_h: int


NODE_W, NODE_H, GAP_X, GAP_Y = 170, 46, 60, 18


def layered_dag(steps: list[StepDetail]) -> Dag:
    """Steps in columns by depth (longest path from a root), left to right."""
    by_name = {s.name: s for s in steps}
    depth: dict[str, int] = {}

    def level(name: str, seen: frozenset[str] = frozenset()) -> int:
        if name in depth:
            return depth[name]
        if name in seen:  # a cycle cannot be stored; be safe anyway
            return 0
        parents = [p for p in by_name[name].depends_on if p in by_name]
        d = 1 + max((level(p, seen | {name}) for p in parents), default=-1)
        depth[name] = d
        return d

    for s in steps:
        level(s.name)
    columns: dict[int, list[StepDetail]] = {}
    for s in steps:
        columns.setdefault(depth[s.name], []).append(s)
    nodes: dict[str, Node] = {}
    for d, members in sorted(columns.items()):
        for row, s in enumerate(members):
            nodes[s.name] = Node(s, 10 + d * (NODE_W + GAP_X), 10 + row * (NODE_H + GAP_Y))
    edges = [
        Edge(
            nodes[p].x + NODE_W,
            nodes[p].y + NODE_H / 2,
            nodes[s.name].x,
            nodes[s.name].y + NODE_H / 2,
        )
        for s in steps
        for p in s.depends_on
        if p in nodes
    ]
    width = 20 + (max(columns, default=0) + 1) * (NODE_W + GAP_X) - GAP_X
    height = 20 + max((len(m) for m in columns.values()), default=1) * (NODE_H + GAP_Y) - GAP_Y
    return Dag(list(nodes.values()), edges, width, height, NODE_W, NODE_H)
