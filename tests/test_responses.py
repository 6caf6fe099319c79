"""Where responses come from (``--responses``, ``--on-policy-fraction``): the student's samples
(on-policy, GKD), the teacher's (sequence-level KD), or the data's, mixed reproducibly."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from kdtool.config import resolve
from kdtool.context import RunSettings, StepContext
from kdtool.data import BatchLoader, TokenizedDataset, load_examples
from kdtool.errors import UserError
from kdtool.models import load_model, load_tokenizer
from kdtool.registry import get_objective
from kdtool.responses import ResponseStream
from kdtool.rollout import prompts_of
from kdtool.sampling import left_pad, sample
from kdtool.steps import TokenStep

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: 1 thread is fastest, and exact


def make_ctx(tiny_dir, **settings) -> tuple[StepContext, BatchLoader]:
    tokenizer = load_tokenizer(str(tiny_dir / "student"))
    ctx = StepContext(
        student=load_model(str(tiny_dir / "student")),
        teacher=load_model(str(tiny_dir / "teacher")).eval().requires_grad_(False),
        teacher_cache=None,
        tokenizer=tokenizer,
        vocab_size=len(tokenizer),
        device=torch.device("cpu"),
        chunk_size=5,  # several chunks, a short last one
        generator=torch.Generator().manual_seed(0),
        settings=RunSettings(**{"max_new_tokens": 8, "max_length": 96, "seed": 3, **settings}),
    )
    dataset = TokenizedDataset(load_examples(str(tiny_dir / "data" / "train.jsonl")), tokenizer, 96, None)
    return ctx, BatchLoader(dataset, 4, seed=3)


def full_logit_loss(name, ctx, batch, **options):
    """Reference: the objective on the whole [B, T, V] logits of both models, plain autograd."""
    student = ctx.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        teacher = ctx.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    s, t, y = student[:, :-1][mask].double(), teacher[:, :-1][mask].double(), labels[mask]
    log_q, log_p = s.log_softmax(-1), t.log_softmax(-1)
    if name == "fkl":
        per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    else:  # jsd with beta: β·KL(p‖m) + (1−β)·KL(q‖m), m = β·p + (1−β)·q
        beta = options["beta"]
        log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), 0)
        per_token = beta * (log_p.exp() * (log_p - log_m)).sum(-1) + (1 - beta) * (
            log_q.exp() * (log_q - log_m)
        ).sum(-1)
    assert y.numel() > 0
    return per_token.sum()


@pytest.mark.parametrize(("name", "options"), [("fkl", {}), ("jsd", {"beta": 0.3})])
def test_on_policy_loss_and_gradient_equal_autograd_on_the_sampled_sequences(tiny_dir, name, options):
    ctx, loader = make_ctx(tiny_dir, student_share=1.0)
    batch = next(ResponseStream(loader, ctx))
    ctx.student.double(), ctx.teacher.double()  # float64 both ways: the comparison is exact, not fp32's
    objective = get_objective(name, **options)
    loss, count, _ = TokenStep(objective).loss(ctx, batch)
    grads = torch.autograd.grad(loss, list(ctx.student.parameters()))
    ref = full_logit_loss(name, ctx, batch, **options)
    ref_grads = torch.autograd.grad(ref, list(ctx.student.parameters()))
    assert int(count) == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(loss.double(), ref, rtol=1e-7, atol=1e-12)  # the step returns fp32
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("source", ["student", "teacher"])
def test_sampled_batches_hold_exactly_the_models_samples(tiny_dir, source):
    """On-policy: the student's samples; seq-KD: the teacher's, as ``sample`` draws them with the same
    generator state, labelled from the first sampled token to the first EOS (prompts untouched)."""
    settings = {"student_share": 1.0} if source == "student" else {"responses": "teacher"}
    ctx, loader = make_ctx(tiny_dir, **settings)
    data = next(iter(BatchLoader(loader.dataset, 4, seed=3)))
    batch = next(ResponseStream(loader, ctx))
    prompts = prompts_of(data)
    ids, mask = left_pad(prompts, ctx.pad_id)
    model = ctx.student if source == "student" else ctx.teacher
    rollout = sample(
        model, ids, mask, eos_token_id=ctx.tokenizer.eos_token_id, pad_token_id=ctx.pad_id, max_new_tokens=8,
        generator=torch.Generator().manual_seed(0), vocab_size=ctx.vocab_size,
    )  # fmt: skip
    for row, prompt in enumerate(prompts):
        response = rollout.response_ids[row][rollout.response_mask[row]]
        n = len(prompt) + len(response)
        assert torch.equal(batch["input_ids"][row, :n], torch.cat([prompt, response]))
        assert (batch["labels"][row, : len(prompt)] == -100).all()
        assert torch.equal(batch["labels"][row, len(prompt) : n], response)
        assert (batch["labels"][row, n:] == -100).all() and not batch["attention_mask"][row, n:].any()


def test_the_mix_picks_sources_in_proportion_reproducibly_and_resumes(tiny_dir):
    ctx, loader = make_ctx(tiny_dir, student_share=0.25)
    flips = lambda stream, n: [stream.source() for _ in range(n)]  # noqa: E731
    a = flips(ResponseStream(loader, ctx), 4000)
    assert set(a) == {"student", "reference"}
    share = a.count("student") / len(a)
    assert abs(share - 0.25) < 3 * (0.25 * 0.75 / 4000) ** 0.5, share
    assert flips(ResponseStream(loader, ctx), 4000) == a  # from the seed alone
    stream = ResponseStream(loader, ctx)
    flips(stream, 100)
    saved = stream.state_dict()
    rest = flips(stream, 50)
    again = ResponseStream(loader, ctx)
    again.load_state_dict(saved)
    assert flips(again, 50) == rest == a[100:150]
    other_seed, _ = make_ctx(tiny_dir, student_share=0.25, seed=4)
    assert flips(ResponseStream(loader, other_seed), 4000) != a
    teacher_rest, _ = make_ctx(tiny_dir, student_share=0.5, responses="teacher")
    assert set(flips(ResponseStream(loader, teacher_rest), 200)) == {"student", "teacher"}


def flags(tiny_dir, **overrides):
    base = dict(teacher=str(tiny_dir / "teacher"), student=str(tiny_dir / "student"), data="d", output="o")
    return base | overrides


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"objective": "minillm", "responses": "student"}, "samples its own responses"),
        (
            {"objective": "fkl", "responses": "student", "teacher": None, "teacher_cache": "c"},
            "teacher-cache",
        ),
        ({"objective": "sft", "on_policy_fraction": 0.5}, "teaches nothing"),
        ({"objective": "sft", "responses": "teacher", "teacher": None}, "need a live --teacher"),
    ],
)
def test_settings_that_cannot_work_are_refused_with_the_config(tiny_dir, overrides, message):
    with pytest.raises(UserError, match=message):
        resolve(None, flags(tiny_dir, **overrides))


def test_student_share_defaults(tiny_dir):
    assert resolve(None, flags(tiny_dir, objective="rkl", responses="student")).student_share == 1.0
    assert resolve(None, flags(tiny_dir, objective="rkl")).student_share == 0.0
    cfg = resolve(None, flags(tiny_dir, objective="rkl", responses="teacher", on_policy_fraction=0.5))
    assert cfg.student_share == 0.5 and cfg.responses == "teacher"
    sft = resolve(None, flags(tiny_dir, objective="sft", responses="teacher"))  # seq-KD with plain CE
    assert sft.student_share == 0.0


def test_prompt_only_data_trains_when_every_response_is_sampled(tiny_dir, tmp_path):
    """Records without a response are accepted when no micro-batch reads the data's responses."""
    import json

    from kdtool import trainer

    prompts = tmp_path / "prompts.jsonl"
    lines = [json.loads(x) for x in (tiny_dir / "data" / "train.jsonl").read_text().splitlines()][:16]
    prompts.write_text(
        "".join(json.dumps({"instruction": r["instruction"], "input": r["input"]}) + "\n" for r in lines)
    )
    run = dict(
        flags(tiny_dir, objective="rkl", data=str(prompts), eval_data=str(tiny_dir / "data" / "test.jsonl")),
        output=str(tmp_path / "run"), batch_size=4, max_steps=2, max_new_tokens=4, max_length=80, progress=False,
    )  # fmt: skip
    for responses in ({"responses": "student"}, {"responses": "teacher", "objective": "sft"}):
        out = trainer.train(resolve(None, run | responses), overwrite=True)
        assert (out / "model.safetensors").is_file()
    with pytest.raises(UserError, match="missing field 'output'"):  # the references are read: refused
        resolve_and_load = resolve(None, run | {"on_policy_fraction": 0.5})
        trainer.train(resolve_and_load, overwrite=True)


