"""Warm-start and GRPO objectives: hand-computed advantages and losses, KL to the reference, learning."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import no_host_reads, record_sdpa, tiny_dump_config
from safetensors.torch import load_file

from consistency_lens.config import (
    LensConfig,
    ScheduleConfig,
    config_from_dict,
    dump_config,
    load_config,
    migrate_saved,
    setting,
)
from consistency_lens.data.collate import CollateFn
from consistency_lens.data.dump import dump_activations
from consistency_lens.errors import LensError
from consistency_lens.models.hooks import replace_at
from consistency_lens.models.lens import ConsistencyLens
from consistency_lens.models.orig import OriginalModelWrapper
from consistency_lens.models.patching import token_nll
from consistency_lens.training import trainer
from consistency_lens.training.objectives import (
    build_objective,
    normalised_mse,
    objective_class,
    step_info,
)
from consistency_lens.training.objectives.grpo import (
    distinct_fraction,
    group_advantages,
    policy_gradient_loss,
    reference_kl,
    swapped,
)
from consistency_lens.training.objectives.warm_start import (
    context_targets,
    predict_targets,
    supervised_losses,
)
from consistency_lens.utils.logging import METRICS, MetricsFile
from consistency_lens.utils.words import (
    content_word_ids,
    content_words,
    first_content_token,
    names_prediction,
)


def _lens(model_dir, **train) -> ConsistencyLens:
    cfg = LensConfig(
        model=str(model_dir),
        device="cpu",
        model_dtype="float32",
        layer=1,
        seed=0,
        train={"t_text": 3, "prompt": "the nation <embed> law", "mse_weight": 1.0, **train},
    )
    torch.manual_seed(0)
    return ConsistencyLens.build(cfg)


def _batch(lens, n=4, seed=0, next_tokens=0):
    gen = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        ids = torch.randint(1, 320, (6 + i,), generator=gen)
        act = lens.orig.activations(ids[None], torch.ones_like(ids[None]))[0]
        items.append({"input_ids_A": ids, "A": act, "input_ids_A_prime": ids, "A_prime": act})
        if next_tokens:
            # Row 0 ends one token sooner: the batch's next tokens are right-padded.
            size = next_tokens - 1 if i == 0 and next_tokens > 1 else next_tokens
            items[-1]["input_ids_next"] = torch.randint(1, 320, (size,), generator=gen)
    return CollateFn(pad_id=0)(items)


def test_group_advantages_match_hand_computation():
    rewards = torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])
    # Leave-one-out: r_i - mean of the other two.
    expected = torch.tensor([[1 - 4.0, 2 - 3.5, 6 - 1.5], [0 - 1.5, 0 - 1.5, 3 - 0.0]])
    torch.testing.assert_close(group_advantages(rewards, std_norm=False), expected)
    std = torch.tensor([[(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2) ** 0.5], [3**0.5]])
    torch.testing.assert_close(group_advantages(rewards, std_norm=True), expected / (std + 1e-6))
    with pytest.raises(LensError, match="at least 2"):
        group_advantages(rewards[:, :1], std_norm=False)


def test_distinct_fraction_counts_distinct_texts_per_group():
    # Group 0: texts a, b, a, a -> 2 distinct; group 1: c, d, e, d -> 3 distinct; 5 of 8.
    a, b, c, d, e = ([1, 2], [2, 1], [3, 3], [3, 4], [4, 3])
    groups = torch.tensor([[a, b, a, a], [c, d, e, d]])
    assert distinct_fraction(groups).item() == 5 / 8
    assert distinct_fraction(torch.tensor([[a, a]])).item() == 1 / 2


def test_policy_gradient_loss_and_logprobs_match_hand_computation():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))  # (1, 2, 3)
    ids = torch.tensor([[0, 1]])
    lp = -token_nll(logits, ids)  # what grpo uses as log pi(text) per token
    torch.testing.assert_close(lp, torch.log(torch.tensor([0.5 * 0.8])) / 2)
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, -4.0]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0], [2.0, 0.5]])
    loss = policy_gradient_loss(logprobs, adv)
    assert float(loss.detach()) == pytest.approx(
        -(1 * -1.0 + -1 * -2.0 + 2 * -0.5 + 0.5 * -4.0) / 4
    )
    loss.backward()
    torch.testing.assert_close(logprobs.grad, -adv / 4)


def test_reference_kl_is_zero_for_equal_logits_and_positive_otherwise():
    logits = torch.randn(3, 4, 7, generator=torch.Generator().manual_seed(0))
    assert float(reference_kl(logits, logits)) == 0.0
    p, q = torch.tensor([[[0.0, 0.0]]]), torch.log(torch.tensor([[[0.25, 0.75]]]))
    expected = 0.5 * torch.log(torch.tensor(0.5 / 0.25)) + 0.5 * torch.log(torch.tensor(0.5 / 0.75))
    torch.testing.assert_close(reference_kl(p, q), expected)


def test_context_targets_are_the_tokens_ending_at_p_without_padding():
    lens_free = CollateFn(pad_id=0)
    items = [
        {"input_ids_A": torch.tensor([5, 6, 7, 8]), "A": torch.zeros(2)},
        {"input_ids_A": torch.tensor([9, 3]), "A": torch.zeros(2)},
    ]
    for it in items:
        it.update(input_ids_A_prime=it["input_ids_A"], A_prime=it["A"])
    batch = lens_free(items)
    assert context_targets(batch, 3).tolist() == [[6, 7, 8], [9, 9, 3]]
    assert context_targets(batch, 6).tolist() == [[5, 5, 5, 6, 7, 8], [9, 9, 9, 9, 9, 3]]


@pytest.mark.parametrize("inject_layer", [None, 0])
def test_warm_start_loss_falls_on_a_fixed_batch(tiny_llama_dir, inject_layer):
    lens = _lens(tiny_llama_dir, objective="warm_start", inject_layer=inject_layer, lr=0.05)
    obj = build_objective(lens, lens.cfg)
    batch = _batch(lens)
    opt = torch.optim.Adam(lens.param_groups())
    info = step_info(type(obj), lens.cfg, 0)
    terms = []
    for _ in range(30):
        out = obj(lens, batch, info)
        assert set(out.terms) == {"ce_d", "mse_e", "kl_e"}
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        terms.append({k: float(v) for k, v in out.terms.items()})
    # A random tiny model's logits are nearly flat, so D's CE can only fall so far; E's error
    # from the true text falls several-fold.
    assert terms[-1]["ce_d"] < terms[0]["ce_d"] - 0.3, terms
    assert terms[-1]["mse_e"] < 0.3 * terms[0]["mse_e"], terms
    # The CE term is D's cross-entropy on exactly the context tokens ending at P.
    targets = context_targets(batch, 3)
    logits = lens.decoder.teacher_forced_logits(batch.A, targets)
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(obj(lens, batch, info).terms["ce_d"], ce)


def test_grpo_reference_kl_is_zero_at_start_and_training_moves_d(tiny_llama_dir):
    lens = _lens(tiny_llama_dir, objective="grpo", rl={"samples": 3}, lr=0.05)
    obj = build_objective(lens, lens.cfg)
    batch = _batch(lens)
    info = step_info(type(obj), lens.cfg, 0)
    torch.manual_seed(1)
    out = obj(lens, batch, info)
    assert float(out.terms["kl_ref"]) == 0.0  # D equals its reference
    assert float(out.terms["reward"]) <= 0.0
    before = {n: p.detach().clone() for n, p in lens.decoder.named_parameters() if p.requires_grad}
    opt = torch.optim.Adam(lens.param_groups())
    opt.zero_grad()
    out.loss.backward()
    assert lens.decoder.proj.weight.grad.abs().sum() > 0  # the policy gradient reaches D
    assert lens.encoder.proj.weight.grad.abs().sum() > 0  # E learns by regression
    opt.step()
    torch.manual_seed(1)
    after = obj(lens, batch, info)
    assert float(after.terms["kl_ref"]) > 0.0  # D moved, the reference did not
    for name, value in obj.reference.items():
        assert torch.equal(value, before[name])


def test_swapped_weights_are_the_ones_used_under_bf16_autocast():
    """Autocast caches each parameter's bf16 copy by identity, which a swap of `.data` keeps;
    the swap must still run on the swapped-in weights, and on the own ones afterwards."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    other = {n: torch.randn_like(p) for n, p in lin.named_parameters()}
    x = torch.randn(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        own = lin(x)  # fills the cache with the own weights' bf16 copies
        with swapped(dict(lin.named_parameters()), other):
            inside = lin(x)
        after = lin(x)
        expected = F.linear(x, other["weight"], other["bias"])
    assert torch.equal(inside, expected) and not torch.equal(inside, own)
    assert torch.equal(after, own)


def test_grpo_reference_kl_under_bf16_autocast_is_d_against_its_reference(tiny_llama_dir):
    """Under bf16 autocast (`train.precision: bf16`, the GPU default) the reference KL of a D
    that moved is the KL to the frozen reference, not D against itself (it read exactly 0)."""
    lens = _lens(tiny_llama_dir, objective="grpo", rl={"samples": 3}, mode="lora")
    obj = build_objective(lens, lens.cfg)
    with torch.no_grad():  # move only weights that autocast casts (and caches): the LoRA matrices
        for name, p in lens.decoder.named_parameters():
            if "lora_" in name:
                p.add_(0.5 * torch.randn_like(p))
    info = step_info(type(obj), lens.cfg, 0)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = obj(lens, _batch(lens), info)
    assert float(out.terms["kl_ref"]) > 0.01


@pytest.fixture(scope="module")
def dumped(tmp_path_factory, tiny_llama_dir, corpus_dir) -> dict:
    """A tiny train/val dump (format 2: with the tokens after P) of the tiny Llama."""
    base = tiny_dump_config(tmp_path_factory.mktemp("dump"), tiny_llama_dir, corpus_dir)
    base["train"] = {"t_text": 2}
    dump_activations(config_from_dict(base))
    return base


def _overrides(base: dict, run_dir: Path, objective: str, steps: int, **extra) -> list[str]:
    train = {
        "run_dir": run_dir,
        "objective": objective,
        "inject_layer": 0,
        "t_text": 2,
        "steps": steps,
        "batch_size": 4,
        "val_every": 1,
        "val_batches": 1,
        "ckpt_every": 1,
        "log_every": 1,
        "lr_schedule.kind": "constant",
        "lr_schedule.warmup_steps": 0,
        "rl.samples": 2,
        "prompt": '"A <embed> is"',
        **extra,
    }
    top = [f"{k}={v}" for k, v in base.items() if k != "train"]
    return top + [f"train.{k}={v}" for k, v in train.items()]


def _train_cli(args: list[str]) -> None:
    # The subprocess runs with this process's thread count: a bit-identical resume is compared
    # with an in-process run, and kernels order their sums by the number of threads.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    done = subprocess.run(
        [sys.executable, "-m", "consistency_lens", "train", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def _lens_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "lens" / "lens.safetensors"))


