"""Imported by the forkserver process alone (see forkserver.py): when Snakemake exits, the
forkserver follows at once. Python's usual finalization of a process that has Dask imported takes
about 0.1 s, during which it still holds Snakemake's stdout and stderr open, so whoever reads
Snakemake's output waits that long for the end. Its children are not affected: a forked worker
always leaves through os._exit, never through atexit."""

import atexit
import os

atexit.register(os._exit, 0)