class ScriptLM(torch.nn.Module):
    """A causal LM that emits a fixed script, one token per position after the prompt."""

    def __init__(self, script, vocab):
        super().__init__()
        self.script, self.vocab = script, vocab
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(
        self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False
    ):
        seen = input_ids if past_key_values is None else torch.cat([past_key_values, input_ids], 1)
        logits = torch.full((input_ids.shape[0], input_ids.shape[1], self.vocab), -30.0)
        logits[:, -1, self.script[seen.shape[1] - 1]] = 30.0  # the prompt is one token
        return SimpleNamespace(logits=logits, past_key_values=seen)


def test_sampling_stops_at_the_chat_templates_end_of_turn():
    """A sampled answer ends at EOS or at the template's end-of-turn token (ChatML's <|im_end|>)."""
    from kdtool.chat import end_of_turn_ids
    from test_chat import chatml_tokenizer

    tok = chatml_tokenizer()
    (eot,) = end_of_turn_ids(tok)
    assert tok.convert_ids_to_tokens(eot) == "<|im_end|>"
    assert end_of_turn_ids(chatml_tokenizer(template=None)) == []
    model = ScriptLM([2, eot, 2, 2, 2], vocab=eot + 1)  # says 2, then end of turn, then runs on
    ids, mask = torch.tensor([[1]]), torch.ones(1, 1, dtype=torch.long)
    common = dict(
        eos_token_id=0, pad_token_id=0, max_new_tokens=4, generator=torch.Generator().manual_seed(0)
    )
    stopped = sample(model, ids, mask, stop_token_ids=[eot], **common)
    assert stopped.response_ids[0][stopped.response_mask[0]].tolist() == [2, eot]
    running = sample(model, ids, mask, **common)
    assert int(running.response_mask.sum()) == 4  # without it, the answer runs on


