"""The README's reliability table is the one the marked tests generate."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_readme_table_matches_the_marked_tests():
    import reliability_table

    generated = subprocess.run([sys.executable, str(HERE / "reliability_table.py")], capture_output=True,
                               text=True, check=True, timeout=300).stdout.strip()
    readme = (HERE.parent / "README.md").read_text()
    start, end = readme.find(reliability_table.BEGIN), readme.find(reliability_table.END)
    assert start >= 0 and end > start, "README lacks the reliability table markers"
    assert readme[start:end + len(reliability_table.END)] == generated, \
        "README's reliability table is stale: run python tests/reliability_table.py and paste it"
    assert generated.count("| fault |") >= 5 and generated.count("| bad input |") >= 10
