"""benchmarks/compile_cache.py: torch.compile's caches carried to a fresh process in one file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
# Compiles a small function, loading the cache file first (--load) or saving it
# after (--save); prints what was loaded or saved and inductor's cache counters.
COMPILE = """
import json, sys, torch
sys.path.insert(0, {benchmarks!r})
import compile_cache
from pathlib import Path
from torch._dynamo.utils import counters
path, action = Path(sys.argv[1]), sys.argv[2]
report = compile_cache.load(path) if action == "--load" else {{}}
torch.manual_seed(0)
compiled = torch.compile(lambda x: torch.nn.functional.gelu(x * 2.0) + 1.0)
compiled(torch.randn(4, 16))
if action == "--save":
    report = compile_cache.save(path)
report.update(hits=counters["inductor"]["fxgraph_cache_hit"], misses=counters["inductor"]["fxgraph_cache_miss"])
print(json.dumps(report))
"""


def _compile(path: Path, action: str, inductor_cache: Path) -> dict:
    # A fresh inductor cache folder per process: as on a fresh machine, only the file carries.
    # No vector instruction sets: in an empty folder inductor first builds a probe program for
    # each (7.1 s of a 15.6 s one-kernel compile under cProfile, 2 cores), which has nothing to
    # do with the file (the test took 27.9 s with them, 17.4 s without).
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_cache), "OMP_NUM_THREADS": "1",
           "TORCHINDUCTOR_VEC_ISA_OK": "0"}
    code = COMPILE.format(benchmarks=str(BENCHMARKS))
    result = subprocess.run([sys.executable, "-c", code, str(path), action], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_fresh_process_compiles_from_the_saved_file(tmp_path: Path) -> None:
    path = tmp_path / "out" / "compile.cache"
    saved = _compile(path, "--save", tmp_path / "inductor-a")
    assert path.is_file() and saved["saved_bytes"] == path.stat().st_size > 0 and saved["saved_entries"] > 0
    assert saved["misses"] > 0 and saved["hits"] == 0
    loaded = _compile(path, "--load", tmp_path / "inductor-b")
    assert loaded["loaded_bytes"] == path.stat().st_size and loaded["loaded_entries"] == saved["saved_entries"]
    assert loaded["hits"] == saved["misses"] and loaded["misses"] == 0, loaded


def test_no_file_loads_nothing_and_a_bad_file_is_named(tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCHMARKS))
    import compile_cache

    assert compile_cache.load(tmp_path / "absent.cache") == {"loaded_bytes": 0}
    bad = tmp_path / "bad.cache"
    bad.write_bytes(b"not a cache")
    with pytest.raises(ValueError, match="bad.cache"):
        compile_cache.load(bad)
