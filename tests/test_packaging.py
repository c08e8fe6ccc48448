"""``import rbp_core`` loads no framework; ``rbp_core.backends`` resolves and bare ``backends`` does not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CHECK = Path(__file__).with_name("packaging_check.py")


def test_installed_layout(tmp_path: Path) -> None:
    # Run from an empty folder with a safe sys.path so that the source tree cannot leak in.
    result = subprocess.run(
        [sys.executable, "-P", str(CHECK)], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "wheel layout ok" in result.stdout
