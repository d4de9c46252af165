"""The GRPO objective: group-normalised advantages and the clipped policy-gradient loss.

    A_i   = (r_i - mean(r_group)) / (std(r_group) + 1e-4)
    ρ_t   = π(y_t | x, y_<t) / π_old(y_t | x, y_<t)
    loss  = Σ_t -min(ρ_t A, clip(ρ_t, 1 - ε, 1 + ε) A) + β KL_t
    KL_t  = ρ_t (π_ref/π - log(π_ref/π) - 1)

as TRL's GRPOTrainer computes them (its defaults: rewards summed then normalised per group,
the ``dapo`` token-level sum). grpo.py samples the completions and scores them; this module
turns rewards into advantages and rollouts into a loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..attach import disabled
from .config import TrainConfig
from .loop import TrainingError
from .sequences import Rows, make_rows, token_logps


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    prompt: str | list[dict[str, str]]  # as the record gave it: what the reward functions see
    columns: dict  # the record's other keys
    where: str


@dataclass
class Completion:
    ids: list[int]  # the end-of-sequence token included when the model stopped
    sampled: list[float]  # log-probability of each token as the engine sampled it
    clipped: bool  # cut at max_completion_length


def advantages(rewards: Tensor, weights: Tensor, generations: int, scale: str) -> tuple[Tensor, Tensor]:
    """(total reward, advantage) of every completion from the (N, F) rewards (NaN: not
    scored), completions grouped by prompt: TRL's sum_then_normalize."""
    unscorable = torch.isnan(rewards).all(dim=1)
    total = (rewards * weights).nansum(dim=1)
    total[unscorable] = torch.nan
    groups = total.view(-1, generations)
    mean = torch.nanmean(groups, dim=1).repeat_interleave(generations)
    if scale == "batch":
        std = nanstd(total).expand_as(total)
    else:
        std = nanstd(groups, dim=1).repeat_interleave(generations)
    advantage = total - mean
    if scale != "none":
        advantage = advantage / (std + 1e-4)
    return total, torch.nan_to_num(advantage, nan=0.0)  # an unscorable completion teaches nothing


def nanstd(values: Tensor, dim: int | None = None) -> Tensor:
    """The standard deviation with Bessel's correction, ignoring NaN."""
    if dim is None:
        values, dim = values.reshape(-1), 0
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    count = (~torch.isnan(values)).sum(dim=dim)
    variance = torch.nanmean((values - mean) ** 2, dim=dim) * count / (count - 1)
    return variance.sqrt()


@dataclass
class RolloutBatch:
    rows: Rows
    advantages: Tensor  # (B,)
    sampled: Tensor  # (B, T): the engine's log-probabilities at the completion positions

    def to(self, device: torch.device) -> RolloutBatch:
        return RolloutBatch(self.rows.to(device), self.advantages.to(device), self.sampled.to(device))


def collate_rollouts(pairs: list[tuple[Prompt, Completion]], advantage: Tensor, pad_id: int) -> RolloutBatch:
    rows = make_rows([(p.ids, c.ids) for p, c in pairs], pad_id)
    sampled = torch.zeros(rows.targets.shape)
    for row, (prompt, completion) in enumerate(pairs):
        start = len(prompt.ids) - 1
        sampled[row, start:start + len(completion.ids)] = torch.tensor(completion.sampled)
    return RolloutBatch(rows, advantage, sampled)


class GrpoLoss(nn.Module):
    """The summed GRPO loss of a batch of rollouts; the step's diagnostics accumulate in
    ``sums`` (device tensors)."""

    def __init__(self, model: nn.Module, config: TrainConfig) -> None:
        super().__init__()
        self.model, self.config = model, config
        self.beta, self.epsilon = config.get("beta"), config.get("epsilon")
        self.temperature, self.loss_type = config.get("temperature"), config.get("loss_type")
        self.sums: dict[str, Tensor] = {}

    def forward(self, batch: RolloutBatch) -> Tensor:
        rows, mask = batch.rows, batch.rows.mask
        if self.beta:
            with torch.no_grad(), disabled(self.model):
                reference = token_logps(self.model, rows, self.temperature)
        logps = token_logps(self.model, rows, self.temperature)  # (B, T)
        ratio = torch.exp(logps - logps.detach())  # π / π_old, with π_old = π: 1, gradient ∇log π
        clipped = ratio.clamp(1 - self.epsilon, 1 + self.epsilon)
        advantage = batch.advantages[:, None]
        per_token = -torch.min(ratio * advantage, clipped * advantage)
        if self.beta:
            kl = torch.exp(reference - logps) - (reference - logps) - 1
            # times ρ (1 in value): the gradient of the unbiased reverse-KL estimator, TRL's default
            per_token = per_token + self.beta * kl * ratio
            self._add("kl", (kl.detach() * mask).sum())
        if self.loss_type == "grpo":  # each completion's mean over its tokens
            loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum()
        else:  # dapo, dr_grpo: the sum, divided by the step's units by the loop
            loss = (per_token * mask).sum()
        self._check(logps.detach(), batch.sampled, mask)
        low = ((ratio < 1 - self.epsilon) & (advantage < 0)).float() * mask
        high = ((ratio > 1 + self.epsilon) & (advantage > 0)).float() * mask
        for name, value in (("clip_ratio/low_mean", low), ("clip_ratio/high_mean", high),
                            ("clip_ratio/region_mean", low + high)):
            self._add(name, value.sum().detach())
        self._add("tokens", mask.sum())
        return loss

    def _check(self, logps: Tensor, sampled: Tensor, mask: Tensor) -> None:
        """The engine's log-probabilities against the trainer's: logged, and fatal past the threshold."""
        if not self.training:
            return
        difference = (logps - sampled).abs() * mask
        self._add("rollout/logprob_diff", difference.sum())
        largest = difference.max()
        self.sums["rollout/logprob_diff_max"] = torch.maximum(self.sums.get("rollout/logprob_diff_max", largest),
                                                              largest)
        mean = float(difference.sum() / mask.sum().clamp(min=1))
        if mean > self.config.get("max_logprob_diff"):
            raise TrainingError(f"the rollouts' log-probabilities differ from the trainer's by {mean:.4f} per token on "
                                f"average (max {float(largest):.4f}), past max_logprob_diff="
                                f"{self.config.get('max_logprob_diff')}: the generator is not sampling from the "
                                "weights being trained (or the precision differs: --bf16); the step was not applied")

    def _add(self, name: str, value: Tensor) -> None:
        self.sums[name] = self.sums.get(name, 0) + value.double()
