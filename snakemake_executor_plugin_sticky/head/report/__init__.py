"""The run report: the run's records (records.py), and at the end report.json and a summary in
the log (summary.py) and timeline.png (timeline.py). Imports point one way: this module uses
the three, summary and timeline use the records, the records use nothing of the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from ...templates import TemplateSpec
from .records import InvocationRecord, RunRecords, WorkerRecord, exit_description
from .summary import report_dict, summary_lines
from .timeline import STICKY_DONE, TimelinePainter, can_draw, draw_timeline

__all__ = ["InvocationRecord", "RunReport", "WorkerRecord", "exit_description"]


class RunReport(RunRecords):
    """The records of one run, with the painter of its timeline and the writing of its report."""

    def __init__(self, templates: dict[str, TemplateSpec], folder: Path, log: Any):
        super().__init__(templates, log)
        self.folder = folder
        self.painter: Optional[TimelinePainter] = None  # see start_painter

    def start_painter(self) -> None:
        """Get timeline.png's painter going: once workers start, a report will be written."""
        if self.painter is not None and self.painter.drawing:
            self.dismiss_painter()  # drawn too early: workers start again after all
        if self.painter is None and can_draw():
            self.painter = TimelinePainter()

    def sticky_jobs_done(self) -> None:
        """Every sticky job of the run is done: the painter draws timeline.png now, while the
        jobs after them run, rather than after the last one."""
        if self.painter is None or self.painter.drawing:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self.painter.start_drawing(self.as_dict(STICKY_DONE), self.invocations_so_far(), self.started, self.timeline)

    @property
    def timeline(self) -> Path:
        """Where timeline.png goes."""
        return self.folder / "timeline.png"

    def invocations_so_far(self) -> list[InvocationRecord]:
        """The invocation records so far (a copy: the painter gets them while the run goes on)."""
        return self.snapshot()[1]

    def dismiss_painter(self) -> None:
        """No timeline this time: let the painter process go."""
        if self.painter is not None:
            self.painter.close()
            self.painter = None

    def as_dict(self, status: str) -> dict[str, Any]:
        """report.json's content now."""
        return report_dict(self, status)

    def write(self, status: str) -> Optional[dict[str, Any]]:
        """Write report.json and timeline.png; log the summary. Returns the report."""
        report = self.as_dict(status)
        if not report["templates"]:
            self.dismiss_painter()
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        drawn = self.draw(report)
        for line in summary_lines(report):
            self.log.info(line)
        timeline = (
            f"timeline: {self.timeline}"
            if drawn
            else "no timeline.png: it needs matplotlib (pip install 'snakemake-executor-plugin-sticky[timeline]')"
        )
        self.log.info(f"Sticky report: {self.folder / 'report.json'}, {timeline}")
        return report

    def draw(self, report: dict[str, Any]) -> bool:
        """timeline.png, by the painter where it runs; whether one could be drawn at all."""
        painter, self.painter = self.painter, None
        drawn = can_draw()
        try:
            if painter is not None:
                if not painter.drawing:
                    painter.start_drawing(report, self.invocations_so_far(), self.started, self.timeline)
                painter.finish_drawing()
            elif drawn:
                draw_timeline(report, self.invocations_so_far(), self.started, self.timeline)
        except Exception as e:  # the picture must not cost the run its report
            self.log.warning(f"Sticky report: could not draw timeline.png: {type(e).__name__}: {e}")
        return drawn