@pytest.mark.parametrize("objective", ["warm_start_next", "grpo"])
def test_objective_trains_through_the_cli_and_resumes_bit_identically(dumped, tmp_path, objective):
    extra: dict = {}
    if objective == "grpo":
        # RL continues from a warm start, as the demo does.
        warm = tmp_path / "warm"
        trainer.train(load_config(None, _overrides(dumped, warm, "warm_start", 2)))
        extra["init_from"] = warm / "lens"
    straight = tmp_path / "straight"
    trainer.train(load_config(None, _overrides(dumped, straight, objective, 3, **extra)))
    resumed = tmp_path / "resumed"
    _train_cli(_overrides(dumped, resumed, objective, 2, **extra))
    _train_cli([*_overrides(dumped, resumed, objective, 3, **extra), "--resume"])
    a, b = _lens_weights(straight), _lens_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = [r for r in MetricsFile(resumed / METRICS).read() if r["kind"] == "train"]
    assert set(objective_class(objective).terms) <= set(records[-1])


def test_init_from_starts_from_the_saved_weights_and_refuses_another_shape(dumped, tmp_path):
    warm = tmp_path / "warm"
    trainer.train(load_config(None, _overrides(dumped, warm, "warm_start", 1)))
    cfg = load_config(
        None, _overrides(dumped, tmp_path / "next", "grpo", 1, init_from=warm / "lens")
    )
    lens = ConsistencyLens.build(cfg)
    lens.init_from(warm / "lens")
    saved = _lens_weights(warm)
    assert all(torch.equal(lens.trainable_state_dict()[k], v) for k, v in saved.items())
    # A longer text from the same weights is a curriculum: allowed, the weights load exactly.
    longer = load_config(
        None, _overrides(dumped, tmp_path / "long", "grpo", 1, init_from=warm / "lens", t_text=3)
    )
    assert longer.train.t_text != cfg.train.t_text
    grown = ConsistencyLens.build(longer)
    grown.init_from(warm / "lens")
    assert all(torch.equal(grown.trainable_state_dict()[k], v) for k, v in saved.items())
    # A lens whose decoder reads A another way has other weights: refused in one sentence.
    other = load_config(None, _overrides(dumped, tmp_path / "o", "plan", 1, inject_layer="null"))
    with pytest.raises(
        LensError, match="train.inject_layer=0 but this lens has train.inject_layer=None"
    ):
        ConsistencyLens.build(other).init_from(warm / "lens")


