import subprocess
import sys

import pytest

from helpers import REPO

SCRIPTS = sorted(p.name for p in (REPO / "tools").glob("*.py") if not p.name.startswith("_"))  # _x.py: modules


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_tool_runs_as_a_script(script):
    # a tool whose main() is never called exits 0 silently: --help must print its usage
    result = subprocess.run([sys.executable, str(REPO / "tools" / script), "--help"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
