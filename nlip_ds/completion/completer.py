"""Noise-completion inside the training loop: concept prefixes, lockstep caption generation, caption store.

`Completer.prepare` runs in every training step on every rank, before the engine's forward:

1. From epoch min(noise.warmup_epochs, completion.start_epoch) on (stage 1 of docs/method.md's schedule), the batch
   gets the top-k concepts of its images as concept prefix (the model drops it with probability
   model.text.concept_dropout). The image embeddings for retrieval come from a no-grad, eval-mode
   `encode_image` of the batch: one extra V_e forward without backward (about a sixth of V_e's training cost)
   that every rank runs every step, so it is lockstep by construction. Embeddings cached per sample id from an
   earlier forward would cost nothing to compute but need a cluster-wide (N, D) table (samples change ranks
   every epoch; 26M x 512 floats is 53 GB), would be an epoch stale and come from a masked, augmented view.
2. The concept cache is refreshed (T_e over the vocabulary) when first needed and then every
   completion.refresh_concepts_every steps, at the same step on every rank; each refresh also captions the
   first rows of the batch for a TensorBoard text panel.
3. From completion.start_epoch on, the policy picks the pairs that train on a synthetic caption. Picked pairs
   without a fresh caption in the store (none yet, or one older than completion.refresh_every_epochs) are
   captioned in-step, at most completion.per_step_budget per rank, by completion.strategy (nucleus sampling
   by default) in lockstep: one all-reduce says whether any rank has work; if so every rank calls generate
   exactly once (a rank with no work on one dummy row, discarded) with a sync_fn, and one all-gather puts the
   new captions into every rank's store. With completion.candidates = K > 1, each pair gets K sampled captions
   and keeps the one the model's own embeddings put closest to its image; completion.concept_captions = n adds
   its top n retrieved concepts, each in the concept template ("a photo of a dog."), to those candidates (with
   K = 0 they are the only ones and nothing is decoded). With completion.filter (the
   default), that caption is kept only if it lies closer to the image than the original caption and, with
   completion.filter_to_clean (the default), at least as close as the median pair of the batch that the
   estimator calls clean (the captioner and filter of BLIP's CapFilt, judged by the contrastive towers: no-grad
   T_e forwards of the batch's original and the candidate captions, lockstep like generate). Picked pairs with
   a kept caption in the store get it (replace/threshold: instead of the original, with omega = 0; concat:
   after the original); the others train on their original caption. With completion.distinct, of the pairs of
   the global batch that would train on the same text only the first does (one all-gather of the batch's new
   caption ids): identical texts would be each other's negatives in the contrastive loss.
4. The batch keeps the original captions ("orig_input_ids", "orig_attention_mask") and the mask of changed rows
   ("caption_changed"); NLIPTask hands the noise estimator the loss of the original pairs without concepts.

Host syncs: from stage 2 on, the ids and the policy's picks go to the host every step (the caption store is
a host dict) and one small all-reduce runs per step (with completion.distinct, also one all-gather of the
batch's caption ids); generation itself needs one per decoder step. Under ZeRO-3 the training loop passes
`hold` (train/zero.py's `held`), which gathers C_d's parameters once per generate call instead of once per
submodule per generated token.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, ContextManager, Optional

import torch

from nlip_ds import distributed as D
from nlip_ds.completion import policy as P
from nlip_ds.completion.caption_store import SyntheticCaptionStore
from nlip_ds.completion.concepts import ConceptCache, load_vocabulary
from nlip_ds.model.generation import GenerationOptions
from nlip_ds.noise.partition import IdPartition

logger = logging.getLogger(__name__)

PANEL_ROWS = 3  # samples shown in the TensorBoard text panel at each concept refresh


@contextlib.contextmanager
def inference(model: torch.nn.Module):
    """Eval mode (no dropout, no patch masking) without gradients, restoring the previous mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _no_hold(module: torch.nn.Module) -> ContextManager:
    return contextlib.nullcontext()


