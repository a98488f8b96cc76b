"""The teacher's next-token distributions, computed once per training token and shared by every method.

Distillation from the uncompressed model is the supervision of every repair method (single prompt, bank
prompts, LoRA). Running the teacher inside each training step doubles its cost and lets methods see subtly
different targets; instead the base model's distribution at every position of every training block is stored
once, truncated to its top-k tokens plus one "tail" bucket holding the rest of the probability mass, as
safetensors shards keyed by a digest of the token ids and of the teacher's weights. Training then pays no
teacher forward, and every method is supervised by the same numbers.

The truncated KL (teacher's top-k + tail vs the student's mass on the same k tokens + the rest) is the KL
between the two distributions coarsened to k+1 outcomes: it never exceeds the full KL and equals it when
k covers the vocabulary. With k=64 the tail holds little mass for a 135M model on English text.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import PreTrainedModel

DEFAULT_TOP_K = 64
SHARD_BLOCKS = 64
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TeacherTargets:
    """Teacher targets for blocks [B, n]: position i (< n-1) predicts token i+1, as in `train.prompt_loss`."""

    topk_logprobs: torch.Tensor  # [B, n-1, k] float32, log p of the k most likely tokens
    topk_ids: torch.Tensor  # [B, n-1, k] int64
    tail_logprob: torch.Tensor  # [B, n-1] float32, log of the mass outside the top k (-inf when none)

    def to(self, device: torch.device | str) -> TeacherTargets:
        return TeacherTargets(self.topk_logprobs.to(device), self.topk_ids.to(device), self.tail_logprob.to(device))


def truncate(logits: torch.Tensor, k: int) -> TeacherTargets:
    """Top-k log-probabilities and tail mass of next-token logits [B, T, V] (T positions already chosen)."""
    logprobs = logits.float().log_softmax(-1)
    k = min(k, logprobs.shape[-1])
    top, ids = logprobs.topk(k, dim=-1)
    return TeacherTargets(top, ids, outside(logprobs, ids))


def outside(logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside `ids` (summed directly, not as 1 - the top mass, which cancels
    catastrophically when the top holds nearly everything); -inf when `ids` covers the vocabulary."""
    if ids.shape[-1] >= logprobs.shape[-1]:
        return torch.full(logprobs.shape[:-1], float("-inf"), device=logprobs.device)
    return logprobs.scatter(-1, ids, float("-inf")).logsumexp(-1)


@torch.no_grad()
def teacher_targets(teacher: PreTrainedModel, ids: torch.Tensor, k: int = DEFAULT_TOP_K) -> TeacherTargets:
    """The live teacher's targets for token blocks `ids` [B, n] (what the cache stores)."""
    return truncate(teacher(input_ids=ids).logits[:, :-1], k)


def kd_loss(student_logits: torch.Tensor, targets: TeacherTargets) -> torch.Tensor:
    """Per-example KL(teacher || student) over the k+1 coarsened outcomes, summed per position, averaged over
    positions: [B]. `student_logits` [B, n-1, V] are the prompted student's logits at the text positions."""
    student = student_logits.float().log_softmax(-1)
    student_top = student.gather(-1, targets.topk_ids)
    top = (targets.topk_logprobs.exp() * (targets.topk_logprobs - student_top)).sum(-1)
    if targets.topk_ids.shape[-1] >= student.shape[-1]:
        return top.mean(dim=-1)  # no tail: the full KL
    tail_p = targets.tail_logprob.exp()
    # xlogy: a teacher tail that underflowed to 0 contributes 0, not 0 * -inf
    return (top + torch.special.xlogy(tail_p, tail_p) - tail_p * outside(student, targets.topk_ids)).mean(dim=-1)


