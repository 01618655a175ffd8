"""`consistency-lens demo`: dump, train, eval, explain and report in one go, reusing what exists."""

from __future__ import annotations

import time
from pathlib import Path

from consistency_lens.config import DecodeConfig, LensConfig, config_from_dict


def _stage(name: str) -> float:
    print(f"\n== {name} ==", flush=True)
    return time.perf_counter()


def _comparable_shipped_lens(cfg: LensConfig) -> Path | None:
    """The lens shipped for `cfg.model` when it reads the demo's layer and was trained on the
    demo's corpus (alone or in a mixture) without its validation samples, else None."""
    from consistency_lens.data.corpus import corpus_parts
    from consistency_lens.data.dump import may_train_on_val
    from consistency_lens.models.lens import CONFIG_FILE
    from consistency_lens.shipped import shipped_lens
    from consistency_lens.utils.io import read_json

    path = shipped_lens(cfg.model)
    if path is None:
        return None
    meta = read_json(path / CONFIG_FILE, "Lens config")
    trained = meta["config"]
    layer, corpus = meta["layer"], trained.get("corpus", "")
    why = None
    if layer != cfg.layer:
        # Its eval would need its own layer's dumps: not the same samples, so no comparison.
        why = f"it reads layer {layer}"
    elif cfg.corpus not in corpus_parts(corpus):
        why = f"it was trained on {corpus!r}"
    elif corpus != cfg.corpus and not meta.get("train_mean_sha256"):
        why = f"its mean baseline would need its own training dump of {corpus!r}"
    elif leak := may_train_on_val(config_from_dict(trained), cfg):
        why = f"its training split may hold the demo's validation samples ({leak})"
    if why is not None:
        print(f"Not comparing with the shipped lens '{path}': {why}.")
        return None
    return path


def run_demo(cfg: LensConfig) -> dict:
    """Run the whole pipeline on `cfg`; returns the paths written and the eval results."""
    from consistency_lens.data.dump import dump_activations
    from consistency_lens.evaluation.commands import card_command, evaluate_command
    from consistency_lens.evaluation.explain import explain_command
    from consistency_lens.evaluation.report import write_report
    from consistency_lens.evaluation.saved_lens import default_checkpoint
    from consistency_lens.evaluation.tables import print_comparison
    from consistency_lens.models.lens import CONFIG_FILE
    from consistency_lens.training.trainer import keep_context_ceiling, train

    run_dir = Path(cfg.train.run_dir)
    lens_dir = default_checkpoint(cfg)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    t = _stage("1/5 dump activations (shards already written are reused)")
    dump_activations(cfg)
    timings["dump_s"] = time.perf_counter() - t

    t = _stage("2/5 train the lens")
    if (lens_dir / CONFIG_FILE).is_file():
        print(f"reusing the trained lens at {lens_dir} (delete it to train again)")
        # A run stopped between saving the lens and its ceiling gets the ceiling now.
        keep_context_ceiling(cfg, lens_dir, resume=True)
    else:
        # resume=True: a demo interrupted mid-training continues from its last checkpoint.
        train(cfg, resume=True)
    timings["train_s"] = time.perf_counter() - t

    t = _stage("3/5 evaluate against baselines")
    results = evaluate_command(cfg, lens_dir, run_dir)
    # Eval never writes the lens directory; the demo publishes its numbers in the card explicitly.
    card_command(lens_dir, run_dir / "eval_results.json")
    timings["eval_s"] = time.perf_counter() - t
    shipped, shipped_results = _comparable_shipped_lens(cfg), None
    if shipped is not None:
        t = _stage("3b/5 evaluate the shipped lens, as it writes, on the same samples")
        # Scored as shipped: the demo config's decode keys are its own lens's recipe, and would
        # otherwise replace the shipped lens's (`decode_settings`).
        as_shipped = cfg.model_copy(update={"decode": DecodeConfig()})
        shipped_results = evaluate_command(as_shipped, shipped, run_dir / "shipped_lens")
        print_comparison({"this demo's lens": results, "shipped lens": shipped_results})
        timings["eval_shipped_s"] = time.perf_counter() - t

    t = _stage("4/5 explain a sentence")
    explain_page = run_dir / "explain.html"
    explain_command(cfg, lens_dir, cfg.eval.explain_text, explain_page)
    timings["explain_s"] = time.perf_counter() - t

    t = _stage("5/5 report")
    report = write_report(run_dir)
    timings["report_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start

    print("\n== done ==")
    print("  ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print(f"lens (shareable, with its model card): {lens_dir}")
    print(f"report:           {report}")
    print(f"explanations:     {explain_page}")
    print(f"samples:          {run_dir / 'samples.html'}")
    return {
        "results": results,
        "report": report,
        "explain": explain_page,
        "lens": lens_dir,
        "timings": timings,
        "shipped_results": shipped_results,
    }
