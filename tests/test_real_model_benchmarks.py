"""The real-model benchmarks' parts that need no model: the task, the reward, the summary, and a smoke
run of the memory script at tiny shapes."""

from __future__ import annotations

import json

import pytest

from benchmarks import real_model, real_model_memory


@pytest.mark.parametrize(
    "text,expected",
    [("7", 7), ("3 + 4 = 7", 7), ("The answer is 12.", 12), ("zero", None), ("-3", -3), ("", None)],
)
def test_parse_answer_takes_the_last_integer(text, expected):
    assert real_model.parse_answer(text) == expected


def test_reward_is_one_exactly_for_the_sum():
    completions = [[{"role": "assistant", "content": c}] for c in ("7", "3 + 4 = 7", "8", "What?")]
    assert real_model.reward_exact(completions, answer=[7, 7, 7, 7]) == [1.0, 1.0, 0.0, 0.0]


def test_held_out_problems_are_disjoint_from_training_and_few_shot():
    held_out = real_model.make_problems(12, seed=1, low=0, high=6)
    train = real_model.make_problems(None, seed=2, low=0, high=6, exclude=set(held_out))
    assert len(set(held_out)) == 12 and len(set(train)) == len(train)
    assert not set(held_out) & set(train)
    assert not (set(held_out) | set(train)) & set(real_model.FEW_SHOT)
    # Every sum in the range is used exactly once, apart from the few-shot examples.
    in_range = {(a, b) for a in range(7) for b in range(7)} - set(real_model.FEW_SHOT)
    assert set(held_out) | set(train) == in_range
    with pytest.raises(ValueError, match=r"100 problems asked for, but 0\.\.6 leaves only"):
        real_model.make_problems(100, seed=1, low=0, high=6)


def test_chat_ends_with_the_question_after_the_examples():
    chat = real_model.messages(2, 5)
    assert chat[0] == {"role": "system", "content": real_model.SYSTEM_PROMPT}
    assert len(chat) == 2 + 2 * len(real_model.FEW_SHOT)
    assert chat[-1] == {"role": "user", "content": "What is 2 + 5?"}


def test_summary_is_mean_and_spread_over_seeds():
    def run(seed, b, d, r):
        return {"seed": seed, "before": {"pass@1": b}, "after": {"dr_grpo": {"pass@1": d}, "rspo": {"pass@1": r}}}

    s = real_model.summarise([run(0, 0.1, 0.5, 0.4), run(1, 0.3, 0.7, 0.8)])
    assert s["before"]["pass@1"]["mean"] == pytest.approx(0.2)
    assert s["rspo"]["pass@1"]["mean"] == pytest.approx(0.6)
    assert s["rspo"]["pass@1"]["std"] == pytest.approx(2**0.5 * 0.2)  # sample standard deviation
    assert s["dr_grpo"]["pass@1"]["per_seed"] == [0.5, 0.7]


def test_memory_script_smoke_writes_one_row_per_shape(tmp_path, capsys):
    out = tmp_path / "mem.json"
    assert real_model_memory.main(["--smoke", "--repeats", "0", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["reports"]) == set(real_model_memory.SHAPES)
    for rep in report["reports"].values():
        rows = {r["variant"]: r for r in rep["results"]}
        assert rows["rspo_linear"]["loss"] == pytest.approx(rows["unfused"]["loss"], rel=1e-5, abs=1e-6)
    table = (tmp_path / "mem.md").read_text()
    assert "| smollm2 |" in table and "| qwen-vocab |" in table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mem.json", "mem.md"]  # the per-shape parts are gone
