"""The consistency lens: frozen M, decoder D, encoder E, their trainable modes, save and load."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from consistency_lens.config import (
    CURRICULUM_KEYS,
    MODEL_KEYS,
    WEIGHT_KEYS,
    LensConfig,
    config_from_dict,
    dump_config,
    saved_lens_config,
    weight_settings,
)
from consistency_lens.errors import LensError
from consistency_lens.models.adapter import check_layer, find_parts
from consistency_lens.models.decoder import EMBED_SLOT, DecoderModel, split_prompt
from consistency_lens.models.decoding import best_of_samples
from consistency_lens.models.encoder import EncoderModel
from consistency_lens.models.hub import card_metadata, resolve_lens
from consistency_lens.models.loading import LoadedModel, load_for_config, max_positions
from consistency_lens.models.orig import OriginalModelWrapper, load_8bit
from consistency_lens.models.projection import activation_norm, embedding_norm
from consistency_lens.utils.io import (
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    read_json,
    sha256_file,
)

FORMAT_VERSION = 1
CONFIG_FILE = "lens_config.json"
WEIGHTS_FILE = "lens.safetensors"
MEAN_FILE = "train_mean.safetensors"
"""The mean of A over the lens's training split: eval's mean-ablation baseline needs no dump then."""
CARD_FILE = "README.md"
# Top-level parameter names (inside `decoder.` / `encoder.`) that get the projection learning rate.
_CALIBRATION_TEXT = "The committee met on Tuesday to discuss the budget, the roads and the schools."
_HEAD_PARAMS = {"proj", "prompt_left", "prompt_right", "prompt", "slot"}


def _copy_model(model: nn.Module, keep_blocks: int | None, share_weights: bool) -> nn.Module:
    """Deep-copy `model`, keeping only its first `keep_blocks` blocks, optionally sharing weights.

    Sharing (for LoRA) maps every parameter and buffer to itself in the deepcopy memo, so the copy
    has its own module tree (where adapters can be injected) but no second copy of frozen weights.
    """
    blocks = find_parts(model).blocks
    memo: dict[int, object] = {}
    if keep_blocks is not None:
        # Blocks that will be dropped are not worth copying.
        memo.update({id(b): b for b in list(blocks)[keep_blocks:]})
    if share_weights:
        memo.update({id(t): t for t in itertools.chain(model.parameters(), model.buffers())})
    twin = copy.deepcopy(model, memo)
    if keep_blocks is not None:
        del find_parts(twin).blocks[keep_blocks:]
    return twin


def _add_lora(model: nn.Module, cfg: LensConfig) -> nn.Module:
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise LensError(
            "train.mode=lora needs peft; install it with `pip install consistency-lens[peft]`."
        ) from None
    lora = LoraConfig(
        r=cfg.train.lora_r,
        lora_alpha=cfg.train.lora_alpha,
        lora_dropout=cfg.train.lora_dropout,
        target_modules="all-linear",
        # GPT-2-style Conv1D layers store their weight transposed.
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),
    )
    model = inject_adapter_in_model(lora, model)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
        if "lora_" in name:
            # Adapter weights train in fp32 even on a bf16 base.
            param.data = param.data.float()
    return model


def card_text(meta: dict, extra: str = "", results: dict | None = None) -> str:
    """The model card `README.md` of a lens from its `lens_config.json` metadata, `extra` appended;
    its front matter carries the Hub's metadata, with `results` (an eval results file) as eval
    results."""
    lines = [
        card_metadata(meta, results),
        "# Consistency lens",
        "",
        f"A decoder/encoder pair that explains layer {meta['layer']} of `{meta['base_model']}` "
        f"(width {meta['d_model']}) in {meta['t_text']}-token texts.",
        "",
        f"- base model: `{meta['base_model']}` (fingerprint `{meta['fingerprint']}`)",
        f"- layer: {meta['layer']}, encoder layer: {meta['encoder_layer']}",
        f"- mode: `{meta['mode']}`; only trainable weights are in `{WEIGHTS_FILE}`",
        *(
            [f"- the mean of A over its training split (eval's mean baseline) is in `{MEAN_FILE}`"]
            if meta.get("train_mean_sha256")
            else []
        ),
        f"- decoder prompt: `{meta['prompt']}`",
        "",
        f'Load it with `ConsistencyLens.from_pretrained(path, model="{meta["base_model"]}")`, '
        "where path is this folder or its Hub repo id "
        "(or `consistency-lens eval/explain` with that `model`); the base model must have the "
        "recorded fingerprint, and its own code runs only if you pass trust_remote_code yourself.",
    ]
    text = "\n".join(lines) + "\n"
    return text + ("\n" + extra.strip() + "\n" if extra.strip() else "")


def _check_context(loaded: LoadedModel, cfg: LensConfig) -> None:
    """Refuse a decoder prompt plus `t_text` (or encoder prompt plus text) beyond M's context."""
    limit = max_positions(loaded.model)
    if limit is None:
        return
    train, tokenizer = cfg.train, loaded.tokenizer
    # The prompt's tokens (BOS included when the tokenizer adds one), the slot, the written text.
    decoder = len(tokenizer(train.prompt.replace(EMBED_SLOT, ""))["input_ids"]) + 1
    encoder = len(tokenizer(train.encoder_prompt)["input_ids"]) if train.encoder_prompt else 0
    for what, used in (("decoder prompt", decoder), ("encoder prompt", encoder)):
        if used + train.t_text > limit:
            raise LensError(
                f"train.t_text={train.t_text} plus the {what} ({used} tokens) needs "
                f"{used + train.t_text} positions but model '{cfg.model}' reads at most {limit}; "
                f"lower train.t_text or shorten the {what}."
            )


