"""The teacher cache: what is stored is what the live teacher gives, and the loss read from it is the loss."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from server.lab.teacher_cache import CacheError, JoinedCaches, TeacherCache, kd_loss, teacher_targets
from tests.helpers import micro_llama

VOCAB = 96


def tiny(seed: int) -> LlamaForCausalLM:
    return micro_llama(VOCAB, seed)


@pytest.fixture(scope="module")
def blocks() -> torch.Tensor:
    return torch.randint(0, VOCAB, (10, 24), generator=torch.Generator().manual_seed(0))


def full_kl(teacher, student, ids) -> torch.Tensor:
    with torch.no_grad():
        t = teacher(input_ids=ids).logits[:, :-1].log_softmax(-1)
        s = student(input_ids=ids).logits[:, :-1].log_softmax(-1)
    return F.kl_div(s, t, log_target=True, reduction="none").sum(-1).mean(-1)


def test_the_cache_holds_the_live_teachers_targets(tmp_path, blocks):
    teacher = tiny(0)
    cache = TeacherCache(tmp_path, blocks, "teacher-digest", k=8, shard_blocks=4)
    cache.build(teacher, batch_size=3, progress=False)
    assert cache.complete() and cache.num_shards == 3
    index = torch.tensor([9, 0, 5])
    cached, live = cache.targets(index), teacher_targets(teacher, blocks[index], k=8)
    torch.testing.assert_close(cached.topk_logprobs, live.topk_logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached.tail_logprob, live.tail_logprob, atol=1e-5, rtol=1e-5)
    assert torch.equal(cached.topk_ids, live.topk_ids)


def test_cached_loss_equals_the_live_teachers_kl_when_k_covers_the_vocabulary(tmp_path, blocks):
    teacher, student = tiny(0), tiny(1)
    cache = TeacherCache(tmp_path, blocks, "teacher-digest", k=VOCAB, shard_blocks=4)
    cache.build(teacher, progress=False)
    index = torch.arange(len(blocks))
    with torch.no_grad():
        cached = kd_loss(student(input_ids=blocks).logits[:, :-1], cache.targets(index))
    torch.testing.assert_close(cached, full_kl(teacher, student, blocks), atol=1e-5, rtol=1e-4)
    assert cached.min() > 0


def test_truncated_loss_is_the_kl_of_the_coarsened_distributions(tmp_path, blocks):
    teacher, student = tiny(0), tiny(1)
    cache = TeacherCache(tmp_path, blocks, "teacher-digest", k=8, shard_blocks=4)
    cache.build(teacher, progress=False)
    index = torch.arange(len(blocks))
    with torch.no_grad():
        logits = student(input_ids=blocks).logits[:, :-1]
        cached = kd_loss(logits, cache.targets(index))
        t = teacher(input_ids=blocks).logits[:, :-1].log_softmax(-1)
    top = t.topk(8, dim=-1).indices
    in_top = torch.zeros_like(t, dtype=torch.bool).scatter_(-1, top, True)

    def coarse(logp):  # the k teacher-top tokens, then everything else as one outcome
        rest = logp.masked_fill(in_top, float("-inf")).logsumexp(-1, keepdim=True)
        return torch.cat([logp.gather(-1, top), rest], dim=-1)

    expected = F.kl_div(coarse(logits.log_softmax(-1)), coarse(t), log_target=True, reduction="none").sum(-1).mean(-1)
    torch.testing.assert_close(cached, expected, atol=1e-5, rtol=1e-4)
    assert (cached <= full_kl(teacher, student, blocks) + 1e-6).all()
    with torch.no_grad():
        assert kd_loss(teacher(input_ids=blocks).logits[:, :-1], cache.targets(index)).abs().max() < 1e-5
    trainable = logits.clone().requires_grad_(True)
    kd_loss(trainable, cache.targets(index)).sum().backward()
    assert torch.isfinite(trainable.grad).all() and trainable.grad.abs().sum() > 0


def test_build_resumes_by_shard_and_the_key_follows_blocks_teacher_and_k(tmp_path, blocks):
    teacher = tiny(0)
    cache = TeacherCache(tmp_path, blocks, "teacher-digest", k=8, shard_blocks=4)
    cache.build(teacher, progress=False)
    kept = cache.shard_path(0).stat().st_mtime_ns
    cache.shard_path(2).unlink()
    assert cache.missing() == [2]
    again = TeacherCache(tmp_path, blocks, "teacher-digest", k=8, shard_blocks=4)
    again.build(teacher, progress=False)
    assert again.complete() and again.shard_path(0).stat().st_mtime_ns == kept
    torch.testing.assert_close(
        again.targets(torch.tensor([8, 9])).topk_logprobs,
        teacher_targets(teacher, blocks[8:10], k=8).topk_logprobs,
        atol=1e-5,
        rtol=1e-5,
    )
    others = [
        TeacherCache(tmp_path, blocks, "other-teacher", k=8, shard_blocks=4),
        TeacherCache(tmp_path, blocks, "teacher-digest", k=16, shard_blocks=4),
        TeacherCache(tmp_path, blocks.flip(0), "teacher-digest", k=8, shard_blocks=4),
    ]
    assert len({cache.folder, *(o.folder for o in others)}) == 4


def test_a_foreign_or_missing_shard_is_refused(tmp_path, blocks):
    teacher = tiny(0)
    mine = TeacherCache(tmp_path, blocks, "teacher-digest", k=8, shard_blocks=4)
    with pytest.raises(CacheError, match="missing"):
        mine.targets(torch.tensor([0]))
    other = TeacherCache(tmp_path, blocks, "other-teacher", k=8, shard_blocks=4)
    other.build(teacher, progress=False)
    mine.folder.mkdir(parents=True)
    shutil.copy(other.shard_path(0), mine.shard_path(0))
    with pytest.raises(CacheError, match="was made for"):
        mine.targets(torch.tensor([0]))


def test_joined_caches_serve_each_block_from_the_cache_that_holds_it(tmp_path, blocks):
    teacher = tiny(0)
    first = TeacherCache(tmp_path, blocks[:6], "teacher-digest", k=8, shard_blocks=4)
    second = TeacherCache(tmp_path, blocks[6:], "teacher-digest", k=8, shard_blocks=4)
    for cache in (first, second):
        cache.build(teacher, progress=False)
    joined = JoinedCaches([first, second])
    whole = TeacherCache(tmp_path / "whole", blocks, "teacher-digest", k=8, shard_blocks=4)
    whole.build(teacher, progress=False)

    index = torch.tensor([9, 0, 5, 6, 7])
    got, want = joined.targets(index), whole.targets(index)

    assert torch.equal(joined.blocks, blocks) and joined.complete()
    assert torch.equal(got.topk_ids, want.topk_ids)
    torch.testing.assert_close(got.topk_logprobs, want.topk_logprobs, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.tail_logprob, want.tail_logprob, atol=1e-6, rtol=0)