class Completer:
    def __init__(self, cfg, tokenizer, hold: Callable[[torch.nn.Module], ContextManager] = _no_hold,
                 partition: Optional[IdPartition] = None):
        """`hold(decoder)` keeps C_d's parameters whole around each generate call (ZeRO-3: train/zero.py);
        `partition`: the ids whose captions this rank keeps (the noise estimator's: noise.state)."""
        self.c = cfg.completion
        self.hold = hold
        self.options = GenerationOptions(self.c.strategy, self.c.max_tokens, self.c.min_tokens, self.c.top_p,
                                         self.c.num_beams).validate()
        self.seed = cfg.train.seed
        self.context_length = cfg.model.text.context_length
        self.prefix_length = cfg.model.text.context_length // 2  # T_e cuts concepts first when a caption is long
        self.concept_epoch = min(cfg.noise.warmup_epochs, self.c.start_epoch)
        self.tokenizer = tokenizer
        self.special = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.sep_id}
        self.cache = ConceptCache(load_vocabulary(self.c.vocabulary))
        self.captions = SyntheticCaptionStore(self.c.max_tokens, tokenizer.pad_id, partition)
        self.generated = 0  # synthetic captions generated so far, all ranks (identical on every rank)
        self.kept = 0  # of which the caption filter kept (all of them without completion.filter)
        self._changed_share = None  # (,) device sum of the per-step share of changed captions since the last log
        self._steps = 0
        self._recall = [0, 0]  # concept recall since the last log: (hits, total), `ConceptCache.recall`
        self._duplicates = [0, 0]  # completion.distinct since the last log: (rows left out, rows with a kept caption)
        self._panels: list[tuple[int, str]] = []
        self._concept_caption_ids: Optional[torch.Tensor] = None  # `_concept_tokens`

    # -------------------------------------------------------------------------------------- per step

    def prepare(self, model, state, batch: dict, eps: torch.Tensor, omega: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """The batch with concept prefix and (from start_epoch) synthetic captions, and the omega to train with.
        Every rank must call this at every step (it runs the model in lockstep)."""
        if state.epoch < self.concept_epoch:
            return batch, omega
        refreshed = self._refresh_if_due(model, state.step, batch["image"].device)
        with inference(model):
            image_features = model.encode_image(batch["image"])  # (n, D)
        top = self.cache.retrieve(image_features, self.c.top_k)  # (n, k)
        if batch.get("objects"):  # ground truth, where the shards carry it
            hits, total = self.cache.recall(top, batch["objects"])
            self._recall = [self._recall[0] + hits, self._recall[1] + total]
        batch = dict(batch)
        batch["concept_ids"], batch["concept_mask"] = self.cache.prefix(top, self.tokenizer, self.prefix_length)
        if refreshed:
            self._panel(model, batch, top, image_features, state.step)
        if state.epoch < self.c.start_epoch:
            return batch, omega
        return self._complete(model, state, batch, eps, omega, image_features, top)

    def _refresh_if_due(self, model, step: int, device) -> bool:
        last = self.cache.refreshed_at_step
        if self.cache.ready and last is not None and step - last < self.c.refresh_concepts_every:
            return False
        with inference(model):
            self.cache.refresh(model.encode_text, self.tokenizer, device, max_length=self.context_length,
                               step=step)
        logger.info("concept embeddings refreshed at step %d (%d concepts)", step, len(self.cache))
        return True

    def _complete(self, model, state, batch: dict, eps: torch.Tensor, omega: torch.Tensor,
                  image_features: torch.Tensor, top: torch.Tensor):
        ids = batch["sample_id"].tolist()
        picked = P.select(self.c.policy, eps, batch["sample_id"], self.seed, state.epoch).tolist()
        stored = self.captions.lookup(batch["sample_id"])  # sharded: one exchange with the ids' owners
        fresh = stored.fresh(state.epoch, self.c.refresh_every_epochs)
        need = [i for i, (p, f) in enumerate(zip(picked, fresh)) if p and not f][:self.c.per_step_budget]
        device = batch["image"].device
        if self.c.per_step_budget and D.all_reduce_max(len(need), device) > 0:
            self._caption_into_store(model, batch, need, state, image_features, eps, top)
            stored = self.captions.lookup(batch["sample_id"])  # with this step's new captions
        rows = [i for i, p in enumerate(picked) if p and bool(stored.kept[i])]
        new_ids, new_mask = P.caption_rows(self.c.policy, batch["input_ids"][rows].cpu(), stored.tokens[rows],
                                           bos_id=self.tokenizer.bos_id, eos_id=self.tokenizer.eos_id,
                                           pad_id=self.tokenizer.pad_id, special=self.special)
        if self.c.distinct:
            first = self._first_of_their_text(new_ids, rows, len(ids), device)
            rows, new_ids, new_mask = [r for r, f in zip(rows, first) if f], new_ids[first], new_mask[first]
        changed = torch.zeros(len(ids), dtype=torch.bool, device=device)
        batch["orig_input_ids"], batch["orig_attention_mask"] = batch["input_ids"], batch["attention_mask"]
        if rows:
            index = torch.tensor(rows, device=device)
            batch["input_ids"] = batch["input_ids"].index_copy(0, index, new_ids.to(device))
            batch["attention_mask"] = batch["attention_mask"].index_copy(0, index, new_mask.to(device))
            changed[index] = True
        batch["caption_changed"] = changed  # which rows train on a synthetic caption
        if P.zeroes_omega(self.c.policy):
            omega = omega.masked_fill(changed, 0.0)
        share = changed.float().mean()
        self._changed_share = share if self._changed_share is None else self._changed_share + share
        self._steps += 1
        return batch, omega

    def _first_of_their_text(self, texts: torch.Tensor, rows: list[int], n: int, device) -> torch.Tensor:
        """completion.distinct: for each of this rank's `rows` (new caption ids `texts`, (len(rows), T)), whether
        it is the first row of the global batch (ranks in order, then rows) to train on that synthetic text; the
        others keep their original caption. Lockstep: one all-gather of the batch's (n, 1 + T) ids, every rank
        together, after which every rank decides alike."""
        mine = torch.full((n, 1 + texts.shape[1]), -1, dtype=torch.int32, device=device)  # column 0: 1 = changed
        if rows:
            mine[rows, 0] = 1
            mine[rows, 1:] = texts.to(device=device, dtype=torch.int32)
        seen, first = set(), []
        for row in map(tuple, D.all_gather_tensor(mine).tolist()):  # (world * n, 1 + T)
            first.append(row[0] == 1 and row not in seen)
            seen.add(row)
        offset = D.get_rank() * n
        keep = torch.tensor([first[offset + i] for i in rows], dtype=torch.bool)
        self._duplicates = [self._duplicates[0] + int((~keep).sum()), self._duplicates[1] + len(rows)]
        return keep

    def _caption_into_store(self, model, batch: dict, need: list[int], state, image_features: torch.Tensor,
                            eps: torch.Tensor, top: torch.Tensor) -> None:
        """Caption this rank's `need` rows (lockstep with the other ranks), judge them by the caption filter and
        gather every rank's new captions with the verdicts into the store, padded to per_step_budget rows per
        rank. Each row's candidates: K sampled captions, then its top completion.concept_captions concepts in
        the concept template."""
        device, budget = batch["image"].device, self.c.per_step_budget
        index = torch.tensor(need or [0], device=device)  # no work: one dummy row keeps the decoder in step
        k = self.c.candidates + self.c.concept_captions
        tokens = self._candidates(model, batch, index, top, state.step)  # (m * k, L)
        kept = torch.ones(len(index), dtype=torch.bool, device=device)
        if k > 1 or self.c.filter:
            similarity = self.similarity(model, batch["input_ids"][index], batch["attention_mask"][index], tokens,
                                         image_features[index])  # (m, 1 + k)
            tokens, closest = _closest(tokens, similarity)
            if self.c.filter:
                kept = closest > similarity[:, 0]
                if self.c.filter_to_clean:
                    kept &= closest >= self.clean_bar(model, batch, eps, image_features)
        ids = torch.full((budget,), -1, dtype=torch.long, device=device)
        rows = torch.zeros((budget, self.c.max_tokens + 1), dtype=torch.long, device=device)  # tokens, kept
        rows[:, :-1] = self.tokenizer.pad_id
        if need:
            ids[:len(need)] = batch["sample_id"][index]
            rows[:len(need), :-1], rows[:len(need), -1] = tokens, kept.long()
        ids, rows = D.all_gather_tensor(ids), D.all_gather_tensor(rows)  # (world * budget,), (world * budget, L + 1)
        self.captions.put(ids.cpu(), rows[:, :-1].cpu(), state.epoch, state.step, kept=rows[:, -1].cpu() > 0)
        self.generated += int((ids >= 0).sum())
        self.kept += int(((ids >= 0) & (rows[:, -1] > 0)).sum())

    def _candidates(self, model, batch: dict, index: torch.Tensor, top: torch.Tensor, step: int) -> torch.Tensor:
        """(m * k, L) candidate captions of the `index` rows (ids after [BOS], padded), each row's k side by
        side: completion.candidates sampled by the decoder (lockstep: every rank calls generate together), then
        the concept template of each of its top completion.concept_captions retrieved concepts. A concept
        caption costs no decoding; it names what the contrastive towers see in the image, which they learn long
        before the decoder learns to write it (docs/completion.md)."""
        m, parts = len(index), []
        if self.c.candidates:
            rows = index.repeat_interleave(self.c.candidates)
            sampled = self.generate(model, batch["image"][rows], batch["concept_ids"][rows],
                                    batch["concept_mask"][rows], step)  # (m * K, L)
            parts.append(sampled.view(m, self.c.candidates, -1))
        if self.c.concept_captions:
            written = self._concept_tokens(index.device)[top[index, :self.c.concept_captions]]  # (m, n, L)
            parts.append(written)
        return torch.cat(parts, dim=1).view(m * (self.c.candidates + self.c.concept_captions), -1)

    def _concept_tokens(self, device) -> torch.Tensor:
        """(C, max_tokens) every concept in the concept template, as ids after [BOS] (the generated captions'
        layout), tokenized once."""
        if self._concept_caption_ids is None:
            ids, _ = self.tokenizer.encode(self.cache.prompts(), self.c.max_tokens + 1)
            self._concept_caption_ids = ids[:, 1:]
        return self._concept_caption_ids.to(device)

    def similarity(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, tokens: torch.Tensor,
                   image_features: torch.Tensor) -> torch.Tensor:
        """(m, 1 + K) cosine similarity of each of m images to its original caption (column 0) and to each of
        its K candidates as the policy would train on it (the synthetic caption, or original + synthetic for
        concat), by the model's own embeddings. `tokens` (m * K, L): generated ids after [BOS], each row's K
        candidates side by side. One no-grad T_e forward of m (1 + K) rows: lockstep, every rank must call it
        together."""
        m = input_ids.shape[0]
        k = tokens.shape[0] // m
        synthetic, synthetic_mask = P.caption_rows(self.c.policy, input_ids.repeat_interleave(k, 0).cpu(),
                                                   tokens.cpu(), bos_id=self.tokenizer.bos_id,
                                                   eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id,
                                                   special=self.special)
        with inference(model):
            text = model.encode_text(torch.cat([input_ids, synthetic.to(input_ids.device)]),
                                     torch.cat([attention_mask, synthetic_mask.to(attention_mask.device)]))
        original = (text[:m] * image_features).sum(-1, keepdim=True)  # (m, 1)
        candidates = (text[m:].view(m, k, -1) * image_features[:, None]).sum(-1)  # (m, K)
        return torch.cat([original, candidates], dim=1)

    def clean_bar(self, model, batch: dict, eps: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """The median image-caption similarity of this rank's batch pairs the estimator calls clean (ε < 0.5;
        +inf when there is none): a synthetic caption must look at least that clean to be kept. A caption that
        only beats a junk original ("IMG_2031.jpg") is not enough; a captioner not yet worth listening to
        rarely reaches the bar. One no-grad T_e forward of the batch: lockstep, every rank calls it together."""
        with inference(model):
            text = model.encode_text(batch["input_ids"], batch["attention_mask"])
        similarity = (text * image_features).sum(-1)
        clean = eps.to(similarity.device) < 0.5
        return similarity[clean].median() if bool(clean.any()) else similarity.new_tensor(float("inf"))

    def generate(self, model, images: torch.Tensor, concept_ids: torch.Tensor, concept_mask: torch.Tensor,
                 step: int) -> torch.Tensor:
        """(m, max_tokens) synthetic captions (ids after [BOS], padded) by completion.strategy; sampling is seeded
        by (seed, step, rank) so a resumed run draws the same. Lockstep: every rank must call this together."""
        generator = torch.Generator(device=images.device)
        generator.manual_seed(generation_seed(self.seed, step, D.get_rank()))
        with inference(model), self.hold(model.decoder):
            out = model.generate(images, concept_ids, concept_mask, self.options, generator=generator,
                                 sync_fn=lambda unfinished: self._any_rank(unfinished, images))
        padded = torch.full((out.shape[0], self.c.max_tokens), self.tokenizer.pad_id, dtype=torch.long,
                            device=out.device)
        padded[:, :out.shape[1]] = out
        return padded

    @staticmethod
    def _any_rank(local_unfinished: bool, like: torch.Tensor) -> bool:
        return D.all_reduce_max(int(local_unfinished), like.device) > 0

    def _panel(self, model, batch: dict, top: torch.Tensor, image_features: torch.Tensor, step: int) -> None:
        """Caption the first rows of the batch as the store would (every rank, lockstep: the candidates, the one
        closest to the image) and keep a markdown table for rank 0, with the image's similarity to the original
        and to that caption (the caption filter's two numbers)."""
        m = min(PANEL_ROWS, batch["image"].shape[0])
        index = torch.arange(m, device=batch["image"].device)
        tokens = self._candidates(model, batch, index, top, step)  # (m * k, L)
        similarity = self.similarity(model, batch["input_ids"][:m], batch["attention_mask"][:m], tokens,
                                     image_features[:m])  # (m, 1 + k)
        tokens, closest = _closest(tokens, similarity)
        synthetic = self.tokenizer.decode(tokens)
        similarity = torch.stack([similarity[:, 0], closest], dim=1).tolist()
        concepts = self.cache.names(top[:m])
        lines = ["| sample | original caption | retrieved concepts | synthetic caption | similarity to the image "
                 "(original / synthetic) |", "|---|---|---|---|---|"]
        for i in range(m):
            lines.append(f"| {int(batch['sample_id'][i])} | {_cell(batch['caption'][i])} | "
                         f"{_cell(', '.join(concepts[i]))} | {_cell(synthetic[i])} | "
                         f"{similarity[i][0]:.3f} / {similarity[i][1]:.3f} |")
        self._panels.append((step, "\n".join(lines)))

    # --------------------------------------------------------------------------------------- logging

    def log(self, sink, step: int) -> None:
        """At a log step, on every rank together: completion/generated (cumulative over the run, all ranks),
        completion/stored_captions, completion/replaced (share of pairs that trained on a synthetic caption since the
        last log, all ranks), completion/concept_recall (since the last log, all ranks; only where the data
        carries object lists: `ConceptCache.recall`), completion/duplicates (with completion.distinct: the share
        of the pairs with a kept caption left on their original because an earlier pair of the global batch
        trains on the same text, since the last log, all ranks) and the pending text panels."""
        stored = len(self.captions)
        if not self.captions.partition.replicated:  # each rank holds its slice
            stored = int(D.all_reduce_sum(torch.tensor([stored], device=D.collective_device())).item())
        metrics = {"completion/generated": self.generated, "completion/stored_captions": stored}
        if self.generated:
            metrics["completion/kept"] = self.kept / self.generated
        if self._steps:
            share = self._changed_share.detach().float().reshape(1) / self._steps
            if D.get_world_size() > 1:
                torch.distributed.all_reduce(share)
                share /= D.get_world_size()
            metrics["completion/replaced"] = float(share)
            self._changed_share, self._steps = None, 0
        recall = D.all_reduce_sum(torch.tensor(self._recall, dtype=torch.float64, device=D.collective_device()))
        if recall[1] > 0:
            metrics["completion/concept_recall"] = float(recall[0] / recall[1])
        self._recall = [0, 0]
        if self.c.distinct:
            duplicates = D.all_reduce_sum(torch.tensor(self._duplicates, dtype=torch.float64,
                                                       device=D.collective_device()))
            if duplicates[1] > 0:
                metrics["completion/duplicates"] = float(duplicates[0] / duplicates[1])
            self._duplicates = [0, 0]
        sink.log(metrics, step)
        for panel_step, text in self._panels:
            sink.text("completion/samples", text, panel_step)
        self._panels = []

    # ------------------------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict:
        """Identical on every rank; a sharded caption store is in shard_state_dict instead (captions None)."""
        captions = self.captions.state_dict() if self.captions.partition.replicated else None
        return {"concepts": self.cache.state_dict(), "captions": captions, "generated": self.generated,
                "kept": self.kept}

    def shard_state_dict(self) -> Optional[dict]:
        """This rank's captions when the store is sharded (for its rank state), else None."""
        return None if self.captions.partition.replicated else self.captions.state_dict()

    def load_state_dict(self, state: dict, shards: Optional[list[dict]] = None) -> None:
        """`shards`: the saved caption slices this rank needs when the save was sharded (captions None)."""
        self.cache.load_state_dict(state["concepts"])
        saved = [state["captions"]] if state["captions"] is not None else list(shards or [])
        if not saved:
            raise ValueError("caption store: the checkpoint saved its captions in per-rank slices; none was given")
        self.captions.load_shards(saved)
        self.generated = int(state["generated"])
        self.kept = int(state.get("kept", self.generated))  # before the caption filter, every caption was kept


def _closest(tokens: torch.Tensor, similarity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's candidate closest to its image: (m, L) tokens and their (m,) similarity, from (m * k, L)
    candidates (each row's k side by side) and the (m, 1 + k) similarity of `Completer.similarity`."""
    m = similarity.shape[0]
    best = similarity[:, 1:].argmax(dim=1)
    return tokens.view(m, -1, tokens.shape[1])[torch.arange(m, device=tokens.device), best], similarity[:, 1:].amax(1)


def generation_seed(seed: int, step: int, rank: int) -> int:
    """The nucleus-sampling seed of one rank's generation at one step (the same after a resume)."""
    return ((seed * 1_000_003 + step) * 4099 + rank) % (2 ** 63)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or "(empty)"