def test_train_runs_the_warm_start_first_then_reuses_it(dumped, tmp_path):
    run_dir = tmp_path / "run"
    args = _overrides(dumped, run_dir, "grpo", 2, **{"warm_start.steps": 2})
    result = trainer.train(load_config(None, args))
    warm = run_dir / trainer.WARM_START_DIR
    assert result.steps == 2 and (warm / "lens" / "lens.safetensors").is_file()
    records = [r for r in MetricsFile(warm / METRICS).read() if r["kind"] == "train"]
    assert [r["step"] for r in records] == [1, 2] and "ce_d" in records[-1]
    # The warm start runs at its own constant alpha (0: M's patched forward skipped).
    assert all(r["alpha"] == 0.0 and r["kl_e"] == 0.0 for r in records)
    # The main run started from the warm lens: its recorded config says so.
    meta = json.loads((run_dir / "lens" / "lens_config.json").read_text())
    assert meta["config"]["train"]["init_from"] == str(warm / "lens")
    # Both lenses carry the mean of A over the dump's train split, exactly.
    train_set, _ = trainer.load_splits(load_config(None, args))
    for lens_dir in (warm / "lens", run_dir / "lens"):
        mean = load_file(str(lens_dir / "train_mean.safetensors"))["mean"]
        assert torch.equal(mean, train_set.mean_activation())
    # A finished warm start is reused as it is ...
    before = (warm / "lens" / "lens.safetensors").read_bytes()
    trainer.train(load_config(None, args), resume=True)
    assert (warm / "lens" / "lens.safetensors").read_bytes() == before
    # ... but never one trained with other settings.
    other = _overrides(dumped, run_dir, "grpo", 3, **{"warm_start.steps": 2, "lr": 0.5})
    with pytest.raises(LensError, match="warm start trained with other settings"):
        trainer.train(load_config(None, other), resume=True)
    both = _overrides(dumped, tmp_path / "b", "grpo", 1, init_from=warm / "lens")
    with pytest.raises(LensError, match="set one of them"):
        trainer.train(load_config(None, [*both, "train.warm_start.steps=1"]))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_warm_start_predict_targets_end_with_m_s_greedy_continuation(tiny_llama_dir, k):
    """The target is the context ending at P, then M's argmax continuation computed directly
    (each row unpadded, one token at a time, M's full forward), equal token for token."""
    lens = _lens(tiny_llama_dir, objective="warm_start_predict", predict={"tokens": k})
    batch = _batch(lens, n=4)  # rows of 6..9 tokens: left padding on all but the longest
    targets = predict_targets(lens, batch, 3, k)
    assert targets.shape == (4, 3)
    # The first 3 - k tokens are the context tokens ending at P (the last 3 - k of them).
    if k < 3:
        assert torch.equal(targets[:, : 3 - k], context_targets(batch, 3 - k))
    for row in range(4):
        ids = batch.input_ids_A[row][batch.attention_mask_A[row].bool()].unsqueeze(0)
        for _ in range(k):
            ids = torch.cat([ids, lens.orig.token_logits(ids)[:, -1].argmax(-1, keepdim=True)], 1)
        assert targets[row, 3 - k :].tolist() == ids[0, -k:].tolist()
    obj = build_objective(lens, lens.cfg)
    ids, mask = obj.targets(lens, batch)
    assert mask is None and torch.equal(ids, targets)


def test_first_content_token_picks_m_s_best_ranked_content_word():
    """Among M's top-5, the highest-ranked token whose word is a content word; the top-1 when none
    of the five is (ids 0-9; 2, 5 and 7 carry content words)."""
    word_ids = torch.tensor([-1, -1, 0, -1, -1, 1, -1, 2, -1, -1])
    logits = torch.tensor(
        [
            [9.0, 8, 1, 7, 6, 5, 0, 0, 0, 0],  # top-5 0,1,3,4,5: 5 is the first content word
            [0.0, 0, 9, 0, 0, 8, 0, 0, 0, 0],  # the top-1 (2) is a content word itself
            [9.0, 8, 7, 6, 5, 1, 1, 1, 1, 1],  # 2 is third: it wins over 0 and 1
            [9.0, 8, 0, 7, 6, 0, 5, 0, 1, 1],  # no content word in 0,1,3,4,6: the top-1
            [1.0, 1, 1, 1, 1, 1, 1, 9, 1, 1],  # 7 first
        ]
    )
    assert first_content_token(word_ids)(logits).tolist() == [5, 2, 2, 0, 7]


@pytest.mark.parametrize("order", ["context_first", "prediction_first"])
@pytest.mark.parametrize("k", [1, 2])
def test_warm_start_predict_first_content_names_a_content_word(tiny_llama_dir, k, order):
    """With `train.predict.first=content` the first predicted token is the pick on M's logits at P
    (each row unpadded), the later ones M's greedy tokens after it; the context tokens ending at P
    fill the rest of the text, before M's tokens or, with `prediction_first`, after them."""
    predict = {"tokens": k, "first": "content", "order": order}
    lens = _lens(tiny_llama_dir, objective="warm_start_predict", predict=predict)
    batch = _batch(lens, n=4)
    obj = build_objective(lens, lens.cfg)
    ids, mask = obj.targets(lens, batch)
    assert mask is None and ids.shape == (4, 3)
    if order == "prediction_first":
        ids = torch.cat([ids[:, k:], ids[:, :k]], 1)  # back to context, then M's tokens
    assert torch.equal(ids[:, : 3 - k], context_targets(batch, 3 - k))
    pick = first_content_token(lens.orig.content_word_ids())
    moved = 0  # rows whose pick is not M's top-1: the choice is exercised, not only the argmax
    for row in range(4):
        text = batch.input_ids_A[row][batch.attention_mask_A[row].bool()].unsqueeze(0)
        for i in range(k):
            logits = lens.orig.token_logits(text)[:, -1]
            token = (pick(logits) if i == 0 else logits.argmax(-1)).unsqueeze(-1)
            moved += i == 0 and int(token) != int(logits.argmax())
            text = torch.cat([text, token], 1)
        assert ids[row, 3 - k :].tolist() == text[0, -k:].tolist()
    assert moved > 0


