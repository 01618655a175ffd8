"""One training step of this implementation vs. a plan-literal one, same batch and weights.

Run: .venv/bin/python bench/train_step.py [mode] [batch_size] [layer]
The plan-literal step (implemented here) generates A's and A''s texts in two separate calls that
re-run the whole prompt + prefix at every token, reads E's activation from a full forward with
`output_hidden_states=True`, and patches M with two full forwards over the whole context. Both
steps compute the plan's two losses (equal in distribution: each draws its own Gumbel noise) and
run backward and the trainer's AdamW step; they alternate in rounds (best of 5) because this
machine is noisy.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from consistency_lens.config import LensConfig
from consistency_lens.data.collate import Batch
from consistency_lens.models.decoder import SoftGeneration
from consistency_lens.models.hooks import replace_last
from consistency_lens.models.inputs import left_pad, position_ids
from consistency_lens.models.lens import ConsistencyLens
from consistency_lens.models.loading import load_model
from consistency_lens.models.patching import kl_at_p
from consistency_lens.training.objectives.plan import compute_losses, lm_loss
from consistency_lens.training.optim import build_optimizer

# Interleaved rounds; each implementation's best counts (the 2-core machine's speed drifts by 30%).
ROUNDS = 5


def literal_embed(parts, onehots: torch.Tensor) -> torch.Tensor:
    """The plan's embedding of one-hots: `onehots @ table` (as one 2-D matmul), times the scale."""
    table = parts.embed.weight
    flat = onehots.reshape(-1, onehots.shape[-1]).to(table.dtype) @ table
    return flat.reshape(*onehots.shape[:-1], table.shape[1]) * parts.embed_scale


def literal_generate_soft(lens: ConsistencyLens, acts: torch.Tensor, length: int, tau: float):
    """The plan's generate_soft: every step re-runs the prompt and all generated tokens."""
    dec = lens.decoder
    batch = acts.shape[0]
    dtype = dec.parts.embed.weight.dtype
    prompt = torch.cat(
        [
            dec.prompt_left.unsqueeze(0).expand(batch, -1, -1),
            dec.proj(acts.float()).unsqueeze(1),
            dec.prompt_right.unsqueeze(0).expand(batch, -1, -1),
        ],
        dim=1,
    ).to(dtype)
    logits_all, ids, onehots = [], [], []
    embeds = prompt
    for _ in range(length):
        logits = dec.model(inputs_embeds=embeds).logits[:, -1]
        onehot = F.gumbel_softmax(logits.float(), tau=tau, hard=True)
        logits_all.append(logits)
        ids.append(onehot.argmax(-1))
        onehots.append(onehot)
        embeds = torch.cat([embeds, literal_embed(dec.parts, onehot).unsqueeze(1)], dim=1)
    return SoftGeneration(torch.stack(logits_all, 1), torch.stack(ids, 1), torch.stack(onehots, 1))


def literal_encode(lens: ConsistencyLens, onehots: torch.Tensor) -> torch.Tensor:
    """The plan's E: a full forward with all hidden states, then the final token at its layer."""
    enc = lens.encoder
    out = enc.model(inputs_embeds=literal_embed(enc.parts, onehots), output_hidden_states=True)
    return enc.proj(out.hidden_states[enc.layer + 1][:, -1].float())


def literal_replace(lens: ConsistencyLens, batch: Batch, vectors: torch.Tensor) -> torch.Tensor:
    """The plan's forward_with_replacement: the whole context, full logits, one vector set."""
    mask = batch.attention_mask_A
    with replace_last(lens.orig.block, vectors):
        out = lens.orig.model(
            input_ids=batch.input_ids_A, attention_mask=mask, position_ids=position_ids(mask)
        )
    return out.logits[:, -1]


