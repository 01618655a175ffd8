"""Training objectives: what a lens minimises, behind one small protocol and a registry.

An objective is a class registered with `@register("name")` in any module of this package (every
module here is imported, so adding an objective is one new file plus its test); `train.objective`
picks it. The protocol, in the spirit of tuned-lens / SAELens training losses:

- `terms`: names of the scalar terms `__call__` returns (besides the total `loss`). The trainer
  logs (training and `val_<name>` on validation batches) whatever names `__call__` returns; the
  declared ones also get report curves and the progress line, so no list of loss names lives
  anywhere else.
- `coefficients`: names of scheduled coefficients it needs; each must be a `ScheduleConfig` field
  of `train` (e.g. `tau`, `alpha`). The trainer evaluates them at every step, passes them in
  `StepInfo.coeffs` and logs them.
- `settings_class` (optional): the objective's own settings, an `ObjectiveSettings` class declared beside
  it; `train.<section>` (`section`, by default the objective's name) then holds them, validated
  with the rest of the config and free to change on resume. The objective reads them as
  `self.settings`. So an objective with settings is still one file plus its test.
- `next_tokens_needed()`: how many tokens of `input_ids_next` (the corpus tokens after P, stored
  in the dump) the objective reads under its settings, e.g. `train.t_text` for teacher forcing
  (default 0); the trainer refuses a dump that stores fewer when the run is built.
- `stored_predictions()`: the dump header's `predicted` (`data.layout.prediction_header`) whose
  stored continuation of M (`Batch.predicted_ids`) the objective reads instead of running M, or
  None (default): the trainer has each split give it only where its header says exactly that.
- `__init__(lens, cfg)`: runs once when the run is built, on the lens's device. Extra state (say, a
  frozen reference copy of D) lives on the objective, not on the lens: it is never trained,
  checkpointed or sharded, and is rebuilt identically on resume.
- `__call__(lens, batch, step) -> ObjectiveOutput`: the loss of one micro-batch (with its graph)
  and the detached-or-not named scalar terms. It may sample, but only from the global torch RNG
  (or a private generator with a fixed seed), so that a resumed run replays the same noise.
- `reconstruct(lens, batch) -> Â` (optional): what validation's `val_kl`, MSE and FVE measure;
  by default E reading D's explanation (`ConsistencyLens.reconstruct`), as `eval` does. An
  objective whose loss is built on that very Â returns it as `ObjectiveOutput.a_hat`, and
  validation reuses it instead of calling `reconstruct` again.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from consistency_lens.config import LensConfig, ObjectiveSettings, ScheduleConfig, register_settings
from consistency_lens.data.collate import Batch
from consistency_lens.errors import LensError


@dataclass(frozen=True)
class StepInfo:
    """Where training is: the optimizer step, the run's length and this step's coefficients."""

    step: int
    """Optimizer steps done before this one."""
    total_steps: int
    """`train.steps`."""
    coeffs: dict[str, float] = field(default_factory=dict)
    """Value of every coefficient the objective declared, at `step`."""

    def __getitem__(self, name: str) -> float:
        return self.coeffs[name]


@dataclass
class ObjectiveOutput:
    """One micro-batch's loss (carries the graph) and its named scalar terms."""

    loss: torch.Tensor
    """What backward runs on."""
    terms: dict[str, torch.Tensor]
    """Scalar terms by name (the objective's `terms`), logged as floats."""
    a_hat: torch.Tensor | None = None
    """The (B, d) Â of `reconstruct`, when the loss was built on it: validation then scores it
    instead of reconstructing a second time (the refit's would choose every text again)."""