def blocks_digest(blocks: torch.Tensor) -> str:
    """sha256 of token blocks [N, n] (shape and int64 values)."""
    digest = hashlib.sha256(json.dumps(list(blocks.shape)).encode())
    digest.update(blocks.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


class CacheError(RuntimeError):
    """A cache shard is missing, incomplete or was made for other blocks, teacher or k."""


class TeacherCache:
    """Teacher targets for fixed token blocks, in shards of `SHARD_BLOCKS` blocks under `root/<key>/`.

    The key digests the blocks, the teacher's weights digest and k: another corpus, tokenizer, block length or
    teacher gets another folder, so a cache can never supervise text it was not computed on. `build` is
    resumable: shards already written (atomically) are kept.
    """

    def __init__(
        self,
        root: Path,
        blocks: torch.Tensor,
        teacher_digest: str,
        k: int = DEFAULT_TOP_K,
        shard_blocks: int = SHARD_BLOCKS,
    ) -> None:
        self.blocks, self.k, self.shard_blocks = blocks, k, shard_blocks
        self.meta = {
            "format": str(FORMAT_VERSION),
            "blocks_sha256": blocks_digest(blocks),
            "teacher_sha256": teacher_digest,
            "k": str(k),
            "shard_blocks": str(shard_blocks),
        }
        key = hashlib.sha256(json.dumps(self.meta, sort_keys=True).encode()).hexdigest()[:16]
        self.folder = root / f"teacher-k{k}-{key}"
        self._open: dict[int, object] = {}

    @property
    def num_shards(self) -> int:
        return math.ceil(len(self.blocks) / self.shard_blocks)

    def shard_path(self, shard: int) -> Path:
        return self.folder / f"shard-{shard:05d}.safetensors"

    def missing(self) -> list[int]:
        return [s for s in range(self.num_shards) if not self.shard_path(s).exists()]

    def complete(self) -> bool:
        return not self.missing()

    def build(
        self, teacher: PreTrainedModel, batch_size: int = 8, progress: bool = True, shards: list[int] | None = None
    ) -> Path:
        """Compute the missing shards (or those of `shards`) with `teacher`, whose weights the digest must
        describe; return the folder. In shard order, so the first training blocks are served first."""
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "meta.json").write_text(json.dumps(self.meta, indent=1))
        device = next(teacher.parameters()).device
        todo = self.missing() if shards is None else shards
        for shard in tqdm(todo, desc="teacher cache", unit="shard", disable=not progress):
            if shards is None and self.shard_path(shard).exists():
                continue  # another process building the same cache (two runs sharing a source) wrote it meanwhile
            rows = self.blocks[shard * self.shard_blocks : (shard + 1) * self.shard_blocks]
            parts = [
                teacher_targets(teacher, rows[i : i + batch_size].to(device), self.k).to("cpu")
                for i in range(0, len(rows), batch_size)
            ]
            tensors = {
                "ids": rows.to(torch.int32).contiguous(),
                "topk_logprobs": torch.cat([p.topk_logprobs for p in parts]).contiguous(),
                "topk_ids": torch.cat([p.topk_ids for p in parts]).to(torch.int32).contiguous(),
                "tail_logprob": torch.cat([p.tail_logprob for p in parts]).contiguous(),
            }
            partial = self.shard_path(shard).with_suffix(".partial")
            save_file(tensors, partial, metadata=self.meta)
            partial.rename(self.shard_path(shard))
        return self.folder

    def targets(self, index: torch.Tensor) -> TeacherTargets:
        """Targets of blocks `index` (positions in `blocks`), read from the shards; refuses a foreign shard."""
        picked: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for i in index.tolist():
            shard, row = divmod(int(i), self.shard_blocks)
            f = self._shard(shard)
            ids = f.get_slice("ids")[row : row + 1]
            if not torch.equal(ids[0].to(torch.int64), self.blocks[i]):
                raise CacheError(f"{self.shard_path(shard)}: row {row} holds other tokens than block {i}")
            picked.append(
                (
                    f.get_slice("topk_logprobs")[row : row + 1],
                    f.get_slice("topk_ids")[row : row + 1],
                    f.get_slice("tail_logprob")[row : row + 1],
                )
            )
        top, ids, tail = (torch.cat(parts) for parts in zip(*picked, strict=True))
        return TeacherTargets(top, ids.to(torch.int64), tail)

    def _shard(self, shard: int):
        if shard not in self._open:
            path = self.shard_path(shard)
            if not path.exists():
                to_go = len(self.missing())
                raise CacheError(f"{path} is missing: build the teacher cache first ({to_go} shards to go)")
            f = safe_open(path, framework="pt")
            if f.metadata() != self.meta:
                raise CacheError(f"{path} was made for {f.metadata()}, not {self.meta}")
            self._open[shard] = f
        return self._open[shard]


