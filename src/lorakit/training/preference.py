"""Direct Preference Optimization: the preference task of the training loop (loop.py).

For a prompt x with a chosen completion y_w and a rejected one y_l,

    h = β [(log π(y_w|x) - log π_ref(y_w|x)) - (log π(y_l|x) - log π_ref(y_l|x))]
    sigmoid: -log σ(h)        hinge: max(0, 1 - h)        ipo: (h' - 1/(2β))²

(Rafailov et al., arXiv:2305.18290; IPO, Azar et al., arXiv:2310.12036, with h' the
log-ratios averaged per completion token, as TRL computes it). The reference π_ref is
the model itself with its adapters switched off: no second copy of the weights. Its
log-probabilities are computed beside every step's, or once over the data
(``precompute_ref``) and kept with the run, so a resumed run reads them back.

Records follow TRL's preference formats: ``{"prompt", "chosen", "rejected"}`` as strings
(EOS appended to each completion), or as message lists (rendered with the chat template;
a conversational record may leave out ``prompt`` when chosen and rejected share the
turns before their last one). Tokenized as TRL does: the completion starts where the
tokenized prompt and prompt + completion diverge. A pair is cut to ``max_length``
tokens from its start; one whose completion is cut to nothing is dropped and counted.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from ..attach import disabled
from .batches import micro_batches, split_eval, step_indices
from .checkpoint import write_bytes
from .config import TrainConfig
from .data import _check_messages, _located, check_records as check_shapes
from .distributed import Processes
from .loop import Run, peak_memory
from .sequences import Rows, make_rows, sequence_logps
from .sources import DataError, Source
from .text import TrainResult, checkpoint_activations, directory_bytes

PAIR_KEYS = {"prompt", "chosen", "rejected"}
REFERENCE_FILE = "reference_logps.safetensors"


@dataclass(frozen=True, slots=True)
class Pair:
    prompt: array
    chosen: array
    rejected: array


@dataclass
class Pairs:
    pairs: list[Pair]
    source: str
    truncated: int = 0  # pairs cut to max_length
    dropped: int = 0  # pairs whose chosen or rejected completion was cut to nothing
    formats: dict[str, int] = field(default_factory=dict)


def pair_format(record: dict[str, Any]) -> str:
    """"standard" (strings) or "conversational" (message lists); DataError otherwise."""
    missing = sorted({"chosen", "rejected"} - set(record))
    if missing:
        raise DataError(f"a preference record needs \"chosen\" and \"rejected\" (and \"prompt\"), got keys "
                        f"{sorted(record)} (map other columns with --columns, e.g. chosen=better,rejected=worse)")
    unknown = sorted(set(record) - PAIR_KEYS)
    if unknown:
        raise DataError(f"unknown key(s) {unknown} in a preference record (expected {sorted(PAIR_KEYS)})")
    values = [record[k] for k in ("prompt", "chosen", "rejected") if k in record]
    if all(isinstance(v, str) for v in values):
        if "prompt" not in record:
            raise DataError('a preference record of strings needs a "prompt"')
        if not record["chosen"] or not record["rejected"]:
            raise DataError('"chosen" and "rejected" must not be empty')
        return "standard"
    if all(isinstance(v, list) for v in values):
        for key in ("prompt", "chosen", "rejected"):
            if key in record:
                _located(key, _check_messages, record[key])
        if "prompt" not in record:
            _implicit_prompt(record)
        return "conversational"
    raise DataError('"prompt", "chosen" and "rejected" must all be strings or all be lists of messages')


def _implicit_prompt(record: dict[str, Any]) -> tuple[list, list, list]:
    """(prompt, chosen, rejected) of a conversational record without "prompt": the turns the
    two chats share before their last, as TRL's extract_prompt reads it."""
    if "prompt" in record:
        return record["prompt"], record["chosen"], record["rejected"]
    chosen, rejected = record["chosen"], record["rejected"]
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise DataError('without "prompt", "chosen" and "rejected" must share the turns before their last')
    return chosen[:shared], chosen[shared:], rejected[shared:]


def check_pairs(records: Iterable[tuple[str, dict[str, Any]]], source: str) -> dict[str, int]:
    """Every preference record's shape checked (no tokenizer); the count of each format."""
    return check_shapes(records, source, pair_format)


