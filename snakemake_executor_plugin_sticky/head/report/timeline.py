"""timeline.png: one row per worker process, its staging and setup, its invocations as bars
coloured by template and its model calls, drawn in a small process of its own (matplotlib, an
optional dependency: pip install 'snakemake-executor-plugin-sticky[timeline]')."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

from .. import forkserver
from .records import InvocationRecord

PAINT_TIMEOUT_S = 120.0
# The timeline's status when it is drawn before the run ends (see RunReport.sticky_jobs_done).
STICKY_DONE = "all sticky jobs done"


def can_draw() -> bool:
    """Whether matplotlib is installed (found, not imported: that is slow)."""
    return importlib.util.find_spec("matplotlib") is not None


def natural(text: str) -> list[Any]:
    """Sort key that puts llm-2 before llm-10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


class TimelinePainter:
    """Draws timeline.png in a process of its own, started with the workers. It loads matplotlib
    (half a second of CPU or more) at the lowest CPU priority, on cycles the workers leave idle, instead of
    in this process after the last invocation, where every second adds to the makespan. Forked
    from the workers' forkserver where there is one (cheap, no CUDA, no copy of this process)."""

    def __init__(self) -> None:
        import multiprocessing

        if forkserver.available():
            forkserver.start_forkserver()  # running already, unless the workers are batch jobs
            context = multiprocessing.get_context("forkserver")
        else:
            context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=paint_when_asked, args=(child,), name="sticky-timeline", daemon=True)
        self._process.start()
        child.close()
        self.drawing = False

    def start_drawing(
        self, report: dict[str, Any], invocations: list[InvocationRecord], origin: float, path: Path
    ) -> None:
        """Hand the run over; the picture comes with `finish_drawing`."""
        self.drawing = True
        try:
            self._conn.send((report, invocations, origin, path))
        except OSError:
            pass  # the painter is gone: finish_drawing says so

    def finish_drawing(self) -> None:
        """Wait for the picture; the painter exits after it."""
        try:
            if not self._conn.poll(PAINT_TIMEOUT_S):
                raise TimeoutError(f"the painter process took more than {PAINT_TIMEOUT_S:.0f} s")
            error = self._conn.recv()
        finally:
            self.close()
        if error is not None:
            raise RuntimeError(error)

    def close(self) -> None:
        """Dismiss the painter (it exits when its pipe closes) and reap it."""
        self._conn.close()
        self._process.join(timeout=5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()


def paint_when_asked(conn: Any) -> None:
    """The painter process: load matplotlib now, draw one timeline when asked (once every sticky
    job is done, or when the run is over)."""
    import os
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for Snakemake, which then asks for the picture
    os.nice(19)
    try:
        _import_pyplot()
    except Exception:
        pass  # drawing below fails with the cause, which goes back to the Snakemake process
    try:
        report, invocations, origin, path = conn.recv()
    except (EOFError, OSError):
        return  # dismissed: no report this run
    try:
        draw_timeline(report, invocations, origin, path)
        conn.send(None)
    except Exception as e:
        conn.send(f"{type(e).__name__}: {e}")


def _import_pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


Spans = dict[int, list[tuple[float, float]]]


def draw_timeline(report: dict[str, Any], invocations: list[InvocationRecord], origin: float, path: Path) -> None:
    """One row per worker: setup (hatched) and invocations as bars coloured by template."""
    plt = _import_pyplot()
    rows = [w for t in report["templates"].values() for w in t["workers"]]
    order = {name: i for i, name in enumerate(report["templates"])}
    rows.sort(key=lambda w: (order[w["template"]], natural(w["id"])))
    palette = plt.get_cmap("tab10")
    colors = {name: palette(i % 10) for i, name in enumerate(report["templates"])}
    bars, failed, calls = _spans_by_row(invocations, {w["id"]: i for i, w in enumerate(rows)}, origin)
    height = min(max(2.8, 0.26 * len(rows) + 1.6), 40)
    fig, ax = plt.subplots(figsize=(11, height))
    thin = 0.3 if len(invocations) < 2000 else 0
    for i, worker in enumerate(rows):
        _draw_row(ax, i, worker, colors[worker["template"]], report["wall_s"])
        ax.broken_barh(
            bars.get(i, []), (i - 0.35, 0.7), facecolors=colors[worker["template"]], edgecolors="white", linewidth=thin
        )
        ax.broken_barh(failed.get(i, []), (i - 0.35, 0.7), facecolors="black")
        ax.broken_barh(calls.get(i, []), (i - 0.48, 0.12), facecolors="dimgrey")  # model calls
    step = max(1, len(rows) // 60)
    labels = [rows[i]["id"] for i in range(0, len(rows), step)]
    label_size = 8 if len(rows) < 30 else 6
    ax.set_yticks(range(0, len(rows), step))
    ax.set_yticklabels(labels, fontsize=label_size)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.invert_yaxis()
    ax.set_xlim(0, max(report["wall_s"], 1e-3))
    ax.set_xlabel("seconds since the run started")
    ax.grid(axis="x", alpha=0.3)
    legend_rows = _legend_and_title(ax, _legend_handles(plt, colors, rows, bool(failed), bool(calls)), report["status"])
    # Margins from the label lengths: tight_layout measures every text by drawing the figure
    # once more, a third of the drawing time, which the run's exit waits for.
    label_width = max((len(label) for label in labels), default=0) * label_size * 0.62 / 72 + 0.25
    width, height = fig.get_size_inches()
    top = 0.3 + 0.19 * legend_rows
    fig.subplots_adjust(left=label_width / width, right=1 - 0.2 / width, bottom=0.6 / height, top=1 - top / height)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _spans_by_row(
    invocations: list[InvocationRecord], index: dict[str, int], origin: float
) -> tuple[Spans, Spans, Spans]:
    """(start, length) of each row's invocations that succeeded, that failed, and of its model calls."""
    bars: Spans = {}
    failed: Spans = {}
    calls: Spans = {}
    for inv in invocations:
        if inv.worker in index:
            row = index[inv.worker]
            (bars if inv.ok else failed).setdefault(row, []).append((inv.started - origin, inv.finished - inv.started))
            calls.setdefault(row, []).extend((start - origin, end - start) for start, end, _ in inv.calls)
    return bars, failed, calls


def _draw_row(ax: Any, i: int, worker: dict[str, Any], color: Any, wall_s: float) -> None:
    """A worker's setup, its stagings and the mark of its loss."""
    if worker["setup_started"] is not None:
        end = worker["setup_finished"] if worker["setup_finished"] is not None else wall_s
        ax.broken_barh(
            [(worker["setup_started"], end - worker["setup_started"])],
            (i - 0.4, 0.8),
            facecolors="white",
            edgecolors=color,
            hatch="////",
            linewidth=0.8,
        )
    for staging in worker.get("stagings", ()):
        ax.broken_barh(
            [(staging["stage_started"], staging["seconds"])],
            (i - 0.4, 0.8),
            facecolors="whitesmoke",
            edgecolors="grey",
            hatch="....",
            linewidth=0.8,
        )
    if worker["lost"]:
        ax.plot([worker["gone_at"]], [i], marker="X", color="red", markersize=9, zorder=5)


def _legend_handles(
    plt: Any, colors: dict[str, Any], rows: list[dict[str, Any]], failed: bool, calls: bool
) -> list[Any]:
    """One entry per template and one per kind of mark the picture holds."""
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=c, label=f"invocations of '{n}'") for n, c in colors.items()]
    handles += [Patch(facecolor="white", edgecolor="grey", hatch="////", label="setup")]
    if any(w.get("stagings") for w in rows):
        handles.append(Patch(facecolor="whitesmoke", edgecolor="grey", hatch="....", label="staging (in setup)"))
    if failed:
        handles.append(Patch(facecolor="black", label="failed invocation"))
    if calls:
        handles.append(Patch(facecolor="dimgrey", label="model call (Batcher)"))
    if any(w["lost"] for w in rows):
        handles.append(plt.Line2D([], [], marker="X", color="red", linestyle="", label="worker lost"))
    return handles


def _legend_and_title(ax: Any, handles: list[Any], status: str) -> int:
    """The legend in rows of 4 between the title and the plot, so long template names overlap
    nothing; returns the number of legend rows."""
    columns = min(len(handles), 4)
    legend_rows = -(-len(handles) // columns)
    ax.legend(
        handles=handles,
        loc="lower left",
        bbox_to_anchor=(0.0, 1.0),
        ncol=columns,
        fontsize=8,
        frameon=False,
        borderaxespad=0.2,
    )
    state = status if status == STICKY_DONE else f"run {status}"
    ax.set_title(
        f"Sticky workers: state setup and invocations ({state})", loc="left", fontsize=10, pad=6 + 13 * legend_rows
    )
    return legend_rows
