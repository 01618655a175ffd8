"""Best-of-N explanations (`decode`): the score, what it keeps, its seeded draws, its settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import objective_batch, objective_lens

from consistency_lens.config import (
    DECODE_DEFAULTS,
    DecodeConfig,
    LensConfig,
    decode_settings,
    load_config,
)
from consistency_lens.evaluation.saved_lens import load_lens
from consistency_lens.evaluation.tables import decode_text
from consistency_lens.models.decoding import best_of_samples, explanation_scores
from consistency_lens.models.lens import ConsistencyLens
from consistency_lens.models.patching import token_nll

CONFIG = Path(__file__).parents[2] / "config"


def test_scores_match_a_hand_computation():
    cfg = DecodeConfig(samples=2, fluency=0.5, fluency_margin=4.0, content=2.0)
    d_logprob = torch.tensor([[-1.0, -2.0, -0.5]])
    nll = torch.tensor([[3.0, 6.0, 5.0]])
    content = torch.tensor([[False, True, False]])
    # -1 - 0 + 0; -2 - 0.5 * 2 + 2; -0.5 - 0.5 * 1 + 0
    expected = torch.tensor([[-1.0, -1.0, -1.0]])
    assert torch.equal(explanation_scores(d_logprob, nll, content, cfg), expected)
    named = torch.tensor([[True, False, True]])
    with_prediction = cfg.model_copy(update={"prediction": 0.25})
    expected = torch.tensor([[-0.75, -1.0, -0.75]])
    assert torch.equal(
        explanation_scores(d_logprob, nll, content, with_prediction, named), expected
    )
    error = torch.tensor([[0.5, 0.25, 1.0]])
    with_error = with_prediction.model_copy(update={"reconstruction": 2.0})
    expected = torch.tensor([[-1.75, -1.5, -2.75]])
    assert torch.equal(
        explanation_scores(d_logprob, nll, content, with_error, named, error), expected
    )


def _candidates(lens, acts, cfg: DecodeConfig) -> torch.Tensor:
    """The candidates `best_of_samples` scores, drawn here the documented way: the greedy text,
    then `samples` draws from one generator seeded with `cfg.seed`."""
    cfg = cfg.filled()
    t = lens.cfg.train.t_text
    gen = torch.Generator().manual_seed(cfg.seed)
    rows = [lens.decoder.generate(acts, t, greedy=True)]
    rows += [
        lens.decoder.generate(acts, t, greedy=False, temperature=cfg.temperature, generator=gen)
        for _ in range(cfg.samples)
    ]
    if cfg.prediction:
        # Then D's greedy text from the patchscope's best-ranked content word (its top-1 if none).
        from consistency_lens.models.decoding import prediction_from_activation

        words = lens.orig.content_word_ids()
        first = []
        for row in prediction_from_activation(lens, acts, cfg.prediction_top):
            hits = [tid for tid in row.tolist() if words[tid] >= 0]
            first.append(hits[0] if hits else int(row[0]))
        rows.append(lens.decoder.generate(acts, t, greedy=True, first=torch.tensor(first)))
    return torch.stack(rows, 1)


@pytest.mark.parametrize(
    "weights",
    [(0.0, 0.0, 0.0), (1e4, 0.0, 0.0), (0.0, 1e4, 0.0), (0.0, 0.0, 1e4)],
    ids=["d only", "fluency", "content", "reconstruction"],
)
def test_the_kept_text_is_the_candidate_of_highest_score(weights, tiny_llama_dir):
    lens = objective_lens(tiny_llama_dir)
    acts = objective_batch(lens).A
    fluency, content, reconstruction = weights
    cfg = DecodeConfig(
        samples=6,
        fluency=fluency,
        fluency_margin=0.0,
        content=content,
        reconstruction=reconstruction,
        seed=3,
        temperature=1.5,
    )
    kept = best_of_samples(lens, acts, cfg)
    cands = _candidates(lens, acts, cfg)
    batch, n, t = cands.shape
    flat = cands.flatten(0, 1)
    d = -token_nll(lens.decoder.teacher_forced_logits(acts.repeat_interleave(n, 0), flat), flat)
    nll = lens.orig.text_nll(flat)
    words = (lens.orig.content_word_ids()[flat] >= 0).any(-1)
    a = acts.repeat_interleave(n, 0)
    error = (lens.encoder.encode_ids(flat) - a).pow(2).sum(-1) / a.pow(2).sum(-1)
    # The criterion each weight setting must optimise, read off the candidates independently.
    key = {
        (0.0, 0.0, 0.0): d,
        (1e4, 0.0, 0.0): -nll + 1e-4 * d,
        (0.0, 1e4, 0.0): words.float() + 1e-4 * d,
        (0.0, 0.0, 1e4): -error + 1e-4 * d,
    }[weights]
    key = key.view(batch, n)
    for row in range(batch):
        match = [j for j in range(n) if torch.equal(cands[row, j], kept[row])]
        assert match, "the kept text is one of the candidates"
        assert key[row, match[0]] >= key[row].max() - 1e-5
    # The draws differ from the greedy text somewhere, so the choice was a real one.
    assert not torch.equal(cands[:, 1:], cands[:, :1].expand(-1, n - 1, -1))


@pytest.mark.parametrize("prediction", [0.0, 2.0], ids=["samples", "with prediction"])
@pytest.mark.parametrize("rotate", [0, 2])
def test_a_rows_explanation_depends_on_its_activation_and_seed_alone(
    rotate, prediction, tiny_llama_dir
):
    lens = objective_lens(tiny_llama_dir, decoder_rotate=rotate, objective="grpo")
    acts = objective_batch(lens).A
    cfg = DecodeConfig(
        samples=6, fluency=1e4, fluency_margin=0.0, seed=5, temperature=1.5, prediction=prediction
    )
    torch.manual_seed(11)
    before = torch.get_rng_state()
    kept = best_of_samples(lens, acts, cfg)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's stream is untouched
    torch.manual_seed(12)  # another caller state, the same explanations
    assert torch.equal(best_of_samples(lens, acts, cfg), kept)
    # Alone, or in a batch in another order, each activation gets the same explanation.
    for row in range(acts.shape[0]):
        assert torch.equal(best_of_samples(lens, acts[row : row + 1], cfg)[0], kept[row])
    assert torch.equal(best_of_samples(lens, acts.flip(0), cfg), kept.flip(0))
    # The seed decides the draws.
    drawn = _candidates(lens, acts, cfg)
    other = cfg.model_copy(update={"seed": 6})
    assert not torch.equal(_candidates(lens, acts, other)[:, 1:], drawn[:, 1:])


def test_reconstruct_decodes_as_the_lens_config_says(tiny_llama_dir):
    lens = objective_lens(tiny_llama_dir)
    acts = objective_batch(lens).A
    greedy = lens.decoder.generate(acts, lens.cfg.train.t_text, greedy=True)
    assert torch.equal(lens.reconstruct(acts)[0], greedy)
    cfg = DecodeConfig(samples=6, fluency=1e4, fluency_margin=0.0)
    lens.cfg = lens.cfg.model_copy(update={"decode": cfg})
    ids, a_hat = lens.reconstruct(acts)
    assert torch.equal(ids, best_of_samples(lens, acts, cfg))
    assert not torch.equal(ids, greedy)  # the setting made a difference
    torch.testing.assert_close(a_hat, lens.encode_ids(ids))
    # A sampled explanation stays D's own draw.
    torch.manual_seed(0)
    sampled = lens.reconstruct(acts, greedy=False)[0]
    torch.manual_seed(0)
    assert torch.equal(sampled, lens.decoder.generate(acts, lens.cfg.train.t_text, greedy=False))


def test_a_lens_keeps_its_decode_settings_unless_the_user_sets_a_key(
    tiny_llama_dir, tmp_path, capsys
):
    cfg = LensConfig(
        model=str(tiny_llama_dir),
        device="cpu",
        model_dtype="float32",
        layer=1,
        train={"t_text": 3},
        decode={"samples": 8, "content": 2.0},
    )
    ConsistencyLens.build(cfg).save_pretrained(tmp_path / "lens")
    saved = ConsistencyLens.from_pretrained(tmp_path / "lens", device="cpu").cfg
    # Saved filled in: later defaults do not change how this lens writes.
    assert saved.decode == DecodeConfig(**{**DECODE_DEFAULTS, "samples": 8, "content": 2.0})
    assert decode_settings(saved, load_config([], [])) == saved.decode
    # The documented config lists every key, unset: it changes nothing of the lens's own.
    assert decode_settings(saved, load_config([CONFIG / "lens.yaml"])) == saved.decode
    user = load_config([], ["decode.samples=0", "decode.fluency=0.25"])
    expected = saved.decode.model_copy(update={"samples": 0, "fluency": 0.25})
    assert decode_settings(saved, user) == expected
    # eval, explain and serve load through `load_lens`, which applies exactly that.
    base = cfg.model_copy(update={"decode": DecodeConfig()})
    capsys.readouterr()
    assert load_lens(base, tmp_path / "lens")[0].cfg.decode == saved.decode
    assert "decode." not in capsys.readouterr().out
    # A key set to the lens's own value replaces nothing; one that differs is named.
    told = cfg.model_copy(update={"decode": DecodeConfig(samples=0, fluency=0.25, content=2.0)})
    assert load_lens(told, tmp_path / "lens")[0].cfg.decode == expected.model_copy(
        update={"content": 2.0}
    )
    assert (
        "Writing with decode.samples=0 (the lens's own: 8), decode.fluency=0.25 (the lens's own: "
        "1.0) from your config or command line; leave them unset" in capsys.readouterr().out
    )
    # A lens saved before its decode was filled in writes an unset key at its default: that is
    # what a key set by the user replaces (samples 0 replaces nothing).
    config_file = tmp_path / "lens" / "lens_config.json"
    meta = json.loads(config_file.read_text())
    meta["config"]["decode"] = {key: None for key in meta["config"]["decode"]}
    config_file.write_text(json.dumps(meta))
    load_lens(
        cfg.model_copy(update={"decode": DecodeConfig(samples=0, fluency=0.25)}), tmp_path / "lens"
    )
    assert (
        "Writing with decode.fluency=0.25 (the lens's own: 1.0) from your config or command "
        "line; leave it unset" in capsys.readouterr().out
    )


def test_the_tables_say_how_the_explanations_were_written():
    assert decode_text(None) == "D's greedy text"
    assert decode_text(DecodeConfig().filled().model_dump()) == "D's greedy text"
    text = decode_text(DecodeConfig(samples=8).filled().model_dump())
    assert text == (
        "best of D's greedy text and 8 samples (T 1) by log p_D - 1 x NLL_M above 4.6 "
        "+ 1 x content word"
    )
    checked = DecodeConfig(samples=8, reconstruction=5.0).filled().model_dump()
    assert decode_text(checked) == (
        "best of D's greedy text and 8 samples (T 1) by log p_D - 1 x NLL_M above 4.6 "
        "+ 1 x content word - 5 x E's error |E(text) - A|^2 / |A|^2"
    )
    shipped = DecodeConfig(samples=16, fluency=2.0, prediction=3.0).filled().model_dump()
    assert decode_text(shipped) == (
        "best of D's greedy text, its text written from M's prediction from A and 16 samples (T 1) "
        "by log p_D - 2 x NLL_M above 4.6 + 1 x content word + 3 x names M's top-10 from A"
    )


def test_the_prediction_alone_also_writes_the_best_candidate(tiny_llama_dir):
    lens = objective_lens(tiny_llama_dir)
    acts = objective_batch(lens).A
    lens.cfg = lens.cfg.model_copy(update={"decode": DecodeConfig(samples=0, prediction=1e4)})
    ids, _ = lens.reconstruct(acts)
    assert torch.equal(ids, best_of_samples(lens, acts, lens.cfg.decode))
    assert not torch.equal(ids, lens.decoder.generate(acts, lens.cfg.train.t_text))


def test_content_word_ids_follow_m_to_its_device(tiny_llama_dir):
    lens = objective_lens(tiny_llama_dir)
    before = lens.orig.content_word_ids().clone()
    lens.orig.model.to("meta")  # a device move after the first call (as .to("cuda") would be)
    moved = lens.orig.content_word_ids()
    assert moved.device.type == "meta"
    assert moved.shape == before.shape


@pytest.mark.parametrize("prediction", [0.0, 2.0], ids=["samples", "with prediction"])
def test_the_batched_candidates_are_the_ones_drawn_one_at_a_time(prediction, tiny_llama_dir):
    from consistency_lens.models.decoding import _write_candidates

    lens = objective_lens(tiny_llama_dir, decoder_rotate=2, t_text=4, objective="grpo")
    acts = objective_batch(lens).A
    cfg = DecodeConfig(samples=5, seed=4, temperature=1.5, prediction=prediction).filled()
    expected = _candidates(lens, acts, cfg)
    first = expected[:, -1, 2] if prediction else None  # written first: read at T - rotate
    ids, d_logprob = _write_candidates(lens, acts, cfg, first)
    assert torch.equal(ids, expected)
    # D's log-probabilities read at generation are those of a teacher-forced pass.
    batch, n, t = ids.shape
    flat = ids.flatten(0, 1)
    forced = -token_nll(
        lens.decoder.teacher_forced_logits(acts.repeat_interleave(n, 0), flat), flat
    )
    torch.testing.assert_close(d_logprob, forced.view(batch, n), atol=1e-5, rtol=1e-5)


def test_rows_are_written_in_chunks_within_the_logits_budget(tiny_llama_dir, monkeypatch):
    from consistency_lens.models import decoding

    lens = objective_lens(tiny_llama_dir)
    acts = torch.cat([objective_batch(lens).A] * 2)  # 6 rows
    cfg = DecodeConfig(samples=4, seed=1, prediction=1.0).filled()
    whole = best_of_samples(lens, acts, cfg)
    calls = []
    write = decoding._write_candidates
    monkeypatch.setattr(
        decoding,
        "_write_candidates",
        lambda lens, a, cfg, first: calls.append(a.shape[0]) or write(lens, a, cfg, first),
    )
    vocab = lens.orig.content_word_ids().shape[0]
    n, t = 1 + 4 + 1, lens.cfg.train.t_text
    monkeypatch.setattr(decoding, "_LOGITS_BUDGET", 4 * n * t * vocab)
    assert torch.equal(best_of_samples(lens, acts, cfg), whole)
    assert calls == [4, 2]
    assert best_of_samples(lens, acts[:0], cfg).shape == (0, t)


def test_the_extra_candidate_starts_with_the_best_ranked_content_word(tiny_llama_dir, monkeypatch):
    from consistency_lens.models import decoding

    lens = objective_lens(tiny_llama_dir)
    acts = objective_batch(lens).A
    words = lens.orig.content_word_ids()
    content = (words >= 0).nonzero().flatten().tolist()
    other = (words < 0).nonzero().flatten().tolist()
    # Row 0: a content word second; row 1: first; row 2: none, so its top-1.
    top = torch.tensor(
        [[other[0], content[0], content[1]], [content[2], other[1], content[3]], other[2:5]]
    )
    monkeypatch.setattr(decoding, "prediction_from_activation", lambda lens, a, k: top)
    given = []
    write = decoding._write_candidates
    monkeypatch.setattr(
        decoding,
        "_write_candidates",
        lambda lens, a, cfg, first: given.append(first) or write(lens, a, cfg, first),
    )
    best_of_samples(lens, acts, DecodeConfig(samples=2, prediction=1.0, prediction_top=3))
    assert given[0].tolist() == [content[0], content[2], other[2]]


def test_prediction_from_activation_is_m_reading_its_own_state_at_the_slot(tiny_llama_dir):
    from consistency_lens.models.decoder import placeholder_id, prompt_token_ids
    from consistency_lens.models.decoding import prediction_from_activation

    lens = objective_lens(tiny_llama_dir, prompt="thought <embed> is")
    tok = lens.loaded.tokenizer
    left, _ = prompt_token_ids(tok, lens.cfg.train.prompt)
    prompt = torch.tensor([[*left, placeholder_id(tok)]])
    with torch.no_grad():
        out = lens.orig.model(input_ids=prompt, output_hidden_states=True)
    # A = M's own state after block L at the slot: the patchscope is then M's plain forward.
    own = out.hidden_states[lens.layer + 1][:, -1]
    expected = out.logits[:, -1].topk(7, dim=-1).indices
    assert torch.equal(prediction_from_activation(lens, own, 7), expected)
    # Another activation gives another prediction: A is read, not the prompt alone.
    other = prediction_from_activation(lens, own + 50 * torch.randn_like(own), 7)
    assert not torch.equal(other, expected)


def test_prediction_from_activation_reads_a_given_prompt_instead_of_ds(tiny_llama_dir):
    from consistency_lens.models.decoder import placeholder_id, prompt_token_ids
    from consistency_lens.models.decoding import prediction_from_activation

    lens = objective_lens(tiny_llama_dir, prompt="thought <embed> is")
    tok = lens.loaded.tokenizer
    left, _ = prompt_token_ids(tok, "the next word <embed>")
    prompt = torch.tensor([[*left, placeholder_id(tok)]])
    with torch.no_grad():
        out = lens.orig.model(input_ids=prompt, output_hidden_states=True)
    own = out.hidden_states[lens.layer + 1][:, -1]
    expected = out.logits[:, -1].topk(7, dim=-1).indices
    assert torch.equal(prediction_from_activation(lens, own, 7, "the next word <embed>"), expected)
    # The same A after D's own prompt is another forward: the given prompt is the one read.
    assert not torch.equal(prediction_from_activation(lens, own, 7), expected)


def test_the_prediction_term_keeps_a_text_naming_ms_prediction_from_a(tiny_llama_dir):
    from consistency_lens.models.decoding import prediction_from_activation
    from consistency_lens.utils.words import names_prediction

    lens = objective_lens(tiny_llama_dir)
    acts = objective_batch(lens).A
    cfg = DecodeConfig(samples=12, seed=2, temperature=2.0, prediction=1e4, prediction_top=40)
    cands = _candidates(lens, acts, cfg)
    words = lens.orig.content_word_ids()
    top = prediction_from_activation(lens, acts, 40)
    named = names_prediction(words, cands, top)  # (B, n)
    kept = best_of_samples(lens, acts, cfg)
    kept_named = names_prediction(words, kept[:, None], top)[:, 0]
    # D's sampled texts name it in one row only; the candidate written from it, in every row.
    assert named[:, :-1].any(1).tolist() == [False, True, False]
    assert named[:, -1].all()
    assert torch.equal(kept_named, named.any(1).float())


def test_weight_0_never_reads_the_prediction(tiny_llama_dir, monkeypatch):
    from consistency_lens.models import decoding

    lens = objective_lens(tiny_llama_dir)
    acts = objective_batch(lens).A
    cfg = DecodeConfig(samples=4, seed=2, prediction=0.0)
    expected = _candidates(lens, acts, cfg)  # the greedy text and the draws, nothing more

    def refuse(*args: object) -> None:
        raise AssertionError("the patchscope ran with decode.prediction 0")

    monkeypatch.setattr(decoding, "prediction_from_activation", refuse)
    kept = best_of_samples(lens, acts, cfg)
    for row in range(acts.shape[0]):
        assert any(torch.equal(kept[row], c) for c in expected[row])


def test_generate_continues_from_a_given_first_token(tiny_llama_dir):
    lens = objective_lens(tiny_llama_dir, t_text=4)
    acts = objective_batch(lens).A
    first = torch.tensor([5, 17, 260])
    forced = lens.decoder.generate(acts, 4, greedy=True, first=first)
    assert torch.equal(forced[:, 0], first)
    # The rest is D's greedy continuation: under teacher forcing (logits[:, t] predicts token t)
    # each later token is D's argmax, while the given first token is not D's own pick.
    logits = lens.decoder.teacher_forced_logits(acts, forced)
    assert torch.equal(logits[:, 1:].argmax(-1), forced[:, 1:])
    assert not torch.equal(logits[:, 0].argmax(-1), first)


def test_generate_under_rotate_writes_the_given_token_first(tiny_llama_dir):
    lens = objective_lens(tiny_llama_dir, t_text=4, decoder_rotate=2, objective="grpo")
    acts = objective_batch(lens).A
    first = torch.tensor([5, 17, 260])
    forced = lens.decoder.generate(acts, 4, greedy=True, first=first)
    # D writes the text's last 2 tokens first: its first written token is read third.
    assert torch.equal(forced[:, 2], first)
    logits = lens.decoder.teacher_forced_logits(acts, forced)
    written_later = [3, 0, 1]  # reading positions of written steps 1, 2, 3
    assert torch.equal(logits[:, written_later].argmax(-1), forced[:, written_later])
