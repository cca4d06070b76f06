"""Caption generation: stopping, seeded sampling, the key/value cache, beam search against exhaustive search,
the logits processors, and lockstep (synced) generation across two simulated ranks."""
import itertools
import threading

import pytest
import torch

from nlip_ds.config import ModelConfig
from nlip_ds.model import NLIPModel
from nlip_ds.model.generation import (GenerationOptions, SpecialIds, beam_loop, nucleus_filter, process_logits,
                                      repetition_penalty)

PAD, BOS, EOS, SEP = 0, 1, 2, 3


def build(eos_bias: float = 0.0, seed: int = 0) -> NLIPModel:
    torch.manual_seed(seed)
    model = NLIPModel(ModelConfig(), vocab_size=100, pad_id=PAD, bos_id=BOS, eos_id=EOS, sep_id=SEP).eval()
    with torch.no_grad():
        model.decoder.lm.cls.predictions.decoder.bias[EOS] += eos_bias
    return model


def images(seed: int = 0, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def count_decoder_calls(model: NLIPModel) -> list:
    calls = []
    model.decoder.register_forward_hook(lambda *args: calls.append(1))
    return calls


@pytest.mark.parametrize("strategy", ["greedy", "nucleus", "beam"])
def test_generation_stops_at_eos_after_min_tokens(strategy):
    model = build(eos_bias=50.0)
    out = model.generate(images(), strategy=strategy, min_tokens=4, max_tokens=12,
                         generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 5)  # four words, then [EOS] as soon as it is allowed
    assert (out[:, 4] == EOS).all() and not (out[:, :4] == EOS).any()
    assert not torch.isin(out[:, :4], torch.tensor([PAD, BOS, SEP])).any()


@pytest.mark.parametrize("strategy", ["greedy", "nucleus", "beam"])
def test_generation_stops_at_max_tokens(strategy):
    model = build(eos_bias=-50.0)
    calls = count_decoder_calls(model)
    out = model.generate(images(), strategy=strategy, min_tokens=1, max_tokens=7,
                         generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 7) and not (out == EOS).any()
    assert len(calls) == 7


def test_rows_finishing_early_are_padded_after_eos():
    model = build()
    with torch.no_grad():  # sample 0's memory differs, so only some rows can reach [EOS]; greedy then decides
        model.decoder.lm.cls.predictions.decoder.bias[EOS] += 4.0
    out = model.generate(images(batch=6), strategy="nucleus", min_tokens=1, max_tokens=20,
                         generator=torch.Generator().manual_seed(3))
    for row in out.tolist():
        if EOS in row:
            end = row.index(EOS)
            assert row[end + 1:] == [PAD] * (len(row) - end - 1)
        else:
            assert len(row) == 20 and PAD not in row


def test_nucleus_sampling_is_reproducible_with_a_seed():
    model = build()
    concepts = torch.tensor([[10, 11], [12, 0], [0, 0]])

    def run(seed):
        return model.generate(images(), concepts, concepts != 0, strategy="nucleus", min_tokens=3,
                              max_tokens=10, generator=torch.Generator().manual_seed(seed))

    first, again, other = run(7), run(7), run(8)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_cached_decoding_equals_recomputing_the_prefix():
    model = build()
    imgs = images()
    out = model.generate(imgs, strategy="greedy", min_tokens=10, max_tokens=10)
    with torch.no_grad():
        memory, memory_mask = model._memory(imgs, None, None)
        seq = torch.full((3, 1), BOS)
        for _ in range(10):
            logits = model.decoder(seq, torch.ones_like(seq), memory, memory_mask)[:, -1]  # no cache
            logits[:, [PAD, BOS, SEP, EOS]] = float("-inf")
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq[:, 1:])


def test_concepts_change_the_caption():
    model = build()
    with torch.no_grad():
        model.decoder.memory.concepts.weight.mul_(50.0)  # make the concept memory matter at random init
    concepts = torch.tensor([[10, 11], [12, 13], [14, 15]])
    plain = model.generate(images(), strategy="greedy", max_tokens=8)
    conditioned = model.generate(images(), concepts, strategy="greedy", max_tokens=8)
    assert not torch.equal(plain, conditioned)


def test_beam_of_one_equals_greedy():
    model = build()
    greedy = model.generate(images(), strategy="greedy", min_tokens=2, max_tokens=9)
    beam = model.generate(images(), strategy="beam", num_beams=1, min_tokens=2, max_tokens=9)
    assert torch.equal(greedy, beam)


def _markov_step(table: torch.Tensor):
    """A fake decoder whose logits depend only on the last token: (N, 1) -> table[last] (N, V)."""
    return lambda last: table[last[:, 0]]