class Objective:
    """Base class of an objective; see the package docstring for the protocol."""

    name: ClassVar[str] = ""
    """Registry key, set by `register`."""
    terms: ClassVar[tuple[str, ...]] = ()
    """Names of the scalar terms returned besides `loss`."""
    coefficients: ClassVar[tuple[str, ...]] = ()
    """Scheduled coefficients (ScheduleConfig fields of `train`) the objective reads."""
    settings_class: ClassVar[type[ObjectiveSettings] | None] = None
    """The objective's own settings, validated as `train.<section>`; `None` when it has none."""
    section: ClassVar[str] = ""
    """Key of those settings under `train`; empty means the objective's name."""
    term_titles: ClassVar[dict[str, str]] = {}
    """Optional plot titles of terms and coefficients for the report."""
    linear_terms: ClassVar[tuple[str, ...]] = ()
    """Terms plotted on a linear axis (the others on a log axis when positive)."""

    def __init__(self, lens, cfg: LensConfig):
        self.cfg = cfg
        self.settings = self.settings_of(cfg)

    @classmethod
    def settings_of(cls, cfg: LensConfig) -> ObjectiveSettings | None:
        """This objective's own settings in `cfg` (`train.<section>`), or None when it has none."""
        return None if cls.settings_class is None else getattr(cfg.train, cls.section)

    def __call__(self, lens, batch: Batch, step: StepInfo) -> ObjectiveOutput:
        """Loss and named terms of one micro-batch."""
        raise NotImplementedError

    def next_tokens_needed(self) -> int:
        """Corpus tokens after P (`input_ids_next`) the objective reads; the dump must store them."""
        return 0

    def stored_predictions(self) -> dict | None:
        """The header of the stored continuation of M (`Batch.predicted_ids`) the objective reads
        where a split has it, or None when it reads none."""
        return None

    def reconstruct(self, lens, batch: Batch) -> torch.Tensor:
        """Â (B, d) that validation scores: E reading D's explanation of A, as `eval` writes it."""
        return lens.reconstruct(batch.A)[1]

    @classmethod
    def loss_names(cls) -> tuple[str, ...]:
        """`loss` followed by the term names: the keys the trainer logs for this objective."""
        return ("loss", *cls.terms)


def normalised_mse(a_hat: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """MSE of Â and A per element, both divided by the mean norm of A (scale-free across models)."""
    scale = a.norm(dim=-1).mean().clamp_min(1e-8)
    return torch.nn.functional.mse_loss(a_hat / scale, a / scale)


_REGISTRY: dict[str, type[Objective]] = {}


def register(name: str):
    """Class decorator: make an `Objective` subclass selectable as `train.objective=name`."""

    def wrap(cls: type[Objective]) -> type[Objective]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"Objective '{name}' is registered twice.")
        cls.name = name
        if cls.settings_class is not None:
            cls.section = cls.section or name
            register_settings(cls.section, cls.settings_class)
        _REGISTRY[name] = cls
        return cls

    return wrap


def _load_all() -> None:
    # Every module of the package registers its objectives on import; the plan's comes first.
    importlib.import_module(f"{__name__}.plan")
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def available() -> list[str]:
    """Registered objective names, the plan's first."""
    _load_all()
    # Registration order follows imports, which a caller's own import of a module can reorder.
    return sorted(_REGISTRY, key=lambda name: name != "plan")


def objective_class(name: str) -> type[Objective]:
    """The class registered as `name`, or a clear error listing the registered ones."""
    _load_all()
    if name not in _REGISTRY:
        raise LensError(
            f"Unknown train.objective '{name}'; registered objectives: {', '.join(available())}."
        )
    return _REGISTRY[name]


def check_coefficients(cls: type[Objective], cfg: LensConfig) -> None:
    """Refuse an objective that asks for a coefficient `train` has no schedule for."""
    for coeff in cls.coefficients:
        if not isinstance(getattr(cfg.train, coeff, None), ScheduleConfig):
            raise LensError(
                f"Objective '{cls.name}' needs the scheduled coefficient train.{coeff}, which is "
                "not a schedule of train; add it to TrainConfig as a ScheduleConfig."
            )


def build_objective(lens, cfg: LensConfig) -> Objective:
    """The objective `cfg.train.objective`, built once for `lens` (its extra state included)."""
    cls = objective_class(cfg.train.objective)
    check_coefficients(cls, cfg)
    return cls(lens, cfg)


def step_info(cls: type[Objective], cfg: LensConfig, step: int) -> StepInfo:
    """The declared coefficients of `cls` at optimizer step `step`."""
    from consistency_lens.training.schedules import schedule_value

    train = cfg.train
    coeffs = {c: schedule_value(getattr(train, c), step, train.steps) for c in cls.coefficients}
    return StepInfo(step=step, total_steps=train.steps, coeffs=coeffs)
