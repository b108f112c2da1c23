"""Runs inside a resident worker process, or guards one (its supervisor, the forkserver's reaper).

May import `api/` and the contract (`wire`, `templates`, `environment`), never `head/`.
"""