class JoinedCaches:
    """Several caches read as one: blocks end to end, block i served by the cache that holds it.

    The compute-matched single prompt reads exactly the domain blocks the bank's prompts read, from their caches,
    instead of a new segmentation of the union that would need its own teacher forwards."""

    def __init__(self, caches: list[TeacherCache]) -> None:
        self.caches = caches
        self.blocks = torch.cat([c.blocks for c in caches])
        self.starts = torch.tensor([0, *torch.tensor([len(c.blocks) for c in caches]).cumsum(0).tolist()])
        self.folder = Path("+".join(c.folder.name for c in caches))

    def complete(self) -> bool:
        return all(c.complete() for c in self.caches)

    def targets(self, index: torch.Tensor) -> TeacherTargets:
        """Targets of blocks `index`, in that order, each from the cache that holds it."""
        which = torch.searchsorted(self.starts, index, right=True) - 1
        parts = [
            self.caches[int(w)].targets(torch.tensor([int(i) - int(self.starts[w])])) for i, w in zip(index, which)
        ]
        return TeacherTargets(
            *(torch.cat(t) for t in zip(*[(p.topk_logprobs, p.topk_ids, p.tail_logprob) for p in parts], strict=True))
        )


def cache_for(teacher_dir: Path, data_dir: Path, blocks: torch.Tensor, k: int = DEFAULT_TOP_K) -> TeacherCache:
    """The cache of `blocks` for the teacher in `teacher_dir`, under the data dir."""
    from server.core.identity import verified_weights_digest

    digest = verified_weights_digest(teacher_dir)
    if digest is None:
        raise CacheError(f"{teacher_dir}: the teacher must be a dense model folder (its weights digest keys the cache)")
    return TeacherCache(data_dir / "teacher-cache", blocks, digest, k, shard_blocks=32)


def general_cache(
    teacher_dir: Path, data_dir: Path, split: str, seq_len: int, k: int = DEFAULT_TOP_K, seed: int = 0
) -> TeacherCache:
    """The cache of one general-text split's blocks (`general_text.general_blocks` order) for a teacher folder."""
    from transformers import AutoTokenizer

    from server.lab.general_text import general_blocks

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    return cache_for(teacher_dir, data_dir, general_blocks(tokenizer, data_dir, split, seq_len, seed), k)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> None:
    """`python -m server.lab.teacher_cache`: build (or resume) the teacher cache of a general-text split."""
    import argparse
    import time

    from server.core.config import Settings
    from server.core.identity import DEFAULT_BASE
    from server.lab.loading import freeze, load_model

    settings = Settings()
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--teacher", type=Path, default=settings.models_dir / DEFAULT_BASE)
    parser.add_argument("--split", choices=("train", "dev"), default="train")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--k", type=int, default=DEFAULT_TOP_K)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-shards", type=int, default=None, help="Stop after this many new shards (a piece).")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(settings.torch_threads)
    cache = general_cache(args.teacher, settings.data_dir, args.split, args.seq_len, args.k)
    todo = cache.missing()[: args.max_shards]
    print(
        f"{cache.folder}: {cache.num_shards - len(cache.missing())}/{cache.num_shards} shards done, "
        f"building {len(todo)}",
        flush=True,
    )
    if todo:
        start = time.monotonic()
        cache.build(freeze(load_model(args.teacher, device=args.device)), args.batch_size, shards=todo)
        tokens = len(todo) * cache.shard_blocks * args.seq_len
        print(
            f"{len(todo)} shards ({tokens} tokens) in {time.monotonic() - start:.0f} s; {len(cache.missing())} to go",
            flush=True,
        )


if __name__ == "__main__":
    main()
