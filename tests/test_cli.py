"""The command line as a user meets it: exit codes, one-line errors, help. In process (the CLI's
own ``main``, what ``python -m evomerge.cli`` runs; a subprocess per call cost 3 s of imports);
one test runs it as a subprocess, where the exit code and streams are the operating system's."""

import json
import os
import subprocess
import sys

import pytest


@pytest.fixture
def run(evomerge_main):
    return evomerge_main


def test_zoo_info_prints_the_card(run, pico_zoo, pico_cache):
    done = run("zoo", "info", "zoo=pico", cache=pico_cache)
    assert done.returncode == 0, done.stderr
    assert "| task_arithmetic@0.8 |" in done.stdout and "shout" in done.stdout
    data = json.loads(run("zoo", "info", "zoo=pico", "--json", cache=pico_cache).stdout)
    assert data["experts"]["add"].endswith("models/add") and data["scores"]["base"]["test"].keys()


def test_zoo_build_reuses_a_built_zoo(run, pico_zoo, pico_cache):
    done = run("zoo", "build", "zoo=pico", cache=pico_cache)
    assert done.returncode == 0 and "zoo ready at" in done.stdout
    assert done.stderr == ""


@pytest.mark.parametrize("args, named", [
    (["zoo", "info", "zoo=pico", "zoo.skills=[add,telepathy]"], "telepathy"),
    (["zoo", "build", "zoo=nope"], "nope"),
    (["zoo", "build", "zoo=pico", "zoo.kind=gpt5"], "gpt5"),
])
def test_user_errors_are_one_line_with_exit_code_2(run, args, named, tmp_path):
    done = run(*args, cache=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evomerge: error:") and named in lines[0]
    assert "Traceback" not in done.stderr
    assert not any(tmp_path.iterdir())  # nothing built, nothing written


def test_info_on_an_unbuilt_zoo_says_how_to_build_it(run, tmp_path):
    done = run("zoo", "info", "zoo=pico", cache=tmp_path)
    assert done.returncode == 2 and "evomerge zoo build" in done.stderr


def test_debug_shows_the_traceback_and_the_exit_code_is_the_processs(tmp_path):
    done = subprocess.run([sys.executable, "-m", "evomerge.cli", "--debug", "zoo", "build", "zoo=nope"],
                          capture_output=True, text=True, env={**os.environ, "EVOMERGE_CACHE": str(tmp_path)}, timeout=300)
    assert done.returncode == 2 and "Traceback" in done.stderr and "evomerge: error:" in done.stderr


def test_help_shows_examples(run):
    for args in (["--help"], ["zoo", "--help"], ["zoo", "build", "--help"], ["zoo", "info", "--help"]):
        done = run(*args)
        assert done.returncode == 0 and "example" in done.stdout, args
