"""One driver per run folder: a second search or resume of a folder being searched is refused in
one line naming the holder, and a killed driver leaves nothing that blocks the next resume."""

from __future__ import annotations

import subprocess
import sys

import pytest

from evomerge.errors import UserError
from evomerge.run import RunDir

HOLD = ("import sys, time\n"
        "from evomerge.run import RunDir\n"
        "held = RunDir(sys.argv[1]).driving()\n"
        "held.__enter__()\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n")


@pytest.mark.reliability("safety", "a second `evomerge search`/`resume` driving a run folder already being searched: "
                                   "refused in one line naming the holder's pid; a SIGKILLed driver leaves no stale lock")
def test_a_second_driver_is_refused_and_a_killed_one_releases_the_folder(tmp_path):
    run = RunDir.create(tmp_path / "run", {"name": "run"})
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run.root)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"being searched by another process \(pid {holder.pid}\)"):
            with run.driving():
                pass
        done = subprocess.run([sys.executable, "-m", "evomerge.cli", "resume", str(run.root)],
                              capture_output=True, text=True, timeout=120)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and f"pid {holder.pid}" in lines[0]
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs
        holder.wait()
    with run.driving():  # the OS released the lock with the process
        pass
    with run.driving():  # and releasing it ourselves works the same
        pass
