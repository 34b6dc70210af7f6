"""The console script."""

import subprocess
import sys

from moekit.cli import main


def test_info_lists_routers_and_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "topk" in out and "expert_choice" in out and "grouped GEMM" in out


def test_console_script_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "moekit.cli", "info"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("moekit ")