def test_warm_start_predict_tokens_must_fit_in_the_text():
    """train.predict.tokens is 1..t_text where warm_start_predict is used (as the warm start's
    objective or the main one); a short t_text stays valid for the others."""
    # One sentence: the section is named, not echoed back whole.
    fit = (
        r"^Config key 'train': train.predict.tokens must be between 1 and train.t_text \(3\), "
        r"got 4; set train.predict.tokens within that range or raise train.t_text\.$"
    )
    for train in (
        {"warm_start": {"objective": "warm_start_predict"}, "predict": {"tokens": 4}},
        {"objective": "warm_start_predict", "predict": {"tokens": 4}},
    ):
        with pytest.raises(LensError, match=fit):
            config_from_dict({"train": {"t_text": 3, **train}})
    with pytest.raises(LensError, match=r"'train.predict.tokens': Input should be greater than"):
        config_from_dict({"train": {"predict": {"tokens": 0}}})
    # Unused: a t_text below the tokens is fine, the default 2 or an explicit 4.
    assert config_from_dict({"train": {"t_text": 1}}).train.predict.tokens == 2
    cfg = config_from_dict({"train": {"t_text": 3, "objective": "grpo", "predict": {"tokens": 4}}})
    assert cfg.train.predict.tokens == 4
    cfg = config_from_dict(
        {
            "train": {
                "t_text": 3,
                "warm_start": {"objective": "warm_start_predict"},
                "predict": {"tokens": 3},
            }
        }
    )
    assert cfg.train.predict.tokens == 3


def test_the_objective_refuses_tokens_that_do_not_fit_in_a_config_built_unvalidated(
    tiny_llama_dir,
):
    """A warm start's config is made by `model_copy`, which skips TrainConfig's check: the
    objective runs the same check itself, with the same sentence."""
    lens = _lens(tiny_llama_dir, objective="warm_start_predict")  # t_text 3, tokens 2
    short = lens.cfg.model_copy(update={"train": lens.cfg.train.model_copy(update={"t_text": 1})})
    with pytest.raises(
        LensError,
        match=r"^train.predict.tokens must be between 1 and train.t_text \(1\), got 2; set "
        r"train.predict.tokens within that range or raise train.t_text\.$",
    ):
        build_objective(lens, short)


@pytest.fixture(scope="module")
def predicted_dump(tmp_path_factory, tiny_llama_dir, corpus_dir) -> dict:
    """A tiny dump of a config whose warm start runs `warm_start_predict` (M's 2 tokens after P,
    the first a content word): its shards store that continuation."""
    base = tiny_dump_config(tmp_path_factory.mktemp("predicted"), tiny_llama_dir, corpus_dir)
    base["train"] = {
        "t_text": 3,
        "warm_start": {"steps": 1, "objective": "warm_start_predict"},
        "predict": {"tokens": 2, "first": "content"},
    }
    dump_activations(config_from_dict(base))
    return base


def _predict_args(base: dict, run_dir: Path, steps: int = 1, **predict) -> list[str]:
    """`_overrides` of a `warm_start_predict` run on `base`'s dump (by default the settings
    `predicted_dump` stores)."""
    predict = {"tokens": 2, "first": "content", **predict}
    extra = {f"predict.{key}": value for key, value in predict.items()}
    return _overrides(base, run_dir, "warm_start_predict", steps, t_text=3, **extra)


def _predict_run(base: dict, run_dir: Path, **predict) -> trainer._Run:
    cfg = load_config(None, _predict_args(base, run_dir, **predict))
    return trainer._build_run(cfg, *trainer.load_splits(cfg))


def _counting(run: trainer._Run, monkeypatch) -> list[int]:
    """Count the calls of M's continuation (the live targets) of `run`'s lens."""
    calls: list[int] = []
    live = run.lens.orig.greedy_continuation

    def counted(*args, **kwargs):
        calls.append(1)
        return live(*args, **kwargs)

    monkeypatch.setattr(run.lens.orig, "greedy_continuation", counted)
    return calls


def test_warm_start_predict_reads_the_dump_s_continuation_only_where_its_header_matches(
    predicted_dump, dumped, tmp_path, monkeypatch
):
    """The train split gives the stored continuation to a run with the settings it was dumped
    with, and M never runs for the targets (the val split stores none); another `tokens` or
    `first`, a content-word rule of another version (its digest in the header) or a dump without
    one: none, targets computed live."""
    run = _predict_run(predicted_dump, tmp_path / "same")
    assert run.stream.dataset.reads_predictions and not run.val_set.reads_predictions
    calls = _counting(run, monkeypatch)
    batch = run.stream.next(run.state)
    ids, mask = run.objective.targets(run.lens, batch)
    assert batch.predicted_ids.shape == (4, 2) and calls == []
    assert torch.equal(
        ids[:, 1:], batch.predicted_ids
    )  # context_first: the context token, then M's
    val = CollateFn(0)([run.val_set[i] for i in range(4)])
    assert val.predicted_ids is None
    # A content-word rule of another version (its digest), and an M in another dtype.
    other_rule, other_m = tmp_path / "acts", tmp_path / "acts_bf16"
    for copy, key, value in (
        (other_rule, "content_words_sha256", "0" * 64),
        (other_m, "m_dtype", "bfloat16"),
    ):
        shutil.copytree(predicted_dump["output_dir"], copy)
        for meta_path in copy.rglob("metadata.json"):
            meta = json.loads(meta_path.read_text())
            if "predicted" in meta:  # not the val split, which stores none
                meta["predicted"][key] = value
                meta_path.write_text(json.dumps(meta))
    cases = [
        (predicted_dump, {"tokens": 1}),
        (predicted_dump, {"first": "greedy"}),
        ({**predicted_dump, "output_dir": str(other_rule)}, {}),
        ({**predicted_dump, "output_dir": str(other_m)}, {}),
        (dumped, {}),  # a dump without a continuation
    ]
    for n, (base, predict) in enumerate(cases):
        run = _predict_run(base, tmp_path / f"other{n}", **predict)
        assert not run.stream.dataset.reads_predictions and not run.val_set.reads_predictions
        calls = _counting(run, monkeypatch)
        batch = run.stream.next(run.state)
        run.objective.targets(run.lens, batch)
        assert batch.predicted_ids is None and calls == [1]


