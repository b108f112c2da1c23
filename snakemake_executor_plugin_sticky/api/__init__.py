"""What templates and scripts import: `sticky_state`, `Batcher`, `stage`. Runs in a resident
worker, or in any job of another executor, where it builds what it needs in the process.

Imports the contract (`wire`, `templates`) only: never `worker/` nor `head/`. It reaches the
worker it runs in through one accessor, `resident.current()`.
"""
