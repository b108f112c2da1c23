"""The house in order: the docs speak of the product and agree with the code, and the plugin
changes nothing in a process beyond a run's length."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from snakemake_executor_plugin_sticky.settings import settings_table

from conftest import Workflow, snakemake_env
from helpers import LLM_TEMPLATE, ONE_TEMPLATE_SNAKEFILE, sticky_workflow

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_settings_table_of_the_docs_is_made_from_the_settings_help():
    further = (ROOT / "docs" / "further.md").read_text()
    table = further.split("<!-- settings table: generated, do not edit -->\n", 1)[1].split("\n<!--", 1)[0]
    assert table.strip() == settings_table().strip(), (
        "docs/further.md's settings table differs from settings.py: "
        "python -m snakemake_executor_plugin_sticky.settings gives the table"
    )


def test_the_readme_is_a_product_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert "pip install snakemake-executor-plugin-sticky" in readme and "def setup(" in readme
    assert "make demo" in readme and "make test" in readme and "StickyInvoc" in readme
    prose = re.sub(r"```.*?```", "", readme, flags=re.DOTALL)
    for link in re.findall(r"\]\(([^)#]+)", prose):
        if not link.startswith("http"):
            assert (ROOT / link).exists(), link
    for flag in set(re.findall(r"--sticky-[a-z-]+", readme)):
        assert f"`{flag}`" in settings_table(), f"the README names {flag}, which is no setting"


def test_the_docs_speak_of_the_product_not_of_how_the_work_went():
    for path in DOCS:
        words = re.findall(r"\b(sessions?|rounds?|issues?)\b", path.read_text(), flags=re.IGNORECASE)
        assert not words, f"{path.name}: {words}"


def test_the_license_matches_the_package_metadata():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert any(c.startswith("Programming Language :: Python :: 3.1") for c in project["classifiers"])
    assert "snakemake/" not in str(project.get("urls", {})), "no other organisation's name"


def test_constructing_the_settings_starts_no_process():
    """Dry runs, linting and the API construct the settings: they must not start the forkserver."""
    code = (
        "import multiprocessing.forkserver as f, psutil, os\n"
        "from snakemake_executor_plugin_sticky import ExecutorSettings\n"
        "ExecutorSettings(); ExecutorSettings(workers=2)\n"
        "print(f._forkserver._forkserver_pid, len(psutil.Process(os.getpid()).children()))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["None", "0"]


DRIVE = """
import gc, logging, multiprocessing.spawn, sys
from pathlib import Path
import dask, distributed  # noqa: F401  (its config defaults)
import snakemake.jobs
from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings
from snakemake_executor_plugin_sticky import ExecutorSettings

def state():
    return (gc.get_freeze_count(), dask.config.get("distributed.scheduler.allowed-failures"),
            dask.config.get("distributed.worker.multiprocessing-method"),
            logging.getLogger("distributed").level, multiprocessing.spawn.get_preparation_data.__module__,
            snakemake.jobs.Job.__dict__["is_pipe_or_service_input"].__module__)

if __name__ == "__main__":
    before = state()
    with SnakemakeApi(OutputSettings()) as api:
        workflow = api.workflow(
            resource_settings=ResourceSettings(cores=2),
            config_settings=ConfigSettings(configfiles=[Path("config.yaml")], config={"count": 2}),
            snakefile=Path("Snakefile"),
        )
        workflow.dag().execute_workflow(executor="sticky", executor_settings=ExecutorSettings())
    after = state()
    print("BEFORE", before)
    print("AFTER", after)
    sys.exit(0 if before == after else 1)
"""


def test_what_a_run_changes_in_the_snakemake_process_is_undone_when_it_ends(workflow: Workflow):
    sticky_workflow(workflow, ONE_TEMPLATE_SNAKEFILE, LLM_TEMPLATE)
    workflow.write("drive.py", DRIVE)
    done = subprocess.run(
        [sys.executable, "drive.py"],
        cwd=workflow.root,
        env=snakemake_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert len(list(workflow.root.glob("out/*.json"))) == 2


PACKAGE = ROOT / "snakemake_executor_plugin_sticky"
# Where code runs, and what each place may import: head -> worker -> api -> the contract.
MAY_IMPORT = {
    "wire": set(),
    "environment": set(),
    "settings": set(),
    "templates": {"environment", "wire"},
    "api": {"api", "templates", "environment", "wire"},
    "worker": {"worker", "api", "templates", "environment", "wire"},
    "head": {"head", "worker", "templates", "environment", "settings", "wire"},
}


def package_imports() -> dict[str, set[str]]:
    """Each module of the package (dotted, from the package) and the package modules it imports,
    at module level or inside functions alike."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        package = parts[:-1] if parts[-1] == "__init__" else parts[:-1]
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{module}.{a.name}" if module else a.name for a in node.names] + [module]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE.name):
                module = node.module.removeprefix(PACKAGE.name).lstrip(".")
                targets = [f"{module}.{a.name}" if module else a.name for a in node.names] + [module]
            graph[name].update(targets)
    for name, targets in graph.items():
        graph[name] = {t for t in targets if t in graph and t != name}
    return graph


def test_imports_point_one_way_from_where_code_runs():
    for module, targets in package_imports().items():
        place = module.split(".")[0]
        if place not in MAY_IMPORT:
            continue  # the package's face: it re-exports the api and loads the executor lazily
        for target in targets:
            assert target.split(".")[0] in MAY_IMPORT[place], f"{module} imports {target}"


def test_the_imports_of_the_package_draw_no_circle():
    graph = package_imports()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(module) :] + [module]))
        if module in done:
            return
        for target in sorted(graph[module]):
            if not target.startswith(module + "."):  # a package imports its own modules
                visit(target, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_the_package_top_holds_few_entries_grouped_by_where_they_run():
    entries = [p.name for p in PACKAGE.iterdir() if p.name != "__pycache__"]
    assert len(entries) <= 12, sorted(entries)
    assert {"head", "worker", "api"} <= set(entries) and "wire.py" in entries


def test_functions_fit_a_screen():
    too_long = []
    for folder in ("snakemake_executor_plugin_sticky", "tests", "benchmarks", "workflow"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > 60:
                        too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not too_long, too_long