def test_warm_start_predict_loss_on_stored_targets_equals_the_live_one(predicted_dump, tmp_path):
    """One batch's loss and terms on the dump's continuation equal those on M's, computed live."""
    run = _predict_run(predicted_dump, tmp_path / "run")
    batch = run.stream.next(run.state)
    info = step_info(type(run.objective), run.cfg, 0)
    stored = run.objective(run.lens, batch, info)
    live = run.objective(run.lens, dataclasses.replace(batch, predicted_ids=None), info)
    assert batch.predicted_ids is not None and torch.equal(stored.loss, live.loss)
    assert stored.terms.keys() == live.terms.keys()
    assert all(torch.equal(stored.terms[k], live.terms[k]) for k in stored.terms)


def test_a_warm_start_on_a_dump_with_its_continuation_never_runs_m_for_it(
    predicted_dump, tmp_path, monkeypatch
):
    """`train` with a `warm_start_predict` warm start on a dump of its own config: training
    steps read the stored continuation; only validation (whose split stores none) runs M's."""
    live, validate = OriginalModelWrapper.greedy_continuation, trainer.validate
    calls: list[bool] = []  # for each call of M's continuation: whether validation made it
    validating = [False]

    def counted(*args, **kwargs):
        calls.append(validating[0])
        return live(*args, **kwargs)

    def flagged(run):
        validating[0] = True
        try:
            validate(run)
        finally:
            validating[0] = False

    monkeypatch.setattr(OriginalModelWrapper, "greedy_continuation", counted)
    monkeypatch.setattr(trainer, "validate", flagged)
    result = trainer.train(load_config(None, _predict_args(predicted_dump, tmp_path / "warm", 2)))
    assert result.steps == 2 and "val_ce_d" in result.last_val
    assert calls and all(calls)  # validation's, at steps 0 and 2; never a training step's


def test_a_saved_config_with_the_old_predict_tokens_key_loads_under_the_new_one(tmp_path):
    """train.warm_start.predict_tokens (before it moved beside its objective) reads as
    train.predict.tokens, same value, wherever a saved config is read; a user's own config naming
    it is refused with the new key."""
    new = dump_config(LensConfig(train={"t_text": 4, "predict": {"tokens": 3}}))
    old = json.loads(json.dumps(new))
    del old["train"]["predict"]
    old["train"]["warm_start"]["predict_tokens"] = 3
    migrated = migrate_saved(old)
    # The moved key alone: settings added to the section since stay at their defaults.
    assert migrated["train"].pop("predict") == {"tokens": 3}
    assert migrated["train"] == {k: v for k, v in new["train"].items() if k != "predict"}
    assert {k: v for k, v in migrated.items() if k != "train"} == {
        k: v for k, v in new.items() if k != "train"
    }
    assert "predict_tokens" in old["train"]["warm_start"]  # the saved dict is not modified
    assert config_from_dict(old).train.predict.tokens == 3
    assert config_from_dict(old) == config_from_dict(new)
    assert setting(old, "train.predict.tokens") == 3
    # The range check reads the migrated value.
    old["train"]["warm_start"]["objective"] = "warm_start_predict"
    old["train"]["t_text"] = 2
    with pytest.raises(LensError, match=r"train.predict.tokens must be between 1 .* got 3;"):
        config_from_dict(old)
    # A user's own YAML or override: one sentence naming the new key.
    moved = (
        r"^Config key 'train.warm_start.predict_tokens' moved to 'train.predict.tokens'; "
        r"set train.predict.tokens=2 instead\.$"
    )
    with pytest.raises(LensError, match=moved):
        load_config(None, ["train.warm_start.predict_tokens=2"])
    yaml_file = tmp_path / "old.yaml"
    yaml_file.write_text("train:\n  warm_start: {predict_tokens: 2}\n")
    with pytest.raises(LensError, match=moved):
        load_config([yaml_file])
    assert load_config(None, ["train.predict.tokens=3"]).train.predict.tokens == 3


def test_a_warm_start_saved_with_the_old_key_is_reused_only_with_the_same_value(tmp_path):
    """The warm start's reuse check compares its saved lens config (old key) with the run's."""
    run_dir = tmp_path / "run"
    base = {
        "run_dir": str(run_dir),
        "t_text": 3,
        "warm_start": {"steps": 1, "objective": "warm_start_predict"},
    }
    cfg = config_from_dict({"train": {**base, "predict": {"tokens": 2}}})
    warm_cfg = cfg.model_copy(
        update={
            "train": cfg.train.model_copy(
                update={
                    "objective": "warm_start_predict",
                    "steps": 1,
                    "run_dir": run_dir / trainer.WARM_START_DIR,
                    "warm_start": cfg.train.warm_start.model_copy(update={"steps": 0}),
                    "alpha": ScheduleConfig(kind="constant", start=0.0),
                }
            )
        }
    )
    saved = dump_config(warm_cfg)
    del saved["train"]["predict"]
    saved["train"]["warm_start"]["predict_tokens"] = 2
    lens_dir = run_dir / trainer.WARM_START_DIR / "lens"
    lens_dir.mkdir(parents=True)
    (lens_dir / "lens_config.json").write_text(json.dumps({"config": saved}))
    reused = trainer._after_warm_start(cfg, resume=False)
    assert reused.train.init_from == lens_dir
    other = config_from_dict({"train": {**base, "predict": {"tokens": 3}}})
    with pytest.raises(LensError, match=r"other settings \(train\.predict\.tokens differs\)"):
        trainer._after_warm_start(other, resume=False)


def test_warm_start_next_never_teaches_padding(tiny_llama_dir):
    """Right-padded next tokens: D's CE covers only real tokens and E reads each text unpadded."""
    lens = _lens(tiny_llama_dir, objective="warm_start_next")
    batch = _batch(lens, n=2)
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    with no_host_reads():  # the padding is rolled on the device
        ce, mse, _ = supervised_losses(lens, batch, ids, False, mask)
    logits = lens.decoder.teacher_forced_logits(batch.A, ids)
    real = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    expected = torch.stack([F.cross_entropy(logits[r, t], ids[r, t]) for r, t in real]).mean()
    torch.testing.assert_close(ce, expected)
    a_hat = torch.cat([lens.encoder.encode_ids(ids[:1]), lens.encoder.encode_ids(ids[1:, :2])])
    torch.testing.assert_close(mse, normalised_mse(a_hat, batch.A), rtol=1e-5, atol=1e-7)


def test_warm_start_next_refuses_a_dump_with_fewer_next_tokens(dumped, tmp_path):
    """The fixture's dump stores 2 tokens after P; teaching 3 would silently truncate them."""
    args = _overrides(dumped, tmp_path / "run", "warm_start_next", 1, t_text=3)
    with pytest.raises(LensError, match="stores 2; dump again with train.t_text=3"):
        trainer.train(load_config(None, args))
    # The context-token warm start needs none of them.
    trainer.train(load_config(None, _overrides(dumped, tmp_path / "ok", "warm_start", 1, t_text=3)))


