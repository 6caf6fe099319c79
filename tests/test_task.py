"""The built-in task: its answer checker, its data split and the task metrics."""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import string

import pytest

from kdtool.synthetic import TASKS, is_correct, make_dataset, make_example, valid_answers, write_dataset
from kdtool.task_eval import flatten, score


def test_every_valid_answer_is_accepted_and_nothing_else():
    rng = random.Random(0)
    for task in (*TASKS, "pick"):
        for _ in range(200):
            record = make_example(rng, task)
            answers = valid_answers(task, record["input"])
            assert record["output"] in answers and record["references"] == answers
            for answer in answers:
                assert is_correct(record, answer) and is_correct(record, f"  {answer}\n")
            # Every other string of the answers' alphabet and length is rejected.
            alphabet = sorted(set("".join(answers)) | {"0", "a"})
            length = len(answers[0])
            wrong = ["".join(p) for p in itertools.islice(itertools.product(alphabet, repeat=length), 300)]
            for candidate in wrong:
                assert is_correct(record, candidate) == (candidate in answers)
            for candidate in ("", answers[0] + answers[0][-1], answers[0][:-1], answers[0].upper() + "!"):
                assert not is_correct(record, candidate)


def test_answers_are_what_the_task_says():
    assert valid_answers("reverse", "abc") == ["cba"]
    assert valid_answers("add", "19+83") == ["102"]
    assert valid_answers("sort", "5 0 5 1") == ["0155"]
    assert valid_answers("pick", "q b k") == ["q", "b", "k"]
    with pytest.raises(ValueError, match="unknown task"):
        valid_answers("count", "x")


def test_above_references_are_uniform_over_the_larger_digits():
    records = make_dataset(8000, seed=3, tasks=("above",))
    for d in range(8):
        answers = [int(r["output"]) for r in records if r["input"] == str(d)]
        assert set(answers) == set(range(d + 1, 10))
        share = [answers.count(a) / len(answers) for a in range(d + 1, 10)]
        assert max(share) - min(share) < 0.1, (d, share)


def test_pick_references_are_uniform_over_the_listed_letters():
    records = make_dataset(9000, seed=0, tasks=("pick",))
    position = [r["input"].split().index(r["output"]) for r in records]
    shares = [position.count(i) / len(position) for i in range(3)]
    assert all(abs(s - 1 / 3) < 0.02 for s in shares), shares  # 4 sigma at n = 9000
    assert all(len(set(r["input"].split())) == 3 for r in records)
    assert all(set(r["input"].split()) <= set(string.ascii_lowercase) for r in records)


def test_no_held_out_prompt_is_in_training(tmp_path):
    train, test = write_dataset(tmp_path, n_train=3000, n_test=400, seed=0)
    key = lambda r: (r["task"], r["input"])  # noqa: E731
    train_keys = {key(json.loads(line)) for line in train.read_text().splitlines()}
    test_records = [json.loads(line) for line in test.read_text().splitlines()]
    # "above" has 8 prompts in all, so its held-out prompts are in training by construction.
    held_out = {key(r) for r in test_records if r["task"] != "above"}
    assert len(test_records) == 400 and held_out and not train_keys & held_out
    # Deterministic: the same call writes the same bytes.
    again = write_dataset(tmp_path / "again", n_train=3000, n_test=400, seed=0)
    assert again[0].read_bytes() == train.read_bytes() and again[1].read_bytes() == test.read_bytes()


def test_score_on_a_fixture():
    records = [
        {"task": "add", "input": "10+11", "instruction": "", "output": "21"},
        {"task": "add", "input": "10+12", "instruction": "", "output": "22"},
        {"task": "pick", "input": "a b c", "instruction": "", "output": "a"},
        {"task": "pick", "input": "d e f", "instruction": "", "output": "e"},
    ]
    greedy = ["21", "23", "b", "x"]
    probabilities = [[0.9], [0.5], [0.2, 0.2, 0.2], [0.8, 0.0, 0.0]]
    sampled = {0: ["21", "21"], 1: ["22", "2"], 2: ["a", "z"], 3: ["d", "d"]}
    out = score(records, greedy, probabilities, sampled)
    assert out["add"]["greedy"] == 50 and out["pick"]["greedy"] == 50 and out["all"]["greedy"] == 50
    assert out["add"]["expected"] == pytest.approx(70) and out["pick"]["expected"] == pytest.approx(70)
    assert out["add"]["sampled"] == pytest.approx(75)  # seed 1: 2/2, seed 2: 1/2
    assert out["pick"]["sampled"] == pytest.approx(75)
    # Uniform mass over the three letters: 3 effective answers, KL 0; all on one letter: 1, KL = ∞-ish.
    assert out["pick"]["answers"] == pytest.approx((3 + 1) / 2, rel=1e-6)
    uniform_kl, point_kl = 0.0, sum((1 / 3) * math.log((1 / 3) / q) for q in (1.0, 1e-12, 1e-12))
    assert out["pick"]["kl_uniform"] == pytest.approx((uniform_kl + point_kl) / 2, rel=1e-6)
    flat = flatten(out)
    assert flat["valid"] == pytest.approx(75) and flat["valid_greedy"] == 50
    assert flat["pick_answers"] == out["pick"]["answers"] and flat["add/expected"] == pytest.approx(70)


def test_answer_probabilities_match_a_direct_computation(tiny_dir):
    """log q(answer, EOS | prompt) by the batched scorer equals one model call per sequence."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdtool.data import DEFAULT_TEMPLATE
    from kdtool.task_eval import answer_distribution

    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "teacher").eval()
    tok = AutoTokenizer.from_pretrained(tiny_dir / "teacher")
    records = make_dataset(8, seed=5)
    got = answer_distribution(model, tok, records, DEFAULT_TEMPLATE)
    for record, probs in zip(records, got, strict=True):
        prompt = DEFAULT_TEMPLATE.format(record["instruction"], record["input"])
        for answer, p in zip(valid_answers(record["task"], record["input"]), probs, strict=True):
            ids = tok(prompt)["input_ids"]
            target = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            with torch.no_grad():
                log_q = torch.log_softmax(model(torch.tensor([ids + target])).logits[0].float(), -1)
            want = sum(log_q[len(ids) - 1 + j, t].item() for j, t in enumerate(target))
            assert math.log(p) == pytest.approx(want, abs=1e-4)


def test_the_tokenizer_is_the_same_under_every_hash_seed_and_matches_the_shipped_teacher():
    """Token ids come from a sorted list, not a set's order (which PYTHONHASHSEED changes): the phrase
    order is the same in every process, and the tokenizer equals the shipped teacher's, so the demo's
    pair always agrees. (Before the fix, seeds 0 and 2 gave different orders.)"""
    import subprocess
    import sys

    from transformers import AutoTokenizer

    from kdtool import demo
    from kdtool.synthetic import TEMPLATE_PHRASES, build_tokenizer

    code = "from kdtool.synthetic import TEMPLATE_PHRASES; print(TEMPLATE_PHRASES)"
    orders = {
        subprocess.run(
            [sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": str(h)}, capture_output=True,
            text=True, check=True,
        ).stdout
        for h in (0, 1, 2, 3)
    }  # fmt: skip
    assert orders == {f"{TEMPLATE_PHRASES}\n"}
    shipped = AutoTokenizer.from_pretrained(demo.shipped_teacher())
    assert shipped.get_vocab() == build_tokenizer().get_vocab()