def literal_losses(lens: ConsistencyLens, batch: Batch, tau: float, alpha: float) -> torch.Tensor:
    """The plan's training-step pseudocode, literally."""
    t_text = lens.cfg.train.t_text
    gen_a = literal_generate_soft(lens, batch.A, t_text, tau)
    a_hat = literal_encode(lens, gen_a.ste_onehots)
    gen_p = literal_generate_soft(lens, batch.A_prime, t_text, tau)
    a_hat_p = literal_encode(lens, gen_p.ste_onehots)
    a_target = a_hat + (batch.A_prime.float() - a_hat_p).detach()
    logits_a = literal_replace(lens, batch, batch.A)
    logits_t = literal_replace(lens, batch, a_target)
    loss_lm = lm_loss(gen_a.token_logits, lens.orig.token_logits(gen_a.discrete_token_ids))
    return loss_lm + alpha * kl_at_p(logits_t, logits_a)


def make_batch(lens: ConsistencyLens, batch_size: int, seed: int = 0) -> Batch:
    """Random-text contexts with P uniform in 34..94 (mean 64), A and A' from M itself."""
    gen = torch.Generator().manual_seed(seed)
    vocab = lens.loaded.tokenizer.vocab_size

    def contexts():
        lengths = torch.randint(35, 96, (batch_size,), generator=gen)
        return left_pad([torch.randint(100, vocab, (int(n),), generator=gen) for n in lengths], 0)

    ids, mask = contexts()
    ids_p, mask_p = contexts()
    return Batch(
        ids,
        mask,
        lens.orig.activations(ids, mask).float(),
        ids_p,
        mask_p,
        lens.orig.activations(ids_p, mask_p).float(),
    )


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "frozen_base"
    batch_size = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    loaded = load_model("smollm2-135m", device="cpu")
    layer = int(sys.argv[3]) if len(sys.argv) > 3 else loaded.parts.num_blocks // 2
    cfg = LensConfig(device="cpu", layer=layer, train={"mode": mode, "batch_size": batch_size})
    lens = ConsistencyLens.build(cfg, loaded)
    batch = make_batch(lens, batch_size)
    mean_p = float(batch.attention_mask_A.sum(-1).float().mean() - 1)
    # The trainer's optimizer (fused AdamW), one instance for both steps.
    optimizer, _ = build_optimizer(lens.param_groups(), cfg.train)

    def step(fn) -> tuple[float, float]:
        """Wall and CPU seconds (all threads) of one step."""
        tic, cpu = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        fn().backward()
        optimizer.step()
        return time.perf_counter() - tic, time.process_time() - cpu

    ours = lambda: compute_losses(lens, batch, tau=1.0, alpha=1.0).loss  # noqa: E731
    plan = lambda: literal_losses(lens, batch, tau=1.0, alpha=1.0)  # noqa: E731
    step(ours), step(plan)  # warm-up (allocator, kernels)
    times: dict[str, list[tuple[float, float]]] = {"ours": [], "plan": []}
    for _ in range(ROUNDS):
        times["ours"].append(step(ours))
        times["plan"].append(step(plan))
    wall = {k: min(t for t, _ in v) for k, v in times.items()}
    cpu = {k: min(c for _, c in v) for k, v in times.items()}
    print(
        f"model smollm2-135m ({loaded.model.dtype}), layer {layer}, mode {mode}, batch "
        f"{batch_size}, mean P {mean_p:.1f}, T_text {cfg.train.t_text}, "
        f"threads {torch.get_num_threads()}"
    )
    for key, name in (("ours", "this implementation"), ("plan", "plan-literal")):
        runs = [round(t, 3) for t, _ in times[key]]
        print(f"{name + ':':20} {wall[key]:.3f} s/step, {cpu[key]:.3f} CPU-s/step (wall {runs})")
    # With one thread, CPU time is what a slice of a shared machine cannot inflate.
    print(
        f"speed-up: {wall['plan'] / wall['ours']:.2f}x by wall clock, "
        f"{cpu['plan'] / cpu['ours']:.2f}x by CPU time"
    )


if __name__ == "__main__":
    main()
