"""Run logging: a rich progress bar, a resumable `metrics.jsonl`, and optional wandb; rank 0 only."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from consistency_lens.config import WandbConfig
from consistency_lens.errors import LensError
from consistency_lens.utils.io import atomic_write_text

METRICS = "metrics.jsonl"
_WANDB_ID = "wandb_id.txt"


class MetricsFile:
    """Append-only JSON lines, one per logged step, kept consistent with the resumed step."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> list[dict]:
        """All complete records (a line cut short by a crash is ignored)."""
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def truncate_after(self, step: int) -> None:
        """Drop records with `step > step` (they belong to work the resumed run will redo)."""
        if not self.path.is_file():
            return
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def append(self, record: dict) -> None:
        """Append one record and flush it to disk."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def _stats_text(m: dict, shown: tuple[str, ...] | None = None) -> str:
    if not m:
        return ""
    # The objective decides what it logs; show its names (default: the loss terms present).
    names = shown or tuple(k for k in m if k == "loss" or k.startswith("loss_"))
    parts = [f"{k} {m[k]:.4g}" for k in names if isinstance(m.get(k), (int, float))]
    if "samples_per_s" in m:
        parts.append(f"{m['samples_per_s']:.1f} samples/s")
    return "  ".join(parts)


def _progress(console: Console, disable: bool) -> Progress:
    return Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[stats]}"),
        console=console,
        disable=disable,
    )


class WandbRun:
    """A wandb run that continues under the same id when the training run resumes."""

    def __init__(self, cfg: WandbConfig, run_dir: Path, config: dict, resume: bool):
        try:
            import wandb
        except ImportError:
            raise LensError(
                "wandb.enabled is true but wandb is not installed; pip install wandb "
                "or set wandb.enabled=false."
            ) from None
        self._wandb = wandb
        id_file = Path(run_dir) / _WANDB_ID
        resumable = resume and id_file.is_file()
        run_id = id_file.read_text().strip() if resumable else uuid.uuid4().hex[:12]
        atomic_write_text(id_file, run_id + "\n")
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name or Path(run_dir).name,
            mode=cfg.mode,
            tags=cfg.tags,
            config=config,
            dir=str(run_dir),
            id=run_id,
            resume="allow" if resumable else None,
        )

    def log(self, step: int, metrics: dict) -> None:
        """Log numeric metrics at `step`."""
        self.run.log(metrics, step=step)

    def finish(self, exit_code: int = 0) -> None:
        """Close the run (flushes the offline files)."""
        self.run.finish(exit_code=exit_code)


class RunLogger:
    """Console, progress bar, metrics.jsonl and wandb for one training run.

    Every method is a no-op unless `is_main`, so callers need no rank checks.
    """

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        resume_step: int | None = None,
        wandb_cfg: WandbConfig | None = None,
        config: dict | None = None,
        is_main: bool = True,
        console: Console | None = None,
        shown: tuple[str, ...] | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.shown = shown
        """Metric names shown beside the progress bar (the objective's loss names and coefficients)."""
        self.total_steps = total_steps
        self.resume_step = resume_step
        self.is_main = is_main
        self.metrics = MetricsFile(self.run_dir / METRICS)
        self.console = console or Console(stderr=True)
        self._wandb_cfg = wandb_cfg
        self._config = config or {}
        self._wandb: WandbRun | None = None
        self._progress = _progress(self.console, disable=not is_main)
        self._task = None

    def __enter__(self) -> RunLogger:
        if not self.is_main:
            return self
        # A fresh run starts an empty file; a resumed one drops what it is about to redo.
        self.metrics.truncate_after(-1 if self.resume_step is None else self.resume_step)
        if self._wandb_cfg is not None and self._wandb_cfg.enabled:
            resume = self.resume_step is not None
            self._wandb = WandbRun(self._wandb_cfg, self.run_dir, self._config, resume)
        self._progress.start()
        self._task = self._progress.add_task(
            "train", total=self.total_steps, completed=self.resume_step or 0, stats=""
        )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.is_main:
            return
        self._progress.stop()
        if self._wandb is not None:
            self._wandb.finish(exit_code=0 if exc_type is None else 1)

    def update(self, step: int, metrics: dict) -> None:
        """Advance the progress bar to `step` and show the latest training metrics."""
        if self.is_main and self._task is not None:
            self._progress.update(
                self._task, completed=step, stats=_stats_text(metrics, self.shown)
            )

    def log(self, step: int, metrics: dict, kind: str = "train") -> None:
        """Write one metrics.jsonl line (and a wandb point) for `step`."""
        if not self.is_main:
            return
        record = {"step": step, "kind": kind, "time": time.time(), **metrics}
        self.metrics.append(record)
        if self._wandb is not None:
            self._wandb.log(step, {f"{kind}/{k}": v for k, v in metrics.items()})

    def info(self, message: str) -> None:
        """Print a status line above the progress bar."""
        if self.is_main:
            self.console.print(message, highlight=False)

    def warn(self, message: str) -> None:
        """Print a warning line above the progress bar."""
        if self.is_main:
            self.console.print(f"[yellow]warning:[/yellow] {message}", highlight=False)
