"""TrainConfig: every setting of a fine-tuning run, with its default.

A run is described completely by this object: ``lorakit train`` builds it from a YAML
file and command-line flags, writes it to ``<out>/config.yaml``, and a resumed run
must find the same settings there.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ALL_LINEAR, ConfigError, LoraConfig

SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class TrainConfig:
    # -- model and adapter
    model: str = "smollm2-135m"  # any lorakit.load_model spec: HF directory, .gguf file, smollm2-135m
    dtype: str = "float32"  # base weights; adapters always train in float32
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | tuple[str, ...] = ALL_LINEAR  # as in LoraConfig
    # -- data
    data: str | None = None  # JSONL file; None trains on chatterbot-corpus dialogs in `language`
    language: str = "swedish"  # chatterbot-corpus language when `data` is None
    eval_data: str | None = None  # held-out JSONL; otherwise `eval_fraction` of `data` is held out
    eval_fraction: float = 0.1  # 0 disables the held-out split
    max_length: int = 512  # tokens per example; longer ones are truncated and counted
    packing: bool = False  # pack short examples into rows of max_length (no cross-example attention)
    mask_prompt: bool = True  # train only completions / assistant turns
    # -- optimization
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 8  # examples (or packed rows) per optimizer step, over all processes
    micro_batch_size: int = 8  # per forward pass and process; batch_size / (micro * processes) are accumulated
    lr: float = 2e-4
    loraplus_ratio: float | None = None  # LoRA+: B trains at lr * ratio (Hayou et al., 2024, arXiv:2402.12354)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"  # after warmup, from lr down to min_lr_ratio * lr
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0  # None: no clipping
    bf16: bool = False  # bfloat16 autocast for the forward pass
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, more time
    seed: int = 0
    # -- output
    out: str = "runs/lorakit"
    save_every: int = 50  # checkpoint every N steps (and always at the end)
    keep_checkpoints: int = 2
    eval_every: int = 0  # 0: evaluate only before and after training
    log_every: int = 1
    device: str = "auto"  # auto: cuda if available, else cpu

    def __post_init__(self) -> None:
        problems = []
        positive = ("rank", "batch_size", "micro_batch_size", "max_length", "save_every", "keep_checkpoints",
                    "log_every")
        problems += [f"{name} must be >= 1, got {getattr(self, name)}" for name in positive if getattr(self, name) < 1]
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"max_steps must be >= 1, got {self.max_steps}")
        if self.epochs <= 0:
            problems.append(f"epochs must be > 0, got {self.epochs}")
        if self.lr <= 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.eval_fraction < 1:
            problems.append(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.loraplus_ratio is not None and self.loraplus_ratio <= 0:
            problems.append(f"loraplus_ratio must be > 0, got {self.loraplus_ratio}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            problems.append(f"max_grad_norm must be > 0 (or null for no clipping), got {self.max_grad_norm}")
        if self.warmup_steps < 0 or self.eval_every < 0:
            problems.append("warmup_steps and eval_every must be >= 0")
        if self.batch_size % self.micro_batch_size:
            problems.append(f"batch_size {self.batch_size} is not a multiple of micro_batch_size "
                            f"{self.micro_batch_size}")
        if problems:
            raise ConfigError("invalid training config:\n  " + "\n  ".join(problems))
        self.lora()  # rank, alpha, dropout and targets are checked by LoraConfig

    def lora(self) -> LoraConfig:
        return LoraConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout, targets=self.targets)

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if isinstance(self.targets, tuple):
            data["targets"] = list(self.targets)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from plain values (YAML); unknown keys are an error that names them."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{source}: unknown setting(s) {unknown}; known: {sorted(names)}")
        values = dict(data)
        for f in dataclasses.fields(cls):
            # YAML 1.1 reads 1e-4 (no dot) as a string; numbers are meant.
            if "float" in str(f.type) and isinstance(values.get(f.name), str):
                try:
                    values[f.name] = float(values[f.name])
                except ValueError:
                    raise ConfigError(f"{source}: {f.name} must be a number, got {values[f.name]!r}") from None
        if isinstance(values.get("targets"), list):
            values["targets"] = tuple(values["targets"])
        try:
            return cls(**values)
        except TypeError as err:  # e.g. a string where a number belongs
            raise ConfigError(f"{source}: {err}") from None


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The settings in a YAML file, with the file named in any parse error."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(err, 'problem', err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def dump_yaml(config: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False)
