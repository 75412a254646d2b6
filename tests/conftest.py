import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str, cwd: Path | None = None, timeout: int = 600,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run one of the repository's scripts as a user would (extra environment variables in env)."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def synthetic_market(tmp_path_factory) -> Path:
    """A small prepared synthetic Market-1501 (raw layout + pytorch/), shared by the whole session."""
    from dataset_layout import prepare_market_like
    from make_synthetic_data import generate
    root = tmp_path_factory.mktemp("data") / "Market"
    generate("market", root, n_ids=12, per_id=8, n_cams=4, seed=3)
    prepare_market_like(root, "market")
    return root
