"""Runs in the Snakemake process: routes jobs, keeps the workers, reports the run.

May import `worker/` (the task and plugin it sends, the process helpers it shares) and the
contract; nothing outside `head/` imports it but the package's lazy `Executor` and the dry-run
hook. Stays light to import: Snakemake loads the plugin whenever it lists executors.
"""
