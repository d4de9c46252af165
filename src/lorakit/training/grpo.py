"""Group Relative Policy Optimization: the RL task of the training loop (loop.py).

Every step samples G completions of each of its prompts, scores them with the reward
functions (rewards.py), and trains on the clipped policy-gradient loss of their
group-normalised advantages (policy.py; Shao et al., arXiv:2402.03300, with DAPO's
token-level sum, Yu et al., arXiv:2503.14476: TRL's defaults). π_ref, when β > 0, is the
model with its adapter switched off.

The rollouts come from lorakit's serving engine (serve/engine.py: batched decode, KV
cache) running the very model being trained, its adapter live: nothing is merged, copied
or synchronised between the optimizer step and the next generation. The engine reports
the log-probability each token was sampled with; the trainer recomputes it, and the step
logs the difference (``rollout/logprob_diff``) and stops the run when it passes
``max_logprob_diff``, so a generator that drifted from the weights cannot train on
silently. Each completion is sampled with its own generator seeded by (seed, step,
prompt, index), so a resumed run samples exactly what an uninterrupted one does.
"""

from __future__ import annotations

import math
import time
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .batches import micro_batches, split_eval, step_indices
from .checkpoint import latest_checkpoint
from .config import TrainConfig
from .data import _check_messages, _located, check_records as check_shapes
from .distributed import Processes
from .loop import Run, TrainingError, peak_memory
from .policy import Completion, GrpoLoss, Prompt, RolloutBatch, advantages, collate_rollouts, nanstd
from .rewards import Reward, RewardError, load_reward, score
from .sources import DataError, Source
from .text import TrainResult, checkpoint_activations, directory_bytes


@dataclass
class GrpoResult(TrainResult):
    eval_reward_before: float | None = None  # mean held-out reward, greedy
    eval_reward_after: float | None = None
    rollout_tokens_per_second: float = 0.0


def prompt_format(record: dict[str, Any]) -> str:
    if "prompt" not in record:
        raise DataError(f'a GRPO record needs a "prompt" (a string or a list of messages), got keys {sorted(record)} '
                        '(map another column with --columns prompt=question,...)')
    if isinstance(record["prompt"], str):
        if not record["prompt"]:
            raise DataError('"prompt" must not be empty')
        return "standard"
    _check_messages(record["prompt"])
    return "conversational"


def check_records(records: Iterable[tuple[str, dict[str, Any]]], source: str) -> dict[str, int]:
    """Every prompt record's shape checked (no tokenizer); the count of each format."""
    return check_shapes(records, source, prompt_format)


RESULT = GrpoResult


def read_prompts(records: Iterable[tuple[str, dict[str, Any]]], tokenizer, config: TrainConfig, context: int | None,
                 rewards: list[Reward]) -> list[Prompt]:
    """Tokenized prompts; a prompt over max_length, or that leaves no room for
    max_completion_length in the model's context, or lacks a column a reward reads, is an
    error naming its record."""
    prompts, room = [], config.get("max_completion_length")
    for where, record in records:
        kind = _located(where, prompt_format, record)
        if kind == "conversational":
            ids = list(tokenizer.apply_chat_template(record["prompt"], tokenize=True, add_generation_prompt=True,
                                                     return_dict=True)["input_ids"])
        else:
            ids = list(tokenizer(record["prompt"])["input_ids"])
        if len(ids) > config.max_length:
            raise DataError(f"{where}: the prompt has {len(ids)} tokens, more than max_length={config.max_length}")
        if context is not None and len(ids) + room > context:
            raise DataError(f"{where}: the prompt has {len(ids)} tokens; with max_completion_length={room} that "
                            f"passes the model's context of {context} tokens")
        missing = [r.column for r in rewards if r.column is not None and r.column not in record]
        if missing:
            raise DataError(f"{where}: no column {missing[0]!r}, which the reward {rewards[0].name}:{missing[0]} reads")
        columns = {k: v for k, v in record.items() if k != "prompt"}
        prompts.append(Prompt(array("i", ids), record["prompt"], columns, where))
    if not prompts:
        raise DataError("no prompts")
    return prompts


