"""The Python parts of ``benchmarks/gpu_check.sh``: checks that need a GPU to mean anything.

Each function returns Markdown lines for the report. All of them also run on CPU at small sizes
(``tests/test_gpu_check.py`` does so), which checks the code, not the GPU numbers.

    python benchmarks/gpu_check.py engine --device cuda --vocab 151936 >> report.md
    python benchmarks/gpu_check.py models --output DIR        # tiny random Qwen2 pair + data
    python benchmarks/gpu_check.py rollout --models DIR --device cuda >> report.md
    python benchmarks/gpu_check.py compare A B               # max |Δ| of two students' weights
    python benchmarks/gpu_check.py same-eval A.json B.json   # two eval outputs equal but for timings
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

PAD_TO = 128  # embedding rows are padded past the tokenizer (Qwen2.5: 151,936 -> 152,064 for 7B)


def padded(vocab: int) -> int:
    return -(-vocab // PAD_TO) * PAD_TO + PAD_TO


def _peak(device: torch.device, fn: Any) -> tuple[Any, float]:
    """``fn()``'s result and its peak memory above what was allocated before (MB; CUDA only)."""
    if device.type != "cuda":
        return fn(), float("nan")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    return out, (torch.cuda.max_memory_allocated(device) - before) / 2**20


