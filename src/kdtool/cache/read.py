"""Read a finished cache for training: open it, check it matches the run, and serve each
batch's sparse teacher from memory-mapped shards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from kdtool.cache.codec import VALUE_DTYPES, decode_rows, indices_to
from kdtool.cache.config import describe_mismatch, identity, token_hash
from kdtool.cache.manifest import FORMAT, MANIFEST, read_manifest
from kdtool.data_config import DataConfig
from kdtool.errors import UserError
from kdtool.targets import shifted_targets
from kdtool.teacher import TeacherSignal


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


class TeacherCache:
    """A finished cache opened for training: ``signal_for(batch)`` gives the batch's sparse teacher.

    Shards are memory-mapped; only the rows of the batch's examples are read.
    """

    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.root, self.manifest = root, manifest
        self.vocab_size: int = manifest["vocab_size"]
        self.k: int = manifest["k"]
        self._handles: dict[int, Any] = {}
        shard_of, start, count, hashes = [], [], [], []
        for i in range(len(manifest["shards"])):
            counts, shard_hashes = self._shard_index(i)
            hashes.extend(shard_hashes)
            offsets = [0]
            for c in counts[:-1]:
                offsets.append(offsets[-1] + c)
            shard_of += [i] * len(counts)
            start += offsets
            count += counts
        self._shard_of, self._start, self._count, self._hash = shard_of, start, count, hashes

    @classmethod
    def open(cls, path: str | Path, tokenizer: Any = None, config: DataConfig | None = None) -> TeacherCache:
        """Open a cache and, given the run's tokenizer and data-side config (its ``DistillConfig``),
        check that it matches.

        Raises:
            UserError: no/unfinished cache, or one built for another tokenizer, data file,
                template or length limit (one line naming what differs).
        """
        root = Path(path)
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise UserError(f"--teacher-cache {root}: no {MANIFEST} (build one with `kdtool cache-logits`)")
        manifest = read_manifest(manifest_path)
        if manifest.get("format") != FORMAT:
            raise UserError(f"--teacher-cache {root}: unknown cache format {manifest.get('format')!r}")
        if not manifest.get("complete"):
            raise UserError(
                f"--teacher-cache {root} is unfinished; complete it with `kdtool cache-logits --resume`"
            )
        if tokenizer is not None and config is not None:
            wanted = identity(tokenizer, config)
            diffs = describe_mismatch(manifest, wanted)
            if diffs:
                raise UserError(f"--teacher-cache {root} does not match this run: {'; '.join(diffs)}")
        return cls(root, manifest)

    def __len__(self) -> int:
        return len(self._count)

    def _shard_path(self, i: int) -> Path:
        return self.root / self.manifest["shards"][i]["file"]

    def _shard_index(self, i: int) -> tuple[list[int], list[int]]:
        """Response tokens and token hash per example of shard ``i`` (one line per damaged shard)."""
        try:
            f = self._shard(i)
            return f.get_tensor("counts").tolist(), f.get_tensor("token_hash").tolist()
        except SafetensorError as exc:
            raise UserError(f"{self._shard_path(i)}: {_first_line(exc)}") from exc

    def _shard(self, i: int) -> Any:
        if i not in self._handles:
            path = self._shard_path(i)
            try:
                self._handles[i] = safe_open(str(path), "pt")
            except FileNotFoundError as exc:
                raise UserError(f"{path}: shard listed in {MANIFEST} is missing") from exc
            except (SafetensorError, OSError) as exc:
                raise UserError(f"{path}: not a readable safetensors shard ({_first_line(exc)})") from exc
        return self._handles[i]

    def rows(self, example: int) -> tuple[Tensor, Tensor, Tensor]:
        try:
            return self._rows(example)
        except SafetensorError as exc:  # e.g. a shard truncated after it was opened
            path = self._shard_path(self._shard_of[example])
            raise UserError(f"{path}: {_first_line(exc)}") from exc

    def _rows(self, example: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(values [n, k], indices [n, k], log_normalizer [n])`` of one example: values in their
        stored float dtype (q8 decoded to fp32), indices in their stored integer dtype."""
        a = self._start[example]
        return decode_rows(
            self._shard(self._shard_of[example]), a, a + self._count[example], self.manifest["value_dtype"]
        )

    def signal_for(self, batch: dict[str, Tensor]) -> TeacherSignal:
        """The sparse teacher for ``batch``'s target positions, in the row-major order of
        ``labels[:, 1:] != -100`` (what the trainer's token engine uses).

        Args:
            batch: ``input_ids``/``attention_mask``/``labels`` ``[B, T]`` and ``index`` ``[B]``
                (the examples' positions in the data file).
        """
        device = batch["labels"].device
        # One device-to-host copy per tensor for the whole batch, not one sync per row.
        ids = batch["input_ids"].cpu()
        n_rows = shifted_targets(batch["labels"])[1].sum(1).tolist()
        lengths = batch["attention_mask"].sum(1).tolist()
        parts = []
        for row, example in enumerate(batch["index"].tolist()):
            if n_rows[row] == 0:  # nothing to score (e.g. a masked stand-in batch)
                continue
            self._check(example, n_rows[row], ids[row, : lengths[row]].tolist())
            parts.append(self.rows(example))
        if not parts:
            values = torch.empty(
                0, self.k, dtype=VALUE_DTYPES.get(self.manifest["value_dtype"], torch.float32)
            )
            return TeacherSignal.sparse(
                values.to(device),
                torch.empty(0, self.k, dtype=torch.long, device=device),
                self.vocab_size,
                torch.empty(0, device=device),
            )
        values, indices, lse = (torch.cat(p) for p in zip(*parts, strict=True))
        return TeacherSignal.sparse(
            values.to(device), indices_to(indices, device), self.vocab_size, lse.to(device)
        )

    def _check(self, example: int, n_rows: int, ids: list[int]) -> None:
        if not 0 <= example < len(self._count):
            raise UserError(
                f"--teacher-cache {self.root} holds {len(self._count)} examples, not example {example}"
            )
        if self._count[example] != n_rows or self._hash[example] != token_hash(ids):
            raise UserError(
                f"--teacher-cache {self.root}: example {example}'s tokens differ from the cached ones "
                "(was the data, tokenizer, template or max length changed?)"
            )
