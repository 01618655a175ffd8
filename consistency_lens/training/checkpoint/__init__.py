"""Training checkpoints: atomic directories of safetensors + a weights-only state, with checksums.

Layout: `<run_dir>/checkpoints/step_<N>/` holding `trainable.safetensors` (never the frozen base),
`ema.safetensors` (when EMA is on), `state.pt` (optimizer, scheduler, RNG, data position,
counters; loaded only with `torch.load(weights_only=True)`), `config.json`, and `manifest.json`
(format version and the sha256 of every other file). A directory is written under a temporary
name and renamed into place, so a checkpoint is either complete or absent.

Multi-process runs (ddp/fsdp/deepspeed) write a *sharded* checkpoint in the same kind of directory:
the engine's own files (torch.distributed.checkpoint's `.metadata` and `*.distcp`, or DeepSpeed's
partitions), `state.pt` without weights, one `rng_<rank>.pt` per rank, `config.json`, and a
manifest with `"kind": "sharded"` over every file.

`save_run` and `restore_run` are the trainer's two calls; a resume maps between the formats and
world sizes where it can (DeepSpeed's own files resume only on the same number of ranks).

Modules: `layout` (names, listing, placing and pruning directories), `manifest` (sealing,
verifying, the weights-only `state.pt`), `rng`, `dense` (single-process format), `sharded`
(multi-process format), `safe_dcp` (DCP reads with an allow-listed unpickler), `save`, `resume`.
"""

from consistency_lens.training.checkpoint.dense import Checkpoint, load_checkpoint, save_checkpoint
from consistency_lens.training.checkpoint.layout import (
    CONFIG,
    EMA,
    FORMAT_VERSION,
    MANIFEST,
    SHARDED,
    STATE,
    TRAINABLE,
    checkpoints_dir,
    list_checkpoints,
    prune_checkpoints,
)
from consistency_lens.training.checkpoint.manifest import (
    is_sharded,
    latest_valid,
    load_state,
    read_config,
    verify_checkpoint,
)
from consistency_lens.training.checkpoint.resume import (
    check_resume_config,
    checkpoint_to_resume,
    restore_run,
)
from consistency_lens.training.checkpoint.rng import capture_rng, restore_rng
from consistency_lens.training.checkpoint.safe_dcp import dcp_load
from consistency_lens.training.checkpoint.save import save_run
from consistency_lens.training.checkpoint.sharded import load_sharded_state, save_sharded_checkpoint

__all__ = [
    "CONFIG",
    "EMA",
    "FORMAT_VERSION",
    "MANIFEST",
    "SHARDED",
    "STATE",
    "TRAINABLE",
    "Checkpoint",
    "capture_rng",
    "check_resume_config",
    "checkpoint_to_resume",
    "checkpoints_dir",
    "dcp_load",
    "is_sharded",
    "latest_valid",
    "list_checkpoints",
    "load_checkpoint",
    "load_sharded_state",
    "load_state",
    "prune_checkpoints",
    "read_config",
    "restore_rng",
    "restore_run",
    "save_checkpoint",
    "save_run",
    "save_sharded_checkpoint",
    "verify_checkpoint",
]
