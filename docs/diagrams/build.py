"""Regenerate every diagram of docs/design.md: ``make diagrams`` (or ``python docs/diagrams/build.py``).

Each module next to this file draws one PNG next to itself with the `diagrams` package (AWS and
Kubernetes icons) over Graphviz ``dot``. Needs ``pip install -e '.[docs]'`` and Graphviz
(``apt-get install graphviz``); the Makefile target installs both when it can.
"""

from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DIAGRAMS = ("deployment_region", "multi_region", "data_flow")


def main() -> int:
    if shutil.which("dot") is None:
        print("error: Graphviz is missing (no `dot` on PATH): apt-get install -y graphviz", file=sys.stderr)
        return 1
    try:
        import diagrams  # noqa: F401
    except ImportError:
        print("error: the `diagrams` package is missing: pip install -e '.[docs]'", file=sys.stderr)
        return 1
    sys.path.insert(0, str(HERE))
    for name in DIAGRAMS:
        path = importlib.import_module(name).build()
        print(f"wrote {Path(path).relative_to(HERE.parent.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