def test_grpo_fluency_reward_subtracts_the_texts_nll_under_m(tiny_llama_dir):
    lens = _lens(tiny_llama_dir, objective="grpo", rl={"samples": 2})
    batch = _batch(lens)
    rewards = []
    for weight in (0.0, 1.5):
        cfg = lens.cfg.model_copy(deep=True)
        cfg.train.rl.fluency_reward = weight
        obj = build_objective(lens, cfg)
        torch.manual_seed(3)
        rewards.append(float(obj(lens, batch, step_info(type(obj), cfg, 0)).terms["reward"]))
    torch.manual_seed(3)  # the same samples: generation is the objective's first use of the RNG
    ids = lens.decoder.generate(batch.A.repeat_interleave(2, 0), 3, greedy=False)
    nll = lens.orig.text_nll(ids)
    assert rewards[1] == pytest.approx(rewards[0] - 1.5 * float(nll.mean()), rel=1e-5)


def test_grpo_fluency_margin_charges_only_the_nll_above_it(tiny_llama_dir):
    lens = _lens(tiny_llama_dir, objective="grpo", rl={"samples": 2})
    batch = _batch(lens)
    torch.manual_seed(3)  # the samples every run below draws first
    ids = lens.decoder.generate(batch.A.repeat_interleave(2, 0), 3, greedy=False)
    nll = lens.orig.text_nll(ids)
    margin = float(nll.median())  # some texts under it (free), some over (charged the excess)
    assert (nll < margin).any() and (nll > margin).any()
    rewards = []
    for weight, fluency_margin in ((0.0, None), (1.5, margin)):
        cfg = lens.cfg.model_copy(deep=True)
        cfg.train.rl.fluency_reward, cfg.train.rl.fluency_margin = weight, fluency_margin
        obj = build_objective(lens, cfg)
        torch.manual_seed(3)
        rewards.append(float(obj(lens, batch, step_info(type(obj), cfg, 0)).terms["reward"]))
    excess = (nll - margin).clamp(min=0).mean()
    assert rewards[1] == pytest.approx(rewards[0] - 1.5 * float(excess), rel=1e-5)