def tokenize_pair(record: dict[str, Any], kind: str, tokenizer) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) token ids of a record of format ``kind`` (``pair_format``),
    as TRL's DPOTrainer tokenizes them."""
    if kind == "conversational":
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError("conversational preference records need a tokenizer with a chat template")
        prompt, chosen, rejected = _implicit_prompt(record)

        def render(messages, generation: bool = False) -> list[int]:
            encoded = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation,
                                                    return_dict=True)
            return list(encoded["input_ids"])

        prompt_ids = render(prompt, True)
        with_chosen, with_rejected = render(prompt + chosen), render(prompt + rejected)
    else:
        eos = tokenizer.eos_token or ""
        chosen, rejected = (c if c.endswith(eos) else c + eos for c in (record["chosen"], record["rejected"]))
        prompt_ids, with_chosen, with_rejected = (tokenizer(text)["input_ids"] for text in
                                                  (record["prompt"], record["prompt"] + chosen,
                                                   record["prompt"] + rejected))
    start = min(_common_prefix(prompt_ids, with_chosen), _common_prefix(prompt_ids, with_rejected))
    return prompt_ids[:start], with_chosen[start:], with_rejected[start:]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def build_pairs(records: Iterable[tuple[str, dict[str, Any]]], tokenizer, max_length: int, source: str) -> Pairs:
    """Tokenized pairs, cut to ``max_length`` tokens (prompt + completion) from the start."""
    result = Pairs([], source)
    for where, record in records:
        kind = _located(where, pair_format, record)
        prompt, chosen, rejected = _located(where, tokenize_pair, record, kind, tokenizer)
        if not prompt:
            raise DataError(f"{where}: the prompt renders to no token")
        room = max_length - len(prompt)
        if len(prompt) + max(len(chosen), len(rejected)) > max_length:
            result.truncated += 1
        if room <= 0 or not chosen or not rejected:
            result.dropped += 1
            continue
        result.pairs.append(Pair(array("i", prompt), array("i", chosen[:room]), array("i", rejected[:room])))
        result.formats[kind] = result.formats.get(kind, 0) + 1
    if not result.pairs:
        raise DataError(f"{source}: no usable preference pair ({result.dropped} dropped: the prompt fills "
                        f"max_length={max_length})")
    return result


@dataclass
class PreferenceResult(TrainResult):
    eval_accuracy_before: float | None = None  # held-out rewards/accuracies
    eval_accuracy_after: float | None = None
    pairs_per_second: float = 0.0
    dropped: int = 0  # pairs whose chosen or rejected completion was cut to nothing


@dataclass
class PairBatch:
    """The chosen rows, then the rejected rows, of the same pairs."""

    rows: Rows
    reference: Tensor | None  # (2P,) precomputed log π_ref, chosen then rejected; None: computed in the step
    completion_tokens: Tensor  # (2P,)

    def to(self, device: torch.device) -> PairBatch:
        return PairBatch(self.rows.to(device), None if self.reference is None else self.reference.to(device),
                         self.completion_tokens.to(device))


def collate_pairs(pairs: list[Pair], pad_id: int, reference: Tensor | None = None) -> PairBatch:
    """``reference``: the (2P,) precomputed reference log-probabilities of ``pairs``, or None."""
    sequences = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    lengths = torch.tensor([len(c) for _, c in sequences], dtype=torch.float32)
    return PairBatch(make_rows(sequences, pad_id), reference, lengths)


class DpoLoss(nn.Module):
    """The summed DPO loss of a batch of pairs; the step's metrics (TRL's names) accumulate
    in ``sums`` as device tensors (read only when a line is logged)."""

    def __init__(self, model: nn.Module, beta: float, loss_type: str) -> None:
        super().__init__()
        self.model, self.beta, self.loss_type = model, beta, loss_type
        self.sums: dict[str, Tensor] = {}

    def forward(self, batch: PairBatch) -> Tensor:
        logps = sequence_logps(self.model, batch.rows)  # (2P,)
        reference = batch.reference
        if reference is None:
            reference = reference_logps(self.model, batch.rows)
        chosen, rejected = logps.chunk(2)
        ref_chosen, ref_rejected = reference.chunk(2)
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        h = self.beta * (chosen_ratio - rejected_ratio)
        if self.loss_type == "sigmoid":
            losses = -F.logsigmoid(h)
        elif self.loss_type == "hinge":
            losses = torch.relu(1 - h)
        else:  # ipo: log-ratios per completion token
            tokens_chosen, tokens_rejected = batch.completion_tokens.clamp(min=1).chunk(2)
            losses = (chosen_ratio / tokens_chosen - rejected_ratio / tokens_rejected - 1 / (2 * self.beta)) ** 2
        self._count(chosen.detach(), rejected.detach(), self.beta * chosen_ratio.detach(),
                    self.beta * rejected_ratio.detach())
        return losses.sum()

    def _count(self, chosen: Tensor, rejected: Tensor, chosen_reward: Tensor, rejected_reward: Tensor) -> None:
        values = {"rewards/chosen": chosen_reward, "rewards/rejected": rejected_reward,
                  "rewards/accuracies": (chosen_reward > rejected_reward).float(),
                  "rewards/margins": chosen_reward - rejected_reward, "logps/chosen": chosen,
                  "logps/rejected": rejected}
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0) + value.sum().double()


