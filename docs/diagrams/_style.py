"""Shared look of the streamrec diagrams (the `diagrams` package over Graphviz `dot`)."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent

# Left-to-right, spline edges (orthogonal edges cannot carry labels), enough room for labels.
GRAPH = {
    "pad": "0.4",
    "splines": "spline",
    "nodesep": "0.55",
    "ranksep": "1.1",
    "fontsize": "20",
    "labelloc": "t",
}
NODE = {"fontsize": "12"}
EDGE = {"fontsize": "11", "fontcolor": "#2D3436", "color": "#5B6770", "arrowsize": "0.7"}

# Cluster fills: the EKS cluster, a node group, a namespace, a region, AWS services around the cluster.
EKS = {"bgcolor": "#F4F8FB", "pencolor": "#8FA8BF", "fontsize": "15", "margin": "14"}
NODEGROUP = {"bgcolor": "#FFFFFF", "pencolor": "#9FB3C8", "style": "dashed", "fontsize": "13", "margin": "12"}
NAMESPACE = {"bgcolor": "#EEF5EA", "pencolor": "#9CB88C", "fontsize": "12", "margin": "10"}
AWS = {"bgcolor": "#FFF8EC", "pencolor": "#E1B46A", "fontsize": "15", "margin": "14"}
REGION = {"bgcolor": "#F7F7F7", "pencolor": "#9AA4AD", "fontsize": "15", "margin": "14"}
PLAIN = {"bgcolor": "#FFFFFF", "pencolor": "#C8CED3", "fontsize": "13", "margin": "10"}

# Edge colours by kind of traffic.
REQUEST = "#1F6FB2"    # online requests
STREAM = "#2E8B57"     # clickstream
BATCH = "#B0602A"      # the daily pipeline
CONTROL = "#7A4FA3"    # control plane (creates, submits, polls)


def out(name: str) -> str:
    """The output path (without extension) of a diagram: next to its source."""
    return str(HERE / name)