def _exhaustive_best(table, max_tokens, ids, words, length_penalty):
    """The best caption by sum log p / length**lp among all that end with [EOS] or are cut at max_tokens."""
    candidates = [[*body, ids.eos] for n in range(max_tokens) for body in itertools.product(words, repeat=n)]
    candidates += [list(body) for body in itertools.product(words, repeat=max_tokens)]
    allowed = table.clone()
    allowed[:, list(ids.banned)] = float("-inf")
    logp = allowed.log_softmax(-1)  # (V, V): next-token log-probs given the last token

    def score(seq):
        prev = [ids.bos] + seq[:-1]
        return sum(logp[a, b].item() for a, b in zip(prev, seq)) / len(seq) ** length_penalty

    return max(candidates, key=score)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_with_enough_beams_finds_the_exhaustive_optimum(length_penalty):
    ids = SpecialIds(bos=BOS, eos=EOS, pad=PAD, banned=(PAD, BOS, SEP))
    words = [4, 5, 6]
    table = torch.randn(7, 7, generator=torch.Generator().manual_seed(11)) * 2
    opts = GenerationOptions(strategy="beam", max_tokens=3, min_tokens=0, num_beams=60,
                             length_penalty=length_penalty)
    out = beam_loop(_markov_step(table), lambda parent: None, 1, torch.device("cpu"), opts, ids)
    expected = _exhaustive_best(table, 3, ids, words, length_penalty)
    assert out[0].tolist() == expected


def test_repetition_penalty_follows_ctrl():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    out = repetition_penalty(logits, torch.tensor([[0, 1]]), 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]
    assert torch.equal(repetition_penalty(logits, torch.tensor([[0, 1]]), 1.0), logits)


def test_min_tokens_and_banned_ids_are_masked():
    opts = GenerationOptions(min_tokens=2)
    ids = SpecialIds(bos=BOS, eos=EOS, pad=PAD, banned=(PAD, BOS))
    logits = torch.zeros(1, 5)
    early = process_logits(logits, torch.zeros(1, 0, dtype=torch.long), 1, opts, ids)
    late = process_logits(logits, torch.zeros(1, 0, dtype=torch.long), 2, opts, ids)
    assert torch.isinf(early[0, [PAD, BOS, EOS]]).all() and torch.isfinite(early[0, 3:]).all()
    assert torch.isfinite(late[0, EOS]) and torch.isinf(late[0, [PAD, BOS]]).all()


def test_nucleus_filter_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
    kept = torch.isfinite(nucleus_filter(probs.log(), 0.8))
    assert kept.tolist() == [[True, False, True, False]]
    kept = torch.isfinite(nucleus_filter(probs.log(), 0.81))
    assert kept.tolist() == [[True, False, True, True]]
    assert torch.isfinite(nucleus_filter(probs.log(), 1e-6)).tolist() == [[True, False, False, False]]


def test_generate_refuses_bad_options():
    model = build()
    with pytest.raises(ValueError, match="max_length"):
        model.generate(images(), max_tokens=33)
    with pytest.raises(ValueError, match="strategy"):
        model.generate(images(), strategy="topk")


class FakeCollective:
    """Two ranks as two threads: sync_fn is an all-reduce(OR) of the ranks' `local_unfinished` flags."""

    def __init__(self, world: int):
        self.barrier = threading.Barrier(world, timeout=60)  # a lockstep bug fails the test, never hangs it
        self.flags = [False] * world

    def sync_fn(self, rank: int):
        def any_unfinished(local_unfinished: bool) -> bool:
            self.flags[rank] = local_unfinished
            self.barrier.wait()
            result = any(self.flags)
            self.barrier.wait()  # nobody writes the next flag before everyone has read this one
            return result
        return any_unfinished


@pytest.mark.parametrize("strategy", ["nucleus", "beam"])
def test_synced_generation_matches_unsynced_with_equal_decoder_calls(strategy):
    # rank 0 finishes as soon as [EOS] is allowed, rank 1 runs to max_tokens
    models = [build(eos_bias=50.0), build(eos_bias=-50.0)]
    kwargs = dict(strategy=strategy, min_tokens=2, max_tokens=9)

    def run(rank, sync_fn, results, calls):
        calls[rank] = count_decoder_calls(models[rank])
        results[rank] = models[rank].generate(images(seed=rank), generator=torch.Generator().manual_seed(rank),
                                              sync_fn=sync_fn, **kwargs)

    alone, alone_calls = [None, None], [None, None]
    for rank in (0, 1):
        run(rank, None, alone, alone_calls)
    assert len(alone_calls[0]) == 3 and len(alone_calls[1]) == 9  # the ranks would diverge without sync

    synced, synced_calls, collective = [None, None], [None, None], FakeCollective(2)
    threads = [threading.Thread(target=run, args=(rank, collective.sync_fn(rank), synced, synced_calls))
               for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for rank in (0, 1):
        assert synced[rank] is not None, f"rank {rank} failed"
        assert torch.equal(synced[rank], alone[rank])
    assert len(synced_calls[0]) == len(synced_calls[1]) == 9