def prepare_data(config: TrainConfig, tokenizer,
                 sources: dict[str, Source]) -> tuple[list[Prompt], list[Prompt], list[Reward]]:
    """Training and held-out prompts, and the reward functions (loaded once, here)."""
    from ..pretrained import load_config

    if config.data is None:
        raise DataError("--method grpo needs --data: prompts (and the columns the rewards read)")
    rewards = [load_reward(spec) for spec in config.reward]
    model_config = load_config(config.model)
    context = getattr(model_config, "max_position_embeddings", None)
    train = read_prompts(sources[config.data].records(), tokenizer, config, context, rewards)
    if config.eval_data is not None:
        return train, read_prompts(sources[config.eval_data].records(), tokenizer, config, context, rewards), rewards
    if config.eval_fraction == 0:
        return train, [], rewards
    return *split_eval(train, config.eval_fraction, config.seed), rewards


def make_task(model: nn.Module, tokenizer, data: tuple[list[Prompt], list[Prompt], list[Reward]],
              config: TrainConfig, processes: Processes) -> GrpoTask:
    train, held_out, rewards = data
    return GrpoTask(model, tokenizer, train, held_out, config, processes, rewards)


class GrpoTask:
    """Prompts, rollouts from the engine on the live model, rewards and the GRPO loss."""

    counter = "tokens"
    loss_label = "GRPO loss per completion token"

    def __init__(self, model: nn.Module, tokenizer, train: list[Prompt], held_out: list[Prompt], config: TrainConfig,
                 processes: Processes = Processes(), rewards: list[Reward] | None = None) -> None:
        """``rewards``: ``config.reward`` loaded (None: loaded here)."""
        self.model, self.tokenizer, self.config, self.processes = model, tokenizer, config, processes
        self.prompts, self.held_out_prompts = train, held_out
        self.held_out = bool(held_out)
        self.generations = config.get("num_generations")
        self.per_step = config.batch_size // self.generations  # prompts per optimizer step
        if self.per_step % processes.world_size:  # each process samples whole groups, as many as the others
            raise TrainingError(f"batch_size {config.batch_size} / num_generations {self.generations} = "
                                f"{self.per_step} prompts per step cannot be split over {processes.world_size} "
                                "processes: make it a multiple of the process count")
        self.total_steps = config.max_steps or math.ceil(config.epochs * len(train) / self.per_step)
        self.rewards = rewards if rewards is not None else [load_reward(spec) for spec in config.reward]
        self.weights = torch.tensor(config.weights(), dtype=torch.float32)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
        self.loss: GrpoLoss | None = None
        self.engine = None
        self.step_metrics: dict[str, float] = {}
        self.rollout = {"tokens": 0, "seconds": 0.0}

    def adapted(self, model: nn.Module) -> None:
        if self.config.gradient_checkpointing:
            checkpoint_activations(model)

    def loss_module(self) -> nn.Module:
        self.loss = GrpoLoss(self.model, self.config)
        return self.loss

    def note(self, trainable: int) -> str:
        config = self.config
        names = ", ".join(r.name for r in self.rewards)
        return (f"data: {len(self.prompts)} prompts, {len(self.held_out_prompts)} held out; GRPO "
                f"({config.get('loss_type')}, {self.generations} completions per prompt, {self.per_step} prompts per "
                f"step, beta {config.get('beta')}, rewards: {names}); rollouts from the engine on the live adapter; "
                f"{self.total_steps} steps; {trainable:,} trainable parameters")

    # -- rollouts ------------------------------------------------------------------------
    def generate(self, prompts: list[Prompt], seeds: list[int] | None, count: int) -> list[Completion]:
        """``count`` completions of each prompt from the engine on the model as it is now;
        ``seeds``: one per completion (sampling), or None (greedy, for evaluation)."""
        from ..serve.engine import Engine, Request, SamplingParams

        config, model = self.config, self.model
        if self.engine is None:
            self.engine = Engine(model, self.tokenizer, None)
        self.engine.max_batch = max(1, count * len(prompts))  # every completion of the step in one batch
        requests = []
        for i, prompt in enumerate(prompts):
            for g in range(count):
                params = SamplingParams(max_tokens=config.get("max_completion_length"),
                                        temperature=config.get("temperature") if seeds else 0.0,
                                        top_p=config.get("top_p"), seed=seeds[i * count + g] if seeds else None,
                                        sample_logprobs=True)
                requests.append(Request(list(prompt.ids), None, params))
        was_training = model.training
        started = time.perf_counter()
        try:
            self.engine.generate(requests)
        finally:
            model.train(was_training)
        self.rollout["seconds"] += time.perf_counter() - started
        completions = []
        for request in requests:
            if request.error is not None:
                raise TrainingError(f"a rollout failed: {request.error}")
            ids = list(request.generated)
            if request.stop_token is not None:  # the end-of-sequence token is trained: it ends the answer
                ids.append(request.stop_token)
            completions.append(Completion(ids, request.sampled_logprobs[:len(ids)],
                                          clipped=request.finish_reason == "length"))
            self.rollout["tokens"] += len(ids)
        return completions

    def seeds(self, step: int, indices: list[int]) -> list[int]:
        base = (self.config.seed * 1_000_003 + step) * 1_000_003
        return [(base + i * self.generations + g) % 2**63 for i in indices for g in range(self.generations)]

    def score(self, prompts: list[Prompt], completions: list[Completion], indices: list[int],
              count: int) -> Tensor:
        """(completions x rewards) rewards; a reward that fails stops the run, nothing lost."""
        every = [p for p in prompts for _ in range(count)]
        texts = [self.tokenizer.decode(c.ids, skip_special_tokens=True) for c in completions]
        shown = [t if isinstance(p.prompt, str) else [{"role": "assistant", "content": t}]
                 for p, t in zip(every, texts)]
        keys = list(dict.fromkeys(k for p in prompts for k in p.columns))
        columns = {k: [p.columns.get(k) for p in every] for k in keys}
        try:
            table = score(self.rewards, [p.prompt for p in every], shown, [c.ids for c in completions], columns,
                          [i for i in indices for _ in range(count)])
        except RewardError as err:
            checkpoint = latest_checkpoint(self.config.out_dir)
            kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
            where = ", ".join(f"{i}: {p.where}" for i, p in zip(indices, prompts))
            raise TrainingError(f"{err} [prompt {where}]; the step was not applied and the run stopped; {kept}") \
                from None
        return torch.tensor(table, dtype=torch.float32).view(len(completions), len(self.rewards))

    def batches(self, step: int, processes: Processes,
                device: torch.device) -> tuple[list[RolloutBatch], Tensor, Tensor]:
        config = self.config
        self.loss.sums.clear()
        order = step_indices(len(self.prompts), self.per_step, step, config.seed)
        indices = order[processes.rank::processes.world_size]  # whole groups on each process
        prompts = [self.prompts[i] for i in indices]
        completions = self.generate(prompts, self.seeds(step, indices), self.generations)
        rewards = self.score(prompts, completions, indices, self.generations)
        total, advantage = advantages(rewards, self.weights, self.generations, config.get("scale_rewards"))
        self._rollout_metrics(rewards, total, completions)
        pairs = [(p, c) for p, group in zip(prompts, _groups(completions, self.generations)) for c in group]
        batches = [collate_rollouts([pairs[i] for i in chunk], advantage[chunk], self.pad_id).to(device)
                   for chunk in micro_batches(list(range(len(pairs))), 0, 1, config.micro_batch_size)]
        tokens = processes.sum(sum(len(c.ids) for c in completions), device)
        units = {"dapo": tokens, "grpo": config.batch_size,
                 "dr_grpo": config.batch_size * config.get("max_completion_length")}[config.get("loss_type")]
        return batches, units, tokens

    def _rollout_metrics(self, rewards: Tensor, total: Tensor, completions: list[Completion]) -> None:
        lengths = torch.tensor([float(len(c.ids)) for c in completions])
        groups = total.view(-1, self.generations)
        metrics = {"reward": float(torch.nanmean(total)), "reward_std": float(nanstd(total)),
                   "frac_reward_zero_std": float((nanstd(groups, dim=1).nan_to_num(0) < 1e-8).float().mean()),
                   "completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
                   "completions/max_length": float(lengths.max()),
                   "completions/clipped_ratio": sum(c.clipped for c in completions) / len(completions)}
        for k, reward in enumerate(self.rewards):
            metrics[f"rewards/{reward.name}/mean"] = float(torch.nanmean(rewards[:, k]))
            metrics[f"rewards/{reward.name}/std"] = float(nanstd(rewards[:, k]))
        self.step_metrics = metrics

    @torch.no_grad()
    def evaluate(self, loss: nn.Module, processes: Processes, device: torch.device,
                 autocast) -> dict[str, float] | None:
        """Mean reward of one greedy completion per held-out prompt."""
        if not self.held_out:
            return None
        indices = list(range(processes.rank, len(self.held_out_prompts), processes.world_size))
        prompts = [self.held_out_prompts[i] for i in indices]
        rewards = self.score(prompts, self.generate(prompts, None, 1), indices, 1)
        total = (rewards * self.weights).nansum(dim=1)
        count = len(self.held_out_prompts)
        result = {"eval_reward": float(processes.sum(float(total.sum()), device)) / count}
        for k, reward in enumerate(self.rewards):
            result[f"eval_rewards/{reward.name}/mean"] = float(processes.sum(float(rewards[:, k].nansum()),
                                                                              device)) / count
        return result

    def metrics(self, state: dict[str, Any]) -> dict[str, Any]:
        sums = {k: float(self.processes.sum(v, v.device)) for k, v in self.loss.sums.items()
                if k != "rollout/logprob_diff_max"}
        tokens = max(sums.pop("tokens", 0.0), 1.0)
        values = {k: v / tokens for k, v in sums.items()}
        if "rollout/logprob_diff_max" in self.loss.sums:
            values["rollout/logprob_diff_max"] = float(self.loss.sums["rollout/logprob_diff_max"])
        rollout = self.rollout["tokens"] / max(self.rollout["seconds"], 1e-9)
        return {**self.step_metrics, **values, "rollout/tokens_per_second": rollout,
                "rollout/weight_bytes_copied": self.weight_bytes_copied(), "tokens": state["tokens"],
                "tokens_per_second": state["tokens"] / state["seconds"]}

    def weight_bytes_copied(self) -> int:
        """Bytes of weights the generator reads that are not the trainer's own tensors."""
        if self.engine is None:
            return 0
        trainer = {p.data_ptr() for p in self.model.parameters()}
        return sum(p.numel() * p.element_size() for p in self.engine.model.parameters()
                   if p.data_ptr() not in trainer)

    def result(self, run: Run, resumed_from: int | None, eval_after: dict[str, float] | None) -> GrpoResult:
        out, state = run.config.out_dir, run.state
        before = state["eval_before"] or {}
        return GrpoResult(
            out=out, adapter=out / "adapter", steps=self.total_steps, resumed_from=resumed_from,
            train_loss=state["train_loss"], eval_loss_before=None, eval_loss_after=None,
            tokens_per_second=state["tokens"] / max(state["seconds"], 1e-9), seconds=state["seconds"],
            peak_memory_bytes=peak_memory(run.device), adapter_bytes=directory_bytes(out / "adapter"), truncated=0,
            eval_reward_before=before.get("eval_reward"), eval_reward_after=(eval_after or {}).get("eval_reward"),
            rollout_tokens_per_second=self.rollout["tokens"] / max(self.rollout["seconds"], 1e-9))


def _groups(completions: list[Completion], size: int) -> list[list[Completion]]:
    return [completions[i:i + size] for i in range(0, len(completions), size)]
