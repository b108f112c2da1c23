"""The umask, the locale and signal handlers that two scripts side by side change, in the order
that breaks a per-script undo (first changes, second changes, first ends, second ends), are the
process's own again once both have ended: the next script sees what a fresh job sees."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import Workflow

SNAKEFILE = """
configfile: "config.yaml"

rule all:
    input: "out/after.txt"

rule change:
    output: "out/change-{side}.txt"
    resources: sticky="t"
    script: "change.py"

rule after:
    input: expand("out/change-{side}.txt", side=("first", "second"))
    output: "out/after.txt"
    resources: sticky="t"
    script: "look.py"
"""

CHANGE = """
import locale, os, signal, time

def wait(name):
    deadline = time.time() + 120
    while not os.path.exists(name):
        assert time.time() < deadline, f"{name} never came"
        time.sleep(0.02)

first = snakemake.wildcards.side == "first"
if not first:
    wait("first-changed")
os.umask(0o077 if first else 0o007)
locale.setlocale(locale.LC_COLLATE, "C.UTF-8" if first else "C")
signal.signal(signal.SIGUSR1, signal.SIG_IGN if first else signal.default_int_handler)
open("first-changed" if first else "second-changed", "w").close()
if first:
    wait("second-changed")  # the first ends while the second still runs
else:
    wait(snakemake.output[0].replace("second", "first"))
open(snakemake.output[0], "w").write("changed\\n")
"""

LOOK = """
import locale, os, signal
mask = os.umask(0o022)
os.umask(mask)
handler = signal.getsignal(signal.SIGUSR1)
open(snakemake.output[0], "w").write(f"{oct(mask)} {locale.setlocale(locale.LC_COLLATE)} {handler}\\n")
"""


@pytest.mark.parametrize("slots", [1, 2])
def test_settings_neighbours_change_end_as_the_process_had_them(tmp_path: Path, slots: int):
    seen = {}
    for mode, executor in (("local", None), ("sticky", "sticky")):
        root = tmp_path / mode
        root.mkdir()
        wf = Workflow(root)
        wf.write("Snakefile", SNAKEFILE)
        wf.write("config.yaml", f"sticky:\n  t: {{setup: template.py, slots: {slots}}}\n")
        wf.write("template.py", "def setup():\n    return None\n")
        wf.write("change.py", CHANGE)
        wf.write("look.py", LOOK)
        # with slots 1 the two changes cannot meet on one worker: two workers, each its own process
        args = ("--sticky-workers", str(3 - slots)) if executor else ()
        run = wf.run(*args, executor=executor, cores=2)
        assert run.returncode == 0, run.output
        seen[mode] = wf.read("out/after.txt")
    assert seen["sticky"] == seen["local"]
