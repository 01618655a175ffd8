"""A saved lens as eval, explain and serve read it: where it is, how it loads, the settings it
brings with it, and that its directory is never written by them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from consistency_lens.config import LensConfig, decode_settings
from consistency_lens.errors import LensError
from consistency_lens.models.lens import CONFIG_FILE

if TYPE_CHECKING:
    from consistency_lens.models.lens import ConsistencyLens


def default_checkpoint(cfg: LensConfig) -> Path:
    """The lens directory `train` writes: `<train.run_dir>/lens`."""
    return Path(cfg.train.run_dir) / "lens"


def load_lens(
    cfg: LensConfig, checkpoint: Path | None, shipped_fallback: bool = False
) -> tuple[ConsistencyLens, Path]:
    """Load a saved lens on `cfg.device`: `checkpoint` (a folder or Hub repo id), else
    `<train.run_dir>/lens`.

    With `shipped_fallback` (explain), a run directory that holds no lens and no checkpoints
    falls back to the lens shipped in the package for `cfg.model` (`consistency_lens.shipped`);
    eval never does, so its results are always the run's own.
    """
    from consistency_lens.models.hub import resolve_lens
    from consistency_lens.models.lens import ConsistencyLens
    from consistency_lens.shipped import shipped_lens
    from consistency_lens.training.checkpoint import checkpoints_dir

    # A Hub repo id becomes its cached snapshot of the lens files, then reads as a folder does.
    path = resolve_lens(checkpoint) if checkpoint is not None else default_checkpoint(cfg)
    # A run with checkpoints but no lens was interrupted: it must be resumed, not replaced.
    if (
        shipped_fallback
        and checkpoint is None
        and not (path / CONFIG_FILE).is_file()
        and not checkpoints_dir(cfg.train.run_dir).exists()
        and (shipped := shipped_lens(cfg.model)) is not None
    ):
        print(f"No lens at '{path}'; using the lens shipped for {cfg.model}: '{shipped}'.")
        path = shipped
    if not (path / CONFIG_FILE).is_file():
        raise LensError(
            f"No saved lens at '{path}' (lens_config.json missing); train one with "
            "`consistency-lens train` or pass --checkpoint DIR."
        )
    # The user's config names the base model and decides remote code, never the lens directory.
    lens = ConsistencyLens.from_pretrained(
        path, device=cfg.device, model=cfg.model, trust_remote_code=cfg.trust_remote_code
    )
    # A key the lens left unset writes at its default, so that is the value a key replaces.
    own = lens.cfg.decode.filled()
    lens.cfg = lens.cfg.model_copy(update={"decode": decode_settings(lens.cfg, cfg)})
    # A config written for another lens (the demo's, say) must not change this one's writing
    # unnoticed: its figures would no longer be the lens's own.
    replaced = [
        f"decode.{key}={value} (the lens's own: {getattr(own, key)})"
        for key, value in cfg.decode.model_dump(exclude_none=True).items()
        if getattr(own, key) != value
    ]
    if replaced:
        them = "it" if len(replaced) == 1 else "them"
        print(
            f"Writing with {', '.join(replaced)} from your config or command line; leave {them} "
            "unset (null) to write as the lens was saved."
        )
    return lens, path


def eval_config(cfg: LensConfig, lens: ConsistencyLens) -> LensConfig:
    """`cfg` with the model, layer and text length the lens was trained on (a lens directory is
    self-describing); the corpus, dump settings and output_dir stay the user's."""
    train = cfg.train.model_copy(update={"t_text": lens.cfg.train.t_text})
    return cfg.model_copy(update={"model": lens.cfg.model, "layer": lens.layer, "train": train})


def _inside(path: Path, directory: Path) -> bool:
    path, directory = Path(path).resolve(), Path(directory).resolve()
    return path == directory or directory in path.parents


def refuse_lens_dir(out: Path, lens_dir: Path, what: str) -> None:
    """The lens directory is read-only to eval and explain: refuse an output inside it."""
    if _inside(out, lens_dir):
        raise LensError(
            f"{what} '{out}' is inside the lens directory '{lens_dir}', which eval and explain "
            "never write; pass another directory (--output DIR), and use `consistency-lens card` "
            "to put results in the lens's card."
        )