@torch.no_grad()
def reference_logps(model: nn.Module, rows: Rows) -> Tensor:
    """log π_ref of every row: the same model, every adapter switched off."""
    with disabled(model):
        return sequence_logps(model, rows)


class DpoTask:
    """Preference pairs and the DPO loss; units are pairs."""

    counter = "pairs"
    loss_label = "DPO loss per pair"

    def __init__(self, model: nn.Module, train_set: Pairs, eval_set: Pairs | None, config: TrainConfig,
                 pad_id: int, processes: Processes = Processes()) -> None:
        self.model, self.config, self.pad_id = model, config, pad_id
        self.train_set, self.eval_set = train_set, eval_set
        self.held_out = eval_set is not None and bool(eval_set.pairs)
        self.total_steps = config.max_steps or math.ceil(config.epochs * len(train_set.pairs) / config.batch_size)
        self.loss: DpoLoss | None = None
        self.reference: dict[str, Tensor] | None = None  # "train", "eval": (N, 2) precomputed
        self.processes = processes

    def adapted(self, model: nn.Module) -> None:
        if self.config.gradient_checkpointing:
            checkpoint_activations(model)
        if self.config.precompute_ref:
            self.reference = self._precomputed(next(model.parameters()).device)

    def _precomputed(self, device: torch.device) -> dict[str, Tensor]:
        """The reference log-probabilities of every pair: read from the run, or computed
        once (adapters off, so the same before and after any step) and written there."""
        path = self.config.out_dir / REFERENCE_FILE
        sets = {"train": self.train_set, "eval": self.eval_set}
        sizes = {name: len(s.pairs) for name, s in sets.items() if s is not None}
        if path.exists():
            stored = load_file(path)
            if {name: len(t) for name, t in stored.items()} == sizes:
                return stored
        stored = {}
        for name, pairs in sets.items():
            if pairs is None:
                continue
            parts = []
            for start in range(0, len(pairs.pairs), self.config.micro_batch_size):
                batch = collate_pairs(pairs.pairs[start:start + self.config.micro_batch_size], self.pad_id)
                parts.append(reference_logps(self.model, batch.rows.to(device)).cpu().view(2, -1).T)
            stored[name] = torch.cat(parts).contiguous()  # (N, 2): chosen, rejected
        if self.processes.main:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes(path, safetensors_bytes(stored))
        return stored

    def loss_module(self) -> nn.Module:
        self.loss = DpoLoss(self.model, self.config.get("beta"), self.config.get("loss_type"))
        return self.loss

    def note(self, trainable: int) -> str:
        config, train_set = self.config, self.train_set
        formats = ", ".join(f"{count:,} {kind}" for kind, count in sorted(train_set.formats.items()))
        dropped = train_set.dropped + (self.eval_set.dropped if self.eval_set else 0)
        truncated = train_set.truncated + (self.eval_set.truncated if self.eval_set else 0)
        return (f"data: {len(train_set.pairs)} preference pairs, {len(self.eval_set.pairs) if self.eval_set else 0} "
                f"held out (records: {formats}), {truncated} truncated to {config.max_length} tokens, {dropped} "
                f"dropped (a completion cut to nothing); DPO ({config.get('loss_type')}, beta {config.get('beta')}, "
                f"reference: adapter off{', precomputed' if config.precompute_ref else ''}); {self.total_steps} steps "
                f"of {config.batch_size} pairs; {trainable:,} trainable parameters")

    def _batch(self, which: str, indices: list[int]) -> PairBatch:
        pairs = (self.train_set if which == "train" else self.eval_set).pairs
        reference = None
        if self.reference is not None:
            reference = self.reference[which][indices].T.reshape(-1)  # chosen..., rejected...
        return collate_pairs([pairs[i] for i in indices], self.pad_id, reference)

    def batches(self, step: int, processes: Processes, device: torch.device) -> tuple[list[PairBatch], int, int]:
        config = self.config
        self.loss.sums.clear()
        indices = step_indices(len(self.train_set.pairs), config.batch_size, step, config.seed)
        chunks = micro_batches(indices, processes.rank, processes.world_size, config.micro_batch_size)
        return [self._batch("train", chunk).to(device) for chunk in chunks], config.batch_size, config.batch_size

    @torch.no_grad()
    def evaluate(self, loss: nn.Module, processes: Processes, device: torch.device,
                 autocast) -> dict[str, float] | None:
        """Mean DPO loss and reward accuracy / margin over the held-out pairs."""
        if not self.held_out:
            return None
        was_training, kept = loss.training, dict(self.loss.sums)
        loss.eval()
        self.loss.sums.clear()
        total = 0.0
        for chunk in micro_batches(list(range(len(self.eval_set.pairs))), processes.rank, processes.world_size,
                                   self.config.micro_batch_size):
            with autocast:
                total += loss(self._batch("eval", chunk).to(device)).item()
        count = len(self.eval_set.pairs)
        result = {"eval_loss": processes.sum(total, device) / count}
        for name in ("rewards/accuracies", "rewards/margins"):
            result[f"eval_{name}"] = float(processes.sum(self.loss.sums[name], device)) / count
        self.loss.sums = kept
        loss.train(was_training)
        return result

    def metrics(self, state: dict[str, Any]) -> dict[str, Any]:
        pairs = self.config.batch_size
        values = {name: float(self.processes.sum(total, total.device)) / pairs
                  for name, total in self.loss.sums.items()}
        return {**values, "pairs": state["pairs"], "pairs_per_second": state["pairs"] / state["seconds"]}

    def result(self, run: Run, resumed_from: int | None, eval_after: dict[str, float] | None) -> PreferenceResult:
        out, state = run.config.out_dir, run.state
        before = state["eval_before"] or {}
        return PreferenceResult(
            out=out, adapter=out / "adapter", steps=self.total_steps, resumed_from=resumed_from,
            train_loss=state["train_loss"], eval_loss_before=before.get("eval_loss"),
            eval_loss_after=(eval_after or {}).get("eval_loss"), tokens_per_second=0.0, seconds=state["seconds"],
            peak_memory_bytes=peak_memory(run.device), adapter_bytes=directory_bytes(out / "adapter"),
            truncated=self.train_set.truncated, eval_accuracy_before=before.get("eval_rewards/accuracies"),
            eval_accuracy_after=(eval_after or {}).get("eval_rewards/accuracies"),
            pairs_per_second=state["pairs"] / max(state["seconds"], 1e-9), dropped=self.train_set.dropped)


