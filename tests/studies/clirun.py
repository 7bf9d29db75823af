"""Run ``precision-sweep`` in-process for a test: (exit code, stdout, stderr)."""
from __future__ import annotations

from studies import cli


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``studies.cli.main(argv)``'s exit code (a SystemExit's code included) and what it printed."""
    try:
        code = cli.main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err