def test_generate_keeps_the_teachers_answers_as_training_data(tiny_dir, tmp_path, cli):
    """`kdtool generate` (offline sequence-level KD): one answer per prompt, written as records that
    `kdtool distill --data` reads back with the same prompts; greedy answers are the model's own."""
    import json

    from kdtool.data import load_examples
    from kdtool.evaluation.generate import Sampling, generate
    from kdtool.evaluation.rougel import encode_eval_prompts, load_for_eval

    data = tmp_path / "prompts.jsonl"
    rows = [json.loads(x) for x in (tiny_dir / "data" / "test.jsonl").read_text().splitlines()][:5]
    data.write_text(
        "".join(json.dumps({"instruction": r["instruction"], "input": r["input"]}) + "\n" for r in rows)
    )
    out = tmp_path / "teacher.jsonl"
    teacher = str(tiny_dir / "teacher")
    code, text = cli(
        "generate", "--model", teacher, "--data", data, "--output", out, "--greedy", "--max-new-tokens", "6"
    )
    assert code == 0 and "wrote 5 answers" in text
    written = load_examples(out)
    prompts = load_examples(data, prompts_only=True)
    assert [e.prompt for e in written] == [e.prompt for e in prompts]
    model, tok = load_for_eval(teacher, "cpu")
    _, ids, _ = encode_eval_prompts(prompts, tok, None, None)
    want = generate(model, tok, ids, Sampling(greedy=True, max_new_tokens=6), None).predictions
    assert [e.response for e in written] == want
    code, text = cli("generate", "--model", teacher, "--data", data, "--output", out)
    assert code == 1 and "already exists" in text