def _compile_blocks(models: list[nn.Module]) -> None:
    """Compile each block's `forward` with dynamic shapes; hooks stay outside the graph.

    Raises torch._dynamo's recompile limits for the whole process (they are global).
    """
    blocks = list({id(b): b for model in models for b in find_parts(model).blocks}.values())
    # All blocks share one code object, and dynamo keeps one cache entry per block and call kind
    # (D's prompt chunk and one-token steps, E, M's forwards where they share blocks, with and
    # without grad, a batch of one, the rows that keep attention's graph, `models/attention.py`):
    # at its default limit of 8 entries most blocks silently fell back to eager (BENCHMARKS.md,
    # "Training throughput"). Dynamic shapes keep D's growing kv cache from recompiling at every
    # generated token. The old names are the aliases every torch has.
    config = torch._dynamo.config
    config.cache_size_limit = max(config.cache_size_limit, 64 * len(blocks))
    config.accumulated_cache_size_limit = max(
        config.accumulated_cache_size_limit, 128 * len(blocks)
    )
    for block in blocks:
        block.forward = torch.compile(block.forward, dynamic=True)


class ConsistencyLens(nn.Module):
    """Frozen M (`orig`), decoder D and encoder E for one layer of one model."""

    def __init__(self, cfg: LensConfig, loaded: LoadedModel):
        super().__init__()
        self.cfg = cfg
        self.loaded = loaded
        self.layer = cfg.layer
        # The mean of A over the training split (d_model, float32, CPU), saved beside the weights
        # so eval's mean baseline is the training one on any corpus, without the training dump.
        self.train_mean: torch.Tensor | None = None
        train = cfg.train
        base = loaded.model
        parts = loaded.parts
        check_layer(parts, cfg.layer)
        enc_layer = cfg.layer if train.encoder_layer is None else train.encoder_layer
        check_layer(parts, enc_layer, "train.encoder_layer")
        split_prompt(train.prompt)
        _check_context(loaded, cfg)

        orig_model = None
        if cfg.distributed.orig_8bit:
            if train.mode == "frozen_base":
                raise LensError(
                    "distributed.orig_8bit=true needs train.mode full or lora, because "
                    "frozen_base shares M's weights with D and E."
                )
            orig_model = load_8bit(
                cfg.model, cfg.device, cfg.revision, cfg.trust_remote_code, cfg.attn_implementation
            )
        # `orig` is a plain attribute, not a submodule: M's weights never appear as lens parameters.
        self.orig = OriginalModelWrapper(loaded, cfg.layer, model=orig_model)

        if train.mode == "frozen_base":
            d_model, e_model = base, base
        elif train.mode == "full":
            # Trainable copies keep fp32 master weights; autocast decides the compute dtype.
            d_model = _copy_model(base, None, share_weights=False).float().requires_grad_(True)
            e_model = _copy_model(base, enc_layer + 1, share_weights=False).float()
            e_model.requires_grad_(False)
            e_parts = find_parts(e_model)
            e_parts.embed.requires_grad_(True)
            e_parts.blocks.requires_grad_(True)
        else:
            d_model = _add_lora(_copy_model(base, None, share_weights=True), cfg)
            e_model = _add_lora(_copy_model(base, enc_layer + 1, share_weights=True), cfg)

        # Projection scales come from activation norms on a short fixed text (docs/design.md section 4).
        text = _CALIBRATION_TEXT + " " + train.prompt.replace(EMBED_SLOT, "")
        ids = torch.tensor([loaded.tokenizer(text)["input_ids"]], device=parts.embed.weight.device)
        norm_l = activation_norm(base, parts.blocks[cfg.layer], ids)
        norm_e = activation_norm(base, parts.blocks[enc_layer], ids)
        if train.inject_layer is None:
            d_scale = embedding_norm(parts) / norm_l
        else:
            check_layer(parts, train.inject_layer, "train.inject_layer")
            d_scale = activation_norm(base, parts.blocks[train.inject_layer], ids) / norm_l
        self.decoder = DecoderModel(
            d_model,
            loaded.tokenizer,
            train.prompt,
            d_activation=parts.d_model,
            proj_scale=d_scale,
            gradient_checkpointing=train.gradient_checkpointing,
            inject_layer=train.inject_layer,
            rotate=train.decoder_rotate,
        )
        self.encoder = EncoderModel(
            e_model,
            loaded.tokenizer,
            enc_layer,
            d_activation=parts.d_model,
            proj_scale=norm_l / norm_e,
            prompt=train.encoder_prompt,
            gradient_checkpointing=train.gradient_checkpointing,
            rotate=train.encoder_rotate,
        )
        if train.compile:
            # M's blocks too (its prefix and patched passes), unless bitsandbytes quantised them.
            _compile_blocks([d_model, e_model] + ([] if orig_model else [self.orig.model]))
        self.train(False)

    @classmethod
    def build(cls, cfg: LensConfig, loaded: LoadedModel | None = None) -> ConsistencyLens:
        """A fresh lens for `cfg`, loading the base model unless `loaded` is given."""
        return cls(cfg, loaded or load_for_config(cfg))

    def train(self, mode: bool = True) -> ConsistencyLens:
        """Set the training flag only: the HF models stay in eval mode.

        M may share its modules with D and E (frozen_base), and dropout in M would make the KL
        target random; the plan has no dropout in D or E either.
        """
        self.training = mode
        return self

    @property
    def d_model(self) -> int:
        """Width of the activations this lens reads and rebuilds."""
        return self.orig.d_model

    @property
    def device(self) -> torch.device:
        """Device of the decoder's projection."""
        return self.decoder.proj.weight.device

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable parameters themselves (on their device), by name; never the frozen base."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def param_groups(self) -> list[dict]:
        """AdamW groups: projections and soft prompts at `train.lr`, blocks/LoRA at `train.lr_blocks`."""
        head, blocks = [], []
        for name, param in self.trainable_parameters().items():
            (head if name.split(".")[1] in _HEAD_PARAMS else blocks).append(param)
        train = self.cfg.train
        groups = [
            {"name": "proj", "params": head, "lr": train.lr, "weight_decay": train.weight_decay},
            {
                "name": "blocks",
                "params": blocks,
                "lr": train.lr_blocks,
                "weight_decay": train.weight_decay,
            },
        ]
        return [g for g in groups if g["params"]]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Detached CPU copies of the trainable weights only (never the frozen base)."""
        return {
            n: p.detach().cpu().clone().contiguous() for n, p in self.trainable_parameters().items()
        }

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load weights saved by `trainable_state_dict`; names and shapes must match exactly."""
        own = self.trainable_parameters()
        missing = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        if missing or extra:
            what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
            raise LensError(
                f"Lens weights do not fit this lens ({what}); they were saved for another "
                "mode, layer or model."
            )
        with torch.no_grad():
            for name, param in own.items():
                if state[name].shape != param.shape:
                    raise LensError(
                        f"Lens weight '{name}' has shape {tuple(state[name].shape)} but this lens "
                        f"needs {tuple(param.shape)}; it was saved for another model or width."
                    )
                param.copy_(state[name])

    @torch.no_grad()
    def explanation(
        self, activations: torch.Tensor, greedy: bool = True, temperature: float = 1.0
    ) -> torch.Tensor:
        """D's text ids (B, T_text) for A, as the lens shows them.

        The greedy explanation is the best of D's greedy and sampled texts (and the text begun
        with M's prediction from A) when `decode.samples` or `decode.prediction` is set
        (`models/decoding.py`); a sampled one (`greedy=False`) is always D's own draw."""
        decode = self.cfg.decode.filled()
        if greedy and (decode.samples or decode.prediction):
            return best_of_samples(self, activations, decode)
        return self.decoder.generate(
            activations, self.cfg.train.t_text, greedy=greedy, temperature=temperature
        )

    @torch.no_grad()
    def reconstruct(
        self, activations: torch.Tensor, greedy: bool = True, temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Direct reconstruction: the explanation's ids (B, T_text) for A (`explanation`) and E's
        Â (B, d) from that text."""
        ids = self.explanation(activations, greedy, temperature)
        return ids, self.encoder.encode_ids(ids)

    @torch.no_grad()
    def encode_ids(
        self,
        ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        rotate: int | None = None,
    ) -> torch.Tensor:
        """E's Â (B, d) for given (left-padded when masked) token ids (`rotate`: as E's own)."""
        return self.encoder.encode_ids(ids, attention_mask, rotate)

    def _metadata(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "base_model": self.loaded.name,
            "fingerprint": self.loaded.fingerprint,
            "layer": self.layer,
            "encoder_layer": self.encoder.layer,
            "d_model": self.d_model,
            "mode": self.cfg.train.mode,
            "prompt": self.cfg.train.prompt,
            "t_text": self.cfg.train.t_text,
            "config": saved_lens_config(self.cfg),
        }

    def save_pretrained(self, path: str | Path, card: str = "") -> None:
        """Write `lens_config.json`, `lens.safetensors` (trainable weights), `README.md` and, when
        the lens has one, its training mean `train_mean.safetensors`."""
        path = Path(path)
        state = self.trainable_state_dict()
        atomic_write(path / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp)))
        sums = {"weights_sha256": sha256_file(path / WEIGHTS_FILE)}
        if self.train_mean is not None:
            mean = {"mean": self.train_mean.detach().float().cpu().contiguous()}
            atomic_write(path / MEAN_FILE, lambda tmp: save_file(mean, str(tmp)))
            sums["train_mean_sha256"] = sha256_file(path / MEAN_FILE)
        else:
            (path / MEAN_FILE).unlink(missing_ok=True)
        # The config is written last and names the checksums: a lens is complete only then.
        meta = {**self._metadata(), **sums}
        atomic_write_json(path / CONFIG_FILE, meta)
        atomic_write_text(path / CARD_FILE, card_text(meta, card))

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | None = None,
        *,
        revision: str | None = None,
        loaded: LoadedModel | None = None,
        layer: int | None = None,
        model: str | None = None,
        trust_remote_code: bool = False,
    ) -> ConsistencyLens:
        """Load a saved lens; refuse a base model, layer or width that differs from the recorded one.

        `model` and `trust_remote_code` are the caller's (the user's config): a lens directory is
        data someone may hand you, so it never decides to run a model's own code, and its recorded
        base model is only compared with `model`, never loaded in its place. Without `model` the
        recorded base model is loaded, still with the caller's `trust_remote_code`. Without
        `device` it loads on CUDA when present, else on the CPU (never the recorded device).

        `path` is a lens folder or a Hub repo id (`org/name`, at `revision`): only the lens's own
        files are fetched, through the Hub cache, and then read exactly as a folder is.
        """
        path = resolve_lens(path, revision)
        meta = _read_lens_config(path)
        recorded = meta["base_model"]
        if meta["config"].get("trust_remote_code") is True and not trust_remote_code:
            raise LensError(
                f"The lens at '{path}' was trained on '{recorded}' with trust_remote_code=true, "
                "which runs that model's own Python code; set trust_remote_code=true in your "
                "config only if you trust the model's authors."
            )
        if model is not None and loaded is None and model != recorded:
            raise LensError(
                f"The lens at '{path}' was trained on base model '{recorded}' but the config names "
                f"model '{model}'; set model={recorded} (if you trust that model) or use a lens "
                f"trained on '{model}'."
            )
        _check_weights(path, meta)
        cfg = saved_config(path, meta)
        # The caller's choices, never the file's: what to load and whether its code may run.
        # The device too: a lens trained on a GPU loads on a CPU-only machine (`auto`).
        update = {"model": model or recorded, "trust_remote_code": trust_remote_code}
        cfg = cfg.model_copy(update={**update, "device": device or "auto"})
        if layer is not None and layer != meta["layer"]:
            raise LensError(
                f"The lens at '{path}' was trained for layer {meta['layer']}, not layer {layer}."
            )
        loaded = loaded or load_for_config(cfg)
        _check_fits(path, meta, loaded, cfg.layer)
        state = _load_weights(path)
        lens = cls(cfg, loaded)
        lens.load_trainable_state_dict({k: v.to(lens.device) for k, v in state.items()})
        lens.train_mean = _load_mean(path, meta)
        return lens

    def init_from(self, path: str | Path) -> None:
        """Start from the trainable weights of the saved lens at `path` (e.g. a warm start).

        The lens there must be of this base model, layer and width; its weights must fit this
        lens's mode and decoder exactly. Only its weights are read, never its settings.
        """
        path = Path(path)
        meta = _read_lens_config(path)
        _check_weights(path, meta)
        _check_fits(path, meta, self.loaded, self.layer)
        _check_same_weights(path, meta["config"], dump_config(self.cfg))
        state = _load_weights(path)
        self.load_trainable_state_dict({k: v.to(self.device) for k, v in state.items()})


def check_lens_dir(path: Path) -> dict:
    """The `lens_config.json` of a complete, unaltered saved lens at `path` (else one sentence)."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise LensError(
            f"No saved lens at '{path}' ({CONFIG_FILE} missing); pass the folder that "
            "`consistency-lens train` wrote (`<run_dir>/lens`)."
        )
    meta = _read_lens_config(path)
    _check_weights(path, meta)
    return meta


