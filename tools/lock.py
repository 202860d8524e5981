"""Regenerate uv.lock at exactly the versions constraints.txt pins (`make lock`).

`make` installs with pip from constraints.txt; uv users get the same versions from uv.lock, and
tests/test_packaging.py keeps the two in step. uv has no flag for a constraints file when
locking, so the pins go in as `[tool.uv] constraint-dependencies` for one `uv lock`, and a
second `uv lock` against pyproject.toml as it is keeps those versions (uv keeps what is locked).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UV = [sys.executable, "-m", "uv"]


def main() -> int:
    pyproject = ROOT / "pyproject.toml"
    original = pyproject.read_text()
    pins = [
        line.strip()
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    pinned = "\n".join(f'    "{p}",' for p in pins)
    try:
        pyproject.write_text(f"{original}\n[tool.uv]\nconstraint-dependencies = [\n{pinned}\n]\n")
        subprocess.run([*UV, "lock", "--upgrade"], cwd=ROOT, check=True)
    finally:
        pyproject.write_text(original)
    subprocess.run([*UV, "lock"], cwd=ROOT, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
