"""Running code under Triton's interpreter, in a fresh Python: Triton reads ``TRITON_INTERPRET``
when a kernel is defined, so a test process that imported the kernels cannot switch it on."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def run_interpreted(code: str, interpret: bool = True) -> str:
    """Run ``code`` (dedented) in a fresh Python with ``src`` importable, Triton's interpreter on
    unless ``interpret`` is false; its standard output. A failure shows the end of its errors."""
    env = {**os.environ, "TRITON_INTERPRET": "1" if interpret else "0",
           "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout
