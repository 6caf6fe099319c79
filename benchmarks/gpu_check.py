"""The Python parts of ``benchmarks/gpu_check.sh``: checks that need a GPU to mean anything.

Each function returns Markdown lines for the report. All of them also run on CPU at small sizes
(``tests/test_gpu_check.py`` does so), which checks the code, not the GPU numbers.

    python benchmarks/gpu_check.py engine --device cuda --vocab 151936 >> report.md
    python benchmarks/gpu_check.py models --output DIR        # tiny random Qwen2 pair + data
    python benchmarks/gpu_check.py rollout --models DIR --device cuda >> report.md
    python benchmarks/gpu_check.py cuda-vs-cpu --device cuda >> report.md
    python benchmarks/gpu_check.py qwen --device cuda >> report.md   # Qwen2.5 0.5B/1.5B shapes: fkl vs sft
    python benchmarks/gpu_check.py rollout-speed --device cuda >> report.md
    python benchmarks/gpu_check.py compare A B               # max |Δ| of two students' weights
    python benchmarks/gpu_check.py same-eval A.json B.json   # two eval outputs equal but for timings
"""

from __future__ import annotations

import argparse
import sys
import time
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
    from kdtool.heads import LogitHead

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
    from kdtool.data import TokenizedDataset, load_examples
    from kdtool.models import load_model, load_tokenizer
    from kdtool.rollout import prompts_of
    from kdtool.sampling import left_pad, sample

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
        seqs = torch.cat([out.prompt_ids, out.response_ids], dim=1)
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


def cuda_vs_cpu(
    device: torch.device,
    vocab: int = 32_768,
    rows: int = 512,
    hidden: int = 256,
    objectives: tuple[str, ...] = ("fkl", "rkl", "jsd", "sft"),
) -> list[str]:
    """The fused engine on ``device`` (fp32, then bf16 autocast) against the plain loss on CPU in
    fp64, same weights: relative differences of the loss and of the head's gradient."""
    import kdtool
    from kdtool.engine import plain_token_loss_sum, token_loss_sum
    from kdtool.teacher import TeacherSignal

    lines = [
        f"### Fused engine on {device.type} vs the plain loss on CPU (fp64): V = {vocab:,}, N = {rows}, H = {hidden}",
        "",
        "| objective | precision | rel. Δ loss | max rel. Δ grad |",
        "|---|---|---|---|",
    ]
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(vocab, hidden, generator=g, dtype=torch.float64) / hidden**0.5
    t_weight = torch.randn(vocab, hidden, generator=g, dtype=torch.float64) / hidden**0.5
    hidden_cpu = torch.randn(rows, hidden, generator=g, dtype=torch.float64)
    t_hidden = torch.randn(rows, hidden, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (rows,), generator=g)

    def run(
        name: str, dev: torch.device, dtype: torch.dtype, bf16: bool, fn: Any
    ) -> tuple[float, torch.Tensor]:
        head = torch.nn.Linear(hidden, vocab, bias=False, device=dev, dtype=dtype)
        t_head = torch.nn.Linear(hidden, vocab, bias=False, device=dev, dtype=dtype).requires_grad_(False)
        with torch.no_grad():
            head.weight.copy_(weight)
            t_head.weight.copy_(t_weight)
        objective = kdtool.get_objective(name)
        teacher = (
            TeacherSignal.lazy(t_hidden.to(dev, dtype), t_head, vocab)
            if objective.needs_teacher
            else TeacherSignal.none()
        )
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = fn(objective, hidden_cpu.to(dev, dtype), head, teacher, labels.to(dev), vocab)
        loss.backward()
        assert head.weight.grad is not None
        return float(loss), head.weight.grad.double().cpu()

    for name in objectives:
        ref_loss, ref_grad = run(name, torch.device("cpu"), torch.float64, False, plain_token_loss_sum)
        for label, bf16 in (("fp32", False), ("bf16 autocast", True)):
            if bf16 and device.type != "cuda":
                continue
            loss, grad = run(name, device, torch.float32, bf16, token_loss_sum)
            rel_loss = abs(loss - ref_loss) / max(abs(ref_loss), 1e-12)
            rel_grad = float((grad - ref_grad).abs().max() / ref_grad.abs().max().clamp(min=1e-30))
            lines.append(f"| {name} | {label} | {rel_loss:.2e} | {rel_grad:.2e} |")
    return [*lines, ""]


