"""Run a script in a fresh interpreter on the pure-PyTorch reference kernels (what users get
without the extension): import-time registration can only be tested in a new process."""

import os
import subprocess
import sys


def run_on_reference(script: str) -> None:
    env = dict(os.environ, COMMCOMP_FORCE_REFERENCE="1")
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", script], env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