def test_grpo_next_reward_subtracts_the_kl_at_the_positions_after_p(tiny_llama_dir):
    lens = _lens(tiny_llama_dir, objective="grpo", rl={"samples": 2})
    gen = torch.Generator().manual_seed(1)
    items = []
    for i in range(3):
        ids = torch.randint(1, 320, (6 + i,), generator=gen)
        act = lens.orig.activations(ids[None], torch.ones_like(ids[None]))[0]
        # Row 0's sequence ends 2 tokens after P: its third position is padding, never scored.
        after = torch.randint(1, 320, (2 if i == 0 else 4,), generator=gen)
        items.append({"input_ids_A": ids, "A": act, "input_ids_A_prime": ids, "A_prime": act})
        items[-1]["input_ids_next"] = after
    batch = CollateFn(pad_id=0)(items)
    rewards = []
    for weight, positions in ((0.0, None), (0.7, 3)):
        cfg = lens.cfg.model_copy(deep=True)
        cfg.train.rl.next_reward, cfg.train.rl.next_positions = weight, positions
        obj = build_objective(lens, cfg)
        torch.manual_seed(3)
        terms = obj(lens, batch, step_info(type(obj), cfg, 0)).terms
        rewards.append((float(terms["reward"]), float(terms["kl_next"])))
    # By hand: the same samples, E's reconstruction of each written at P in one full forward over
    # the context and the next tokens, KL(M(A) || M(Â)) at each real position after P, averaged.
    torch.manual_seed(3)
    texts = lens.decoder.generate(batch.A.repeat_interleave(2, 0), 3, greedy=False)
    with torch.no_grad():
        a_hat = lens.encoder.encode_ids(texts)
        kls = []
        for j in range(6):
            ids, after = items[j // 2]["input_ids_A"], items[j // 2]["input_ids_next"][:3]
            text = torch.cat([ids, after])[None]
            clean = lens.orig.model(input_ids=text).logits[0, len(ids) :]
            with replace_at(lens.orig.block, len(ids) - 1, a_hat[j : j + 1]):
                patched = lens.orig.model(input_ids=text).logits[0, len(ids) :]
            p = F.log_softmax(clean, -1)
            kls.append(float((p.exp() * (p - F.log_softmax(patched, -1))).sum(-1).mean()))
    assert min(kls) > 0
    assert rewards[0][1] == 0.0
    # The objective reads a cached chunk, the hand computation full forwards: their float32 sums
    # differ by ~1e-7 nats under some CPU kernels (avx2, default), on KLs of ~3e-4 here.
    assert rewards[1][1] == pytest.approx(sum(kls) / len(kls), rel=1e-4, abs=1e-6)
    assert rewards[1][0] == pytest.approx(rewards[0][0] - 0.7 * sum(kls) / len(kls), rel=1e-4)


def test_grpo_next_reward_reads_a_narrower_batch_and_refuses_one_without_next_tokens(
    tiny_llama_dir,
):
    """Rows that all end 1 token after P give a batch narrower than `next_positions`: every real
    token is read, nothing is refused; a batch without next tokens is refused by name."""
    lens = _lens(tiny_llama_dir, objective="grpo", rl={"samples": 2, "next_reward": 1.0})
    obj = build_objective(lens, lens.cfg)
    assert obj.next_tokens_needed() == 4
    info = step_info(type(obj), lens.cfg, 0)
    with pytest.raises(LensError, match=r"reads 4 corpus tokens after P, but this batch has none"):
        obj(lens, _batch(lens), info)
    batch = _batch(lens, next_tokens=1)
    assert batch.input_ids_next.shape == (4, 1)
    assert float(obj(lens, batch, info).terms["kl_next"]) > 0


def test_grpo_next_reward_refuses_a_dump_with_fewer_next_tokens(dumped, tmp_path):
    """The fixture's dump stores 2 tokens after P: reading 4 is refused before any step."""
    args = _overrides(dumped, tmp_path / "run", "grpo", 1, **{"rl.next_reward": 1.0})
    with pytest.raises(
        LensError,
        match="reads the 4 corpus tokens after P, but the dump at .* "
        "stores 2; dump again with train.t_text=4",
    ):
        trainer.train(load_config(None, args))
    assert not (tmp_path / "run" / "checkpoints").exists()
    ok = {"rl.next_reward": 1.0, "rl.next_positions": 2}
    trainer.train(load_config(None, _overrides(dumped, tmp_path / "ok", "grpo", 1, **ok)))


def test_grpo_next_positions_needs_a_next_reward():
    with pytest.raises(LensError, match=r"next_positions has no effect with .*next_reward 0"):
        config_from_dict({"train": {"rl": {"next_positions": 2}}})
    rl = config_from_dict({"train": {"rl": {"next_positions": 2, "next_reward": 0.5}}}).train.rl
    assert (rl.next_positions, rl.next_reward) == (2, 0.5)


def test_names_prediction_matches_hand_computation():
    words = torch.tensor([-1, 0, 1, 0, -1, 2])  # tokens 1 and 3 are one word; 0 and 4 none
    text = torch.tensor([[[1, 0, 0], [4, 4, 5]], [[0, 4, 0], [2, 2, 4]]])  # (n 2, K 2, T 3)
    top = torch.tensor([[3, 4], [0, 2]])  # activation 0 predicts token 3 (word of 1) and 4
    expected = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # wordless tokens never match (0, 4)
    torch.testing.assert_close(names_prediction(words, text, top), expected)


def test_content_word_ids_share_an_id_exactly_when_the_words_agree(tiny_llama_dir):
    tok = ConsistencyLens.build(_lens(tiny_llama_dir).cfg).loaded.tokenizer
    ids = content_word_ids(tok, 330)  # 10 rows past the tokenizer's 320 decode to no word
    assert (ids[320:] == -1).all()
    words = [content_words(tok, [t]) for t in range(320)]
    assert (ids[:320] >= 0).tolist() == [bool(w) for w in words]
    named = [t for t in range(320) if words[t]]
    assert len(named) > 20
    for a in named:
        for b in named:
            assert (ids[a] == ids[b]) == (words[a] == words[b])


def test_grpo_prediction_reward_adds_its_weight_where_a_text_names_m_s_top5(tiny_llama_dir):
    lens = _lens(tiny_llama_dir, objective="grpo", rl={"samples": 4})
    batch = _batch(lens)
    # A random model's top-5 holds few content words, so both runs read tokens through a word map
    # where every 23rd token shares a word: hits and misses both occur (the map itself is
    # checked against the eval's word rule above).
    words = torch.arange(320) % 23
    terms = []
    for weight in (0.0, 2.5):
        cfg = lens.cfg.model_copy(deep=True)
        cfg.train.rl.prediction_reward = weight
        obj = build_objective(lens, cfg)
        obj.words = words
        torch.manual_seed(3)
        terms.append(obj(lens, batch, step_info(type(obj), cfg, 0)).terms)
    # By hand: the same samples, M's clean top-5 at P under A.
    torch.manual_seed(3)
    ids = lens.decoder.generate(batch.A.repeat_interleave(4, 0), 3, greedy=False)
    logits = lens.orig.forward_with_replacement(
        batch.input_ids_A, batch.attention_mask_A, [batch.A]
    )[0]
    top = [{int(words[t]) for t in row} for row in logits.topk(5, dim=-1).indices.tolist()]
    named = [bool({int(words[t]) for t in row} & top[i // 4]) for i, row in enumerate(ids.tolist())]
    assert 0 < sum(named) < len(named)  # the check can tell a hit from a miss
    assert float(terms[0]["named"]) == pytest.approx(sum(named) / len(named))
    assert float(terms[1]["named"]) == float(terms[0]["named"])
    assert float(terms[1]["reward"]) == pytest.approx(
        float(terms[0]["reward"]) + 2.5 * sum(named) / len(named), rel=1e-5
    )


def test_text_nll_scores_every_token_after_bos(tiny_llama_dir):
    lens = _lens(tiny_llama_dir)
    ids = torch.tensor([[5, 6, 7], [9, 9, 2]])
    bos = lens.orig.bos_id
    assert bos == lens.loaded.tokenizer.eos_token_id  # the fixture tokenizer has no BOS
    logits = lens.orig.model(input_ids=torch.tensor([[bos, 5, 6, 7], [bos, 9, 9, 2]])).logits
    torch.testing.assert_close(lens.orig.text_nll(ids), token_nll(logits[:, :-1], ids))
    # One token: M reads BOS alone and scores it.
    torch.testing.assert_close(lens.orig.text_nll(ids[:, :1]), token_nll(logits[:, :1], ids[:, :1]))


@pytest.mark.parametrize(
    "objective", ["plan", "warm_start", "warm_start_predict", "grpo", "grpo next_reward"]
)
def test_a_training_step_reads_nothing_back_to_the_host(tiny_llama_dir, objective, padded_passes):
    """Forward and backward of every objective on a left-padded batch make no host sync (what
    stalls a GPU's launch queue): no `.item()`-like read, no `nonzero`, no `masked_select`."""
    name, _, reward = objective.partition(" ")
    rl = {"samples": 3, "next_reward": 1.0, "next_positions": 3} if reward else {"samples": 3}
    lens = _lens(tiny_llama_dir, objective=name, rl=rl)
    obj = build_objective(lens, lens.cfg)
    batch = _batch(lens, next_tokens=3 if reward else 0)
    info = step_info(type(obj), lens.cfg, 0)
    with no_host_reads():
        obj(lens, batch, info).loss.backward()


@pytest.mark.parametrize("objective", ["warm_start", "grpo"])
def test_m_pass_keeps_the_gradients_without_a_graph_for_a(
    tiny_llama_dir, monkeypatch, objective, one_intra_op_thread, padded_passes
):
    """M's patched pass leaves A's rows (data) out of attention's graph for every objective that
    patches M (`models/attention.py`): the same losses and gradients bit for bit."""
    lens = _lens(tiny_llama_dir, objective=objective, rl={"samples": 3})
    obj = build_objective(lens, lens.cfg)
    batch = _batch(lens)
    info = step_info(type(obj), lens.cfg, 0)
    if objective == "warm_start":
        info.coeffs["alpha"] = 1.0  # the warm start's KL term on
    results = []
    for split in (False, True):
        calls = record_sdpa(monkeypatch, split)
        lens.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        out = obj(lens, batch, info)
        out.loss.backward()
        grads = [p.grad for p in lens.parameters() if p.requires_grad and p.grad is not None]
        results.append((out.loss.detach(), grads, calls))
    (loss, grads, plain_calls), (split_loss, split_grads, calls) = results
    assert torch.equal(split_loss, loss)
    assert grads and len(grads) == len(split_grads)
    for g, s in zip(grads, split_grads, strict=True):
        assert torch.equal(s, g)
    # M's pass over [A; patches]: its graphed calls ran on the patches' rows only.
    sets = 3 if objective == "grpo" else 1
    n = len(batch)
    assert (n * (sets + 1), True) in plain_calls
    assert (n * (sets + 1), True) not in calls and (n * sets, True) in calls


def test_a_finished_warm_start_saved_before_a_setting_existed_is_still_the_same():
    """A warm start's saved config lacks settings added since (here `rl.prediction_reward`):
    read through today's schema they are at their defaults, so `train` still reuses it."""
    cfg = config_from_dict({"train": {"t_text": 4, "warm_start": {"steps": 3}}})
    saved = dump_config(cfg)
    del saved["train"]["rl"]["prediction_reward"]
    assert trainer._settings(saved) == trainer._settings(cfg)
    saved["train"]["rl"]["kl_ref"] = 0.9
    assert trainer._settings(saved) != trainer._settings(cfg)


def test_grpo_reference_kl_guard_drops_the_policy_gradient_past_its_bound(tiny_llama_dir):
    """`rl.max_kl_ref`: under the bound the loss is unchanged; past it the policy-gradient term
    leaves the loss (D is pulled back by the reference KL alone) and `held` says so."""
    lens = _lens(tiny_llama_dir, objective="grpo", rl={"samples": 3, "kl_ref": 0.5}, lr=0.05)
    batch = _batch(lens)
    # Move D away from its reference first, so the reference KL is above 0.
    obj = build_objective(lens, lens.cfg)
    with torch.no_grad():
        for param in obj._decoder_params(lens).values():
            param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(0)))
    outs = {}
    for bound in (None, 1e6, 1e-6):
        cfg = lens.cfg.model_copy(deep=True)
        cfg.train.rl.max_kl_ref = bound
        guarded = build_objective(lens, cfg)
        guarded.reference = obj.reference  # the same reference for every bound
        torch.manual_seed(5)
        outs[bound] = guarded(lens, batch, step_info(type(guarded), cfg, 0))
    off, under, past = outs[None], outs[1e6], outs[1e-6]
    assert float(off.terms["kl_ref"]) > 1e-6
    held = [float(out.terms["held"]) for out in (off, under, past)]
    assert held == [0.0, 0.0, 1.0]
    torch.testing.assert_close(under.loss, off.loss)
    pg = off.terms["pg"]
    assert abs(float(pg)) > 1e-6  # the dropped term is not zero anyway
    torch.testing.assert_close(past.loss, off.loss - pg)
    # The gradient too: D's is the one of the loss without the policy-gradient term.
    params = list(obj._decoder_params(lens).values())
    held_grads = torch.autograd.grad(past.loss, params, allow_unused=True)
    want = torch.autograd.grad(off.loss - pg, params, allow_unused=True)
    with_pg = torch.autograd.grad(under.loss, params, allow_unused=True)
    moved = False
    for got, exp, full in zip(held_grads, want, with_pg, strict=True):
        if exp is None:
            continue
        torch.testing.assert_close(got, exp)
        moved |= not torch.allclose(got, full)
    assert moved


def test_grpo_reference_kl_guard_needs_a_reference_weight():
    with pytest.raises(LensError, match=r"train.rl.max_kl_ref needs train.rl.kl_ref above 0"):
        config_from_dict({"train": {"rl": {"max_kl_ref": 2.0, "kl_ref": 0.0}}})
    assert config_from_dict({"train": {"rl": {"max_kl_ref": 2.0}}}).train.rl.max_kl_ref == 2.0


def test_grpo_fluency_margin_needs_a_fluency_weight():
    with pytest.raises(LensError, match=r"fluency_margin has no effect with .*fluency_reward 0"):
        config_from_dict({"train": {"rl": {"fluency_margin": 4.6}}})
    rl = config_from_dict(
        {"train": {"rl": {"fluency_margin": 4.6, "fluency_reward": 0.2}}}
    ).train.rl
    assert (rl.fluency_margin, rl.fluency_reward) == (4.6, 0.2)


def test_decoder_rotate_warm_start_is_prediction_first_read_in_reading_order(tiny_llama_dir):
    """`decoder_rotate=k` with `encoder_rotate=k` on the context-first target is, term for term,
    the prediction-first warm start without rotation: D is taught the same written order and E
    reads the same tokens; only the text a reader gets differs (context, then prediction)."""
    base = {"objective": "warm_start_predict", "alpha": {"kind": "constant", "start": 1.0}}
    pf = _lens(tiny_llama_dir, **base, predict={"tokens": 2, "order": "prediction_first"})
    dr = _lens(tiny_llama_dir, **base, predict={"tokens": 2}, decoder_rotate=2, encoder_rotate=2)
    dr.load_state_dict(pf.state_dict())
    batch = _batch(pf)
    pf_ids, _ = build_objective(pf, pf.cfg).targets(pf, batch)
    dr_ids, _ = build_objective(dr, dr.cfg).targets(dr, batch)
    assert torch.equal(dr_ids, pf_ids.roll(-2, 1))
    for got, want in zip(
        supervised_losses(dr, batch, dr_ids), supervised_losses(pf, batch, pf_ids), strict=True
    ):
        torch.testing.assert_close(got, want)


def test_grpo_fluency_reward_scores_the_text_in_reading_order(tiny_llama_dir):
    """With `decoder_rotate`, the fluency term is M's NLL of the text as read, not as written."""
    lens = _lens(
        tiny_llama_dir,
        objective="grpo",
        rl={"samples": 2, "fluency_reward": 1.0},
        decoder_rotate=1,
    )
    batch = _batch(lens)
    obj = build_objective(lens, lens.cfg)
    torch.manual_seed(3)
    reward = float(obj(lens, batch, step_info(type(obj), lens.cfg, 0)).terms["reward"])
    no_fluency = lens.cfg.model_copy(deep=True)
    no_fluency.train.rl.fluency_reward = 0.0
    torch.manual_seed(3)
    plain = float(
        build_objective(lens, no_fluency)(lens, batch, step_info(type(obj), no_fluency, 0)).terms[
            "reward"
        ]
    )
    torch.manual_seed(3)
    text = lens.decoder.generate(batch.A.repeat_interleave(2, 0), 3, greedy=False)
    read, written = lens.orig.text_nll(text), lens.orig.text_nll(text.roll(1, 1))
    assert not torch.allclose(read, written)
    assert reward == pytest.approx(plain - float(read.mean()), rel=1e-5)