def engine_parity(
    device: torch.device,
    vocab: int = 151_936,
    rows: int = 2048,
    hidden: int = 896,
    teacher_hidden: int = 1536,
    objectives: tuple[str, ...] = ("fkl", "rkl", "jsd", "atkd", "slim"),
    softcap: float = 30.0,
) -> list[str]:
    """Chunked engine vs plain autograd on the trainer's set-up: fp32 student whose soft-capped
    output layer is tied to its input embedding, bf16 lazy teacher (soft-capped too), both padded
    past ``vocab`` rows, bf16 autocast on CUDA. Gradients compared in fp32."""
    import kdtool
    from kdtool.models import LogitHead

    cuda = device.type == "cuda"
    rows_v = padded(vocab)
    teacher_dtype = torch.bfloat16 if cuda else torch.float32
    lines = [
        f"### Engine parity (V = {vocab:,}, padded to {rows_v:,}; N = {rows}, H = {hidden}, "
        f"teacher H = {teacher_hidden}; tied, soft-cap {softcap}; teacher {teacher_dtype})",
        "",
        "| objective | loss chunked | loss plain | rel. Δ loss | max rel. Δ grad (fp32) | peak MB chunked | peak MB plain |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in objectives:
        torch.manual_seed(0)
        embed = torch.nn.Embedding(rows_v, hidden, device=device)
        linear = torch.nn.Linear(hidden, rows_v, bias=False, device=device)
        linear.weight = embed.weight  # tied: the gradient reaches one matrix from both ends
        head = LogitHead(linear, softcap=softcap)
        t_linear = torch.nn.Linear(teacher_hidden, rows_v, bias=False, device=device, dtype=teacher_dtype)
        t_head = LogitHead(t_linear.requires_grad_(False), softcap=softcap)
        ids = torch.randint(0, vocab, (rows,), device=device)
        labels = torch.randint(0, vocab, (rows,), device=device)
        t_hidden = torch.randn(rows, teacher_hidden, device=device, dtype=teacher_dtype)
        objective = kdtool.get_objective(name)
        parts = (objective, embed, head, t_hidden, t_head, ids, labels, vocab, cuda)
        (loss_c, grad_c), mem_c = _peak(device, lambda parts=parts: _loss_and_grad(*parts, chunked=True))
        (loss_p, grad_p), mem_p = _peak(device, lambda parts=parts: _loss_and_grad(*parts, chunked=False))
        rel_loss = abs(loss_c - loss_p) / max(abs(loss_p), 1e-12)
        rel_grad = float((grad_c - grad_p).abs().max() / grad_p.abs().max().clamp(min=1e-30))
        lines.append(
            f"| {name} | {loss_c:.6g} | {loss_p:.6g} | {rel_loss:.2e} | {rel_grad:.2e} | {mem_c:.0f} | {mem_p:.0f} |"
        )
        del embed, linear, t_linear, grad_c, grad_p
        if cuda:
            torch.cuda.empty_cache()
    return [*lines, ""]


def _loss_and_grad(
    objective: Any,
    embed: torch.nn.Embedding,
    head: Any,
    t_hidden: torch.Tensor,
    t_head: Any,
    ids: torch.Tensor,
    labels: torch.Tensor,
    vocab: int,
    cuda: bool,
    chunked: bool,
) -> tuple[float, torch.Tensor]:
    """Loss sum and the fp32 gradient of the tied matrix, through the engine or plain autograd."""
    from kdtool.engine import plain_token_loss_sum, token_loss_sum
    from kdtool.teacher import TeacherSignal

    embed.weight.grad = None
    teacher = TeacherSignal.lazy(t_hidden, t_head, vocab)
    with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
        h = torch.tanh(embed(ids))  # [N, H]: the trunk's output depends on the tied matrix too
        run = token_loss_sum if chunked else plain_token_loss_sum
        loss, _ = run(objective, h, head, teacher, labels, vocab)
    (loss.float() / ids.numel()).backward()
    assert embed.weight.grad is not None
    return float(loss.detach()), embed.weight.grad.float().clone()


def make_models(root: Path, n_train: int = 256, n_test: int = 32) -> None:
    """A tiny random Qwen2 teacher and student sharing the built-in task's tokenizer (embedding
    rows padded past it, tied embeddings in the student) and the built-in data, under ``root``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from kdtool.synthetic import build_tokenizer, write_dataset

    tok = build_tokenizer()
    write_dataset(root / "data", n_train=n_train, n_test=n_test, seed=0)
    for name, size, layers, seed, tied in (("teacher", 64, 2, 1, False), ("student", 32, 1, 2, True)):
        torch.manual_seed(seed)
        config = Qwen2Config(
            vocab_size=padded(len(tok)),
            hidden_size=size,
            intermediate_size=2 * size,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=tied,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.eos_token_id,
        )
        Qwen2ForCausalLM(config).save_pretrained(root / name)
        tok.save_pretrained(root / name)


@torch.no_grad()
def rollout_logprobs(
    models: Path, device: torch.device, batch: int = 16, max_new_tokens: int = 48
) -> list[str]:
    """minillm's sampling-time log q (KV cache, bf16 autocast on CUDA, as the trainer samples)
    against a full forward over the sampled sequences (no cache, same autocast): the PPO ratio at
    θ = θ_old should be 1, so the clip fraction of the first inner epoch should be ~0."""
    from kdtool.objectives.minillm import prompts_of

    from kdtool.data import TokenizedDataset, load_examples
    from kdtool.models import load_model, load_tokenizer
    from kdtool.rollout import left_pad, sample

    cuda = device.type == "cuda"
    tok = load_tokenizer(str(models / "student"))
    student = load_model(str(models / "student"), device).eval()
    teacher_dtype = torch.bfloat16 if cuda else torch.float32
    teacher = load_model(str(models / "teacher"), device, teacher_dtype).eval()
    dataset = TokenizedDataset(load_examples(models / "data" / "train.jsonl"), tok, 256, None)
    ids, mask = left_pad(prompts_of(dataset.batch(list(range(batch)))), tok.pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    g = torch.Generator(device=device).manual_seed(0)
    with autocast:
        out = sample(
            student,
            ids,
            mask,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            max_new_tokens=max_new_tokens,
            teacher=teacher,
            alpha=0.2,
            generator=g,
            vocab_size=len(tok),
        )
        seqs = out.sequences
        full_mask = torch.cat([mask, out.response_mask.long()], 1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        logits = student(input_ids=seqs, attention_mask=full_mask, position_ids=positions).logits
    p = ids.shape[1]
    log_q = torch.log_softmax(logits[:, p - 1 : -1, : len(tok)].float(), dim=-1)
    recomputed = log_q.gather(-1, out.response_ids[..., None]).squeeze(-1)
    valid = out.response_mask
    delta = (recomputed - out.student_logprobs).abs()[valid]
    ratio = (recomputed - out.student_logprobs).exp()[valid]
    clipped = ((ratio - 1).abs() > 0.2).float().mean()
    return [
        f"### minillm rollout log-probs (KV cache, {'bf16 autocast' if cuda else 'fp32'}) vs full-forward recompute",
        "",
        f"- {int(valid.sum())} sampled tokens over {batch} prompts: max |Δ log q| = {float(delta.max()):.3e}, "
        f"mean {float(delta.mean()):.3e}",
        f"- share of tokens whose ratio q_recompute/q_rollout leaves [0.8, 1.2] (what PPO would clip in the "
        f"first inner epoch, at θ = θ_old): {float(clipped):.4f}",
        "",
    ]


def max_weight_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


TIMING_KEYS = {"wall_s", "examples_per_s", "new_tokens_per_s"}


def _untimed(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def same_eval(a: Path, b: Path) -> str:
    """Whether two ``kdtool eval rougel --output`` files agree on everything but their timings."""
    import json

    ja, jb = (_untimed(json.loads(p.read_text())) for p in (a, b))
    score = ja.get("summary", {}).get("rougeL", {}).get("mean")
    if ja == jb:
        return f"- the two runs agree on every score and prediction (Rouge-L {score})"
    return f"- **the two runs differ** (Rouge-L {score} vs {jb.get('summary', {}).get('rougeL', {}).get('mean')})"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("engine")
    e.add_argument("--device", default="cuda")
    e.add_argument("--vocab", type=int, default=151_936)
    e.add_argument("--rows", type=int, default=2048)
    m = sub.add_parser("models")
    m.add_argument("--output", type=Path, required=True)
    r = sub.add_parser("rollout")
    r.add_argument("--models", type=Path, required=True)
    r.add_argument("--device", default="cuda")
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    s = sub.add_parser("same-eval")
    s.add_argument("a", type=Path)
    s.add_argument("b", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "engine":
        print("\n".join(engine_parity(torch.device(args.device), args.vocab, args.rows)))
    elif args.cmd == "models":
        make_models(args.output)
    elif args.cmd == "rollout":
        print("\n".join(rollout_logprobs(args.models, torch.device(args.device))))
    elif args.cmd == "same-eval":
        print(same_eval(args.a, args.b))
    else:
        print(f"{max_weight_difference(args.a, args.b):.3e}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