# Qwen2.5 shapes (config.json of Qwen/Qwen2.5-0.5B and -1.5B); random weights.
QWEN_SHAPES = {
    "0.5B": {
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
    },
    "1.5B": {
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
    },
}
TINY_SHAPES = {
    "0.5B": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
    },
    "1.5B": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
    },
}


def _qwen(shape: dict[str, Any], vocab: int, device: torch.device, dtype: torch.dtype, seed: int) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, max_position_embeddings=4096, **shape)
    config._attn_implementation = "sdpa"
    with device:  # initialised where it runs: a 1.5B random init on the host takes ~30 s
        return Qwen2ForCausalLM(config).to(dtype=dtype)


def n_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def qwen_step_speed(
    device: torch.device,
    vocab: int = 151_936,
    batch: int = 4,
    seq: int = 1024,
    steps: int = 4,
    tiny: bool = False,
    peak_tflops: float | None = None,
) -> list[str]:
    """One optimizer step of the trainer's arithmetic (trunk → engine → AdamW, bf16 autocast on
    CUDA, bf16 teacher) at Qwen2.5 0.5B-student / 1.5B-teacher shapes with random weights: peak
    memory, tokens/s and MFU of fkl against SFT of the same student."""
    import kdtool
    from kdtool.chunking import default_chunk_size
    from kdtool.engine import token_loss_sum
    from kdtool.heads import hidden_states, output_head
    from kdtool.teacher import TeacherSignal

    shapes = TINY_SHAPES if tiny else QWEN_SHAPES
    cuda = device.type == "cuda"
    teacher = _qwen(shapes["1.5B"], vocab, device, torch.bfloat16 if cuda else torch.float32, 1).eval()
    teacher.requires_grad_(False)
    if peak_tflops is None and cuda:
        name = torch.cuda.get_device_name(device)
        peak_tflops = 989.0 if ("H100" in name or "H200" in name) else None
    lines = [
        f"### Training step at Qwen2.5 shapes (student 0.5B, teacher 1.5B; random weights; V = {vocab:,}; "
        f"batch {batch} × {seq} tokens; chunk {default_chunk_size(vocab, device)} rows)",
        "",
        "| objective | peak GB | step s | tokens/s | model TFLOP/s | MFU |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("fkl", "sft"):
        student = _qwen(shapes["0.5B"], vocab, device, torch.float32, 2).train()
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
        objective = kdtool.get_objective(name)
        ids = torch.randint(0, vocab, (batch, seq), device=device)
        mask = torch.ones_like(ids)
        labels = ids[:, 1:].reshape(-1)

        def step(
            student: Any = student,
            optimizer: Any = optimizer,
            objective: Any = objective,
            ids: torch.Tensor = ids,
            mask: torch.Tensor = mask,
            labels: torch.Tensor = labels,
        ) -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                signal = TeacherSignal.none()
                if objective.needs_teacher:
                    with torch.no_grad():
                        t_hidden = hidden_states(teacher, ids, mask)[:, :-1].reshape(
                            -1, teacher.config.hidden_size
                        )
                    signal = TeacherSignal.lazy(t_hidden, output_head(teacher), vocab)
                hidden = hidden_states(student, ids, mask)[:, :-1].reshape(-1, student.config.hidden_size)
                loss, _ = token_loss_sum(objective, hidden, output_head(student), signal, labels, vocab)
            (loss.float() / labels.numel()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # warm-up: kernels, AdamW state
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
        seconds = (time.perf_counter() - start) / steps
        peak = torch.cuda.max_memory_allocated(device) / 1e9 if cuda else float("nan")
        tokens = labels.numel()
        # 6 FLOPs per parameter and token for the student (forward + backward), 2 for the teacher.
        flops = 6 * n_params(student) * tokens + (
            2 * n_params(teacher) * tokens if objective.needs_teacher else 0
        )
        tflops = flops / seconds / 1e12
        mfu = f"{tflops / peak_tflops:.1%}" if peak_tflops else "–"
        lines.append(
            f"| {name} | {peak:.2f} | {seconds:.3f} | {tokens / seconds:,.0f} | {tflops:.1f} | {mfu} |"
        )
        del student, optimizer
        if cuda:
            torch.cuda.empty_cache()
    return [*lines, ""]


@torch.no_grad()
def rollout_speed(
    device: torch.device,
    vocab: int = 151_936,
    batch: int = 32,
    prompt: int = 128,
    new_tokens: int = 128,
    tiny: bool = False,
) -> list[str]:
    """minillm's rollout (``kdtool.sampling.sample``: student samples from 0.2·p + 0.8·q, the
    teacher steps along) against HF ``generate`` of the teacher alone, sampled tokens/s, at the
    Qwen2.5 shapes (random weights, EOS disabled so every row samples ``new_tokens``)."""
    from kdtool.sampling import sample

    shapes = TINY_SHAPES if tiny else QWEN_SHAPES
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    teacher = _qwen(shapes["1.5B"], vocab, device, dtype, 1).eval()
    student = _qwen(shapes["0.5B"], vocab, device, torch.float32, 2).eval()
    ids = torch.randint(0, vocab, (batch, prompt), device=device)
    mask = torch.ones_like(ids)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    g = torch.Generator(device=device).manual_seed(0)

    def minillm() -> None:
        with autocast:
            sample(
                student,
                ids,
                mask,
                eos_token_id=None,
                pad_token_id=0,
                max_new_tokens=new_tokens,
                teacher=teacher,
                alpha=0.2,
                generator=g,
                vocab_size=vocab,
            )

    def hf_teacher() -> None:
        teacher.generate(
            ids,
            attention_mask=mask,
            do_sample=True,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
            eos_token_id=None,
        )

    lines = [
        f"### Rollout tokens/s (batch {batch}, prompt {prompt}, {new_tokens} new tokens, V = {vocab:,})",
        "",
        "| sampler | s | sampled tokens/s |",
        "|---|---|---|",
    ]
    for name, fn in (
        ("kdtool minillm rollout (student + teacher, α = 0.2)", minillm),
        ("HF generate, teacher alone", hf_teacher),
    ):
        fn()  # warm-up
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        lines.append(f"| {name} | {seconds:.2f} | {batch * new_tokens / seconds:,.0f} |")
    return [*lines, ""]


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
    cc = sub.add_parser("cuda-vs-cpu")
    cc.add_argument("--device", default="cuda")
    q = sub.add_parser("qwen")
    q.add_argument("--device", default="cuda")
    q.add_argument("--tiny", action="store_true", help="Tiny shapes (a CPU dry run).")
    q.add_argument("--seq", type=int, default=1024)
    ro = sub.add_parser("rollout-speed")
    ro.add_argument("--device", default="cuda")
    ro.add_argument("--tiny", action="store_true", help="Tiny shapes (a CPU dry run).")
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
    elif args.cmd == "cuda-vs-cpu":
        print("\n".join(cuda_vs_cpu(torch.device(args.device))))
    elif args.cmd == "qwen":
        vocab = 2048 if args.tiny else 151_936
        lines = qwen_step_speed(torch.device(args.device), vocab=vocab, seq=args.seq, tiny=args.tiny)
        print("\n".join(lines))
    elif args.cmd == "rollout-speed":
        vocab = 2048 if args.tiny else 151_936
        print("\n".join(rollout_speed(torch.device(args.device), vocab=vocab, tiny=args.tiny)))
    elif args.cmd == "same-eval":
        print(same_eval(args.a, args.b))
    else:
        print(f"{max_weight_difference(args.a, args.b):.3e}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