def _check_weights(path: Path, meta: dict) -> None:
    """Refuse missing weights, or weights whose checksum is not the one the lens config names."""
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise LensError(f"Lens weights '{weights}' do not exist.")
    if sha256_file(weights) != meta.get("weights_sha256"):
        raise LensError(
            f"Lens weights '{weights}' are corrupt (checksum mismatch); save the lens again."
        )
    named = meta.get("train_mean_sha256")
    if named is not None and (
        not (path / MEAN_FILE).is_file() or sha256_file(path / MEAN_FILE) != named
    ):
        raise LensError(
            f"Training mean '{path / MEAN_FILE}' is missing or corrupt (checksum mismatch); "
            "save the lens again."
        )


def _check_fits(path: Path, meta: dict, loaded: LoadedModel, layer: int) -> None:
    """Refuse a lens recorded for another base model (fingerprint), width or layer."""
    if loaded.fingerprint != meta["fingerprint"]:
        raise LensError(
            f"The lens at '{path}' was trained on base model '{meta['base_model']}' with "
            f"fingerprint {meta['fingerprint']}, but the loaded model '{loaded.name}' has "
            f"{loaded.fingerprint}."
        )
    if loaded.parts.d_model != meta["d_model"] or layer != meta["layer"]:
        raise LensError(
            f"The lens at '{path}' expects width {meta['d_model']} at layer {meta['layer']}, "
            f"but the base model has width {loaded.parts.d_model} (config layer {layer})."
        )


