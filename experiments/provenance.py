"""Which code a run ran: recorded in the JSON of every experiment."""
from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def git_commit() -> str | None:
    """The checked-out commit, with ``-dirty`` when there are uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(['git', *args], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        return git('rev-parse', '--short=12', 'HEAD') + ('-dirty' if git('status', '--porcelain')
                                                          else '')
    except (OSError, subprocess.CalledProcessError):
        return None