def split_pairs(pairs: Pairs, fraction: float, seed: int) -> tuple[Pairs, Pairs | None]:
    if fraction == 0:
        return pairs, None
    kept, held = split_eval(pairs.pairs, fraction, seed)
    return (Pairs(kept, pairs.source, pairs.truncated, pairs.dropped, pairs.formats),
            Pairs(held, f"{pairs.source} (held out)"))


RESULT = PreferenceResult
check_records = check_pairs


def prepare_data(config: TrainConfig, tokenizer, sources: dict[str, Source]) -> tuple[Pairs, Pairs | None]:
    """Tokenized training and held-out pairs; without --data, pairs built from chatterbot-corpus."""
    if config.data is None:
        from .corpus import preference_pairs

        where = f"chatterbot-corpus/{config.language}"
        records = [(f"{where}[{i}]", r) for i, r in enumerate(preference_pairs(config.language))]
        train_set = build_pairs(records, tokenizer, config.max_length, where)
    else:
        train_set = build_pairs(sources[config.data].records(), tokenizer, config.max_length, config.data)
    if config.eval_data is not None:
        return train_set, build_pairs(sources[config.eval_data].records(), tokenizer, config.max_length,
                                      config.eval_data)
    return split_pairs(train_set, config.eval_fraction, config.seed)


def make_task(model: nn.Module, tokenizer, data: tuple[Pairs, Pairs | None], config: TrainConfig,
              processes: Processes) -> DpoTask:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return DpoTask(model, *data, config, pad or 0, processes)