def _check_same_weights(path: Path, saved: dict, own: dict) -> None:
    """Refuse a lens whose weight-defining settings differ from this lens's (the base model is
    compared by fingerprint, not by name; the text's length may differ, `CURRICULUM_KEYS`)."""
    theirs, ours = weight_settings(saved), weight_settings(own)
    for key in WEIGHT_KEYS:
        if key not in (*MODEL_KEYS, *CURRICULUM_KEYS) and theirs[key] != ours[key]:
            raise LensError(
                f"The lens at '{path}' was trained with {key}={theirs[key]!r} but this lens has "
                f"{key}={ours[key]!r}; start from a lens trained with the same {key}."
            )


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The trainable weights of a lens directory, through safetensors only."""
    weights = path / WEIGHTS_FILE
    try:
        return load_file(str(weights))
    except FileNotFoundError:
        raise LensError(f"Lens weights '{weights}' do not exist.") from None
    except (SafetensorError, OSError, ValueError):
        raise LensError(f"Lens weights '{weights}' are corrupt; save the lens again.") from None


def _load_mean(path: Path, meta: dict) -> torch.Tensor | None:
    """The training mean a lens directory carries (checksum already checked), or None."""
    if meta.get("train_mean_sha256") is None:
        return None
    file = path / MEAN_FILE
    try:
        mean = load_file(str(file)).get("mean")
    except (FileNotFoundError, SafetensorError, OSError, ValueError):
        mean = None
    if mean is None or not mean.is_floating_point() or tuple(mean.shape) != (meta["d_model"],):
        raise LensError(
            f"Training mean '{file}' is not one float vector of width {meta['d_model']}; "
            "save the lens again."
        )
    return mean.float()


# Keys of `lens_config.json` that loading reads, with their JSON types.
_LENS_CONFIG_KEYS = {
    "format_version": int,
    "base_model": str,
    "fingerprint": str,
    "layer": int,
    "d_model": int,
    "weights_sha256": str,
    "config": dict,
}


def saved_config(path: Path, meta: dict) -> LensConfig:
    """The config saved in the `lens_config.json` (read as `meta`) of the lens at `path`; one
    sentence where it does not validate."""
    try:
        return config_from_dict(meta["config"])
    except (LensError, KeyError, TypeError) as err:
        # A key this version lacks is as likely a newer package's as damage: name both.
        detail = f": {err}" if isinstance(err, LensError) else "; save the lens again."
        raise LensError(
            f"Lens config '{path / CONFIG_FILE}' is damaged or was saved by a newer "
            f"consistency-lens (upgrade to read it){detail}"
        ) from None


def _read_lens_config(path: Path) -> dict:
    """`lens_config.json` of a lens directory, with every key loading reads present and typed."""
    file = path / CONFIG_FILE
    meta = read_json(file, "Lens config")
    if meta.get("format_version") != FORMAT_VERSION:
        raise LensError(
            f"Lens config '{file}' has format version {meta.get('format_version')!r}, but this "
            f"version reads {FORMAT_VERSION}; use the matching consistency-lens version."
        )
    for key, kind in _LENS_CONFIG_KEYS.items():
        value = meta.get(key)
        # bool is an int subclass, but never a valid layer, width or version.
        if not isinstance(value, kind) or isinstance(value, bool):
            got = "missing" if key not in meta else f"a {type(value).__name__}"
            raise LensError(
                f"Lens config '{file}' key '{key}' must be a {kind.__name__} but is {got}; "
                "the lens directory is damaged, save the lens again."
            )
    return meta
