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

from ..config import ALL_LINEAR, KINDS, ConfigError, LoraConfig, init_names, known_init
from ..quantize import QUANTIZATIONS
from ..variants import adapter_class
from .tracking import check_trackers

SCHEDULES = ("cosine", "linear", "constant")
METHODS = ("sft", "dpo", "grpo")
# TRL's names and defaults (DPOConfig, GRPOConfig) for what a method reads.
LOSS_TYPES = {"dpo": ("sigmoid", "ipo", "hinge"), "grpo": ("dapo", "grpo", "dr_grpo")}
SCALE_REWARDS = ("group", "batch", "none")
METHOD_DEFAULTS = {
    "dpo": {"beta": 0.1, "loss_type": "sigmoid"},
    "grpo": {"beta": 0.0, "loss_type": "dapo", "num_generations": 8, "temperature": 1.0, "top_p": 1.0,
             "max_completion_length": 256, "epsilon": 0.2, "scale_rewards": "group", "max_logprob_diff": 0.1},
}
METHOD_SETTINGS = {"dpo": ("beta", "loss_type", "precompute_ref"),
                   "grpo": ("beta", "loss_type", "num_generations", "temperature", "top_p", "max_completion_length",
                            "reward", "reward_weights", "epsilon", "scale_rewards", "max_logprob_diff")}
SMALL_LR = 1e-5  # below this a LoRA run barely moves (see TrainConfig.warnings)
SHARDS = ("auto", "none", "ddp", "fsdp")
DTYPES = ("float32", "bfloat16", "float16")


def setting(default: Any, help: str) -> Any:
    """A field with its one-line meaning, shown by ``lorakit train --help``."""
    return field(default=default, metadata={"help": help})


class Settings:
    """What every run's settings share: YAML in and out, and the run directory."""

    out: str

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {key: list(value) if isinstance(value, tuple) else value for key, value in data.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config"):
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
        if isinstance(values.get("reward"), (str, list)):  # YAML: one spec or a list
            values["reward"] = (values["reward"],) if isinstance(values["reward"], str) else tuple(values["reward"])
        if isinstance(values.get("reward_weights"), list):
            values["reward_weights"] = ",".join(str(w) for w in values["reward_weights"])
        if isinstance(values.get("report_to"), (str, list)):  # YAML: a name, "a,b", or a list
            given = values["report_to"]
            values["report_to"] = tuple(n.strip() for n in given.split(",")) if isinstance(given, str) else tuple(given)
        try:
            return cls(**values)
        except TypeError as err:  # e.g. a string where a number belongs
            raise ConfigError(f"{source}: {err}") from None


@dataclass(frozen=True)
class TrainConfig(Settings):
    """Every setting of a run. Each field is also a ``lorakit train`` flag
    (``micro_batch_size`` -> ``--micro-batch-size``) and a YAML key."""

    # -- model and adapter
    model: str = setting("smollm2-135m", "Base model: HF model directory, Hub id (org/name[@revision]), .gguf file, or smollm2-135m.")
    dtype: str = setting("float32", "Base weight dtype: float32, bfloat16 or float16; adapters train in float32.")
    quantize: str | None = setting(None, "Quantize the frozen base: nf4 (QLoRA) or int8 (bfloat16 compute; "
                                         "overrides dtype); adapters train in float32.")
    rank: int = setting(8, "LoRA rank r.")
    alpha: float = setting(16.0, "LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = setting(0.0, "Dropout on the adapter's input while training.")
    targets: str | tuple[str, ...] = setting(ALL_LINEAR, "'all-linear', comma-separated module names, "
                                                         "or re:<regex> (a list in YAML).")
    variant: str = setting("lora", "lora, dora (a learned magnitude per output unit), or the LyCORIS kinds loha "
                                   "(Hadamard product) and lokr (Kronecker product).")
    init: str = setting("default", "Initialisation: default (A Kaiming-uniform), gaussian, or pissa / olora "
                                   "(A and B from W's SVD / QR).")
    # -- method: what the loss is (training/text.py, preference.py, grpo.py)
    method: str = setting("sft", "sft (next-token loss on the completions), dpo (preference pairs: prompt, chosen, "
                                 "rejected) or grpo (prompts, sampled completions scored by --reward).")
    beta: float | None = setting(None, "dpo: the DPO temperature (default 0.1); grpo: the KL weight (default 0: no "
                                       "reference). The reference is the model with the adapter switched off.")
    loss_type: str | None = setting(None, "dpo: sigmoid (default), ipo or hinge; grpo: dapo (default), grpo or "
                                          "dr_grpo (TRL's names).")
    precompute_ref: bool = setting(False, "dpo: compute the reference log-probabilities once over the data "
                                          "(stored with the run) instead of at every step.")
    num_generations: int | None = setting(None, "grpo: completions sampled per prompt (default 8); batch_size "
                                                "counts completions and must be a multiple.")
    temperature: float | None = setting(None, "grpo: sampling temperature of the rollouts (default 1.0).")
    top_p: float | None = setting(None, "grpo: nucleus sampling of the rollouts (default 1.0: off).")
    max_completion_length: int | None = setting(None, "grpo: tokens per sampled completion at most (default 256).")
    reward: tuple[str, ...] = setting((), "grpo: reward function, path/to/file.py:function or module:function, or "
                                          "a built-in: match:COLUMN, normalized_match:COLUMN, format:REGEX, "
                                          "length:TOKENS (repeatable).")
    reward_weights: str | None = setting(None, "grpo: one weight per --reward, comma-separated (default: all 1).")
    epsilon: float | None = setting(None, "grpo: clipping of the probability ratio (default 0.2).")
    scale_rewards: str | None = setting(None, "grpo: divide advantages by the std of the group (default), of the "
                                              "batch, or none.")
    max_logprob_diff: float | None = setting(None, "grpo: stop when the mean |log-prob the rollout sampled with - "
                                                   "the trainer's| exceeds this (default 0.1).")
    # -- data
    data: str | None = setting(None, "Training data: a JSONL, parquet, CSV or JSON file, a save_to_disk folder, or "
                                     "a Hub dataset id; none: chatterbot-corpus dialogs in --language.")
    data_split: str = setting("train", "Split of a Hub dataset or a saved DatasetDict to train on.")
    data_config: str | None = setting(None, "Config (subset) name of a Hub dataset.")
    columns: str | None = setting(None, "Record keys from other columns: prompt=question,completion=answer (only "
                                        "the mapped columns are read).")
    language: str = setting("swedish", "chatterbot-corpus language when there is no --data.")
    eval_data: str | None = setting(None, "Held-out data (any --data form); none: --eval-fraction of --data is "
                                          "held out.")
    eval_split: str = setting("test", "Split of a Hub dataset or a saved DatasetDict given as --eval-data.")
    eval_fraction: float = setting(0.1, "Fraction of the data held out for evaluation (0: none).")
    max_length: int = setting(512, "Tokens per example; longer ones are truncated and counted.")
    packing: bool = setting(False, "Pack short examples into rows of max_length (no cross-example attention).")
    mask_prompt: bool = setting(True, "Train only completions / assistant turns.")
    # -- optimization
    epochs: float = setting(1.0, "Passes over the training data.")
    max_steps: int | None = setting(None, "Optimizer steps; overrides --epochs.")
    batch_size: int = setting(8, "Examples (or packed rows) per optimizer step, over all processes.")
    micro_batch_size: int = setting(8, "Examples per forward pass and process; the rest is accumulated.")
    lr: float = setting(2e-4, "Peak learning rate.")
    loraplus_ratio: float | None = setting(None, "LoRA+: B learns at lr x ratio (Hayou et al., 2024).")
    weight_decay: float = setting(0.0, "AdamW weight decay.")
    warmup_steps: int = setting(0, "Linear warmup steps.")
    schedule: str = setting("cosine", "Decay after warmup: cosine, linear or constant.")
    min_lr_ratio: float = setting(0.0, "The schedule ends at lr x min_lr_ratio.")
    max_grad_norm: float | None = setting(1.0, "Gradient clipping norm (none: no clipping).")
    bf16: bool = setting(False, "bfloat16 autocast for the forward pass.")
    gradient_checkpointing: bool = setting(False, "Recompute activations in backward: less memory, more time.")
    seed: int = setting(0, "Seed: the same seed gives the same adapter (bit for bit on CPU).")
    # -- processes
    shard: str = setting("auto", "Under torchrun: ddp (every process holds the whole base), fsdp (the frozen "
                                 "base sharded over the processes, FSDP2), or auto (ddp).")
    fsdp_offload: bool = setting(False, "With --shard fsdp: keep the sharded parameters in CPU memory.")
    # -- output
    out: str = setting("runs/lorakit", "Run directory: adapter, checkpoints, metrics, summary.")
    save_every: int = setting(50, "Checkpoint every N steps (and always at the end).")
    keep_checkpoints: int = setting(2, "Newest checkpoints kept.")
    eval_every: int = setting(0, "Evaluate every N steps (0: only before and after training).")
    log_every: int = setting(1, "Log every N steps.")
    report_to: tuple[str, ...] = setting((), "Experiment tracker: tensorboard, wandb or mlflow (repeatable; "
                                            "metrics.jsonl and loss.png are always written).")
    device: str = setting("auto", "auto (cuda if available), cpu or cuda.")

    def __post_init__(self) -> None:
        problems = check_trackers(self.report_to)
        positive = ("rank", "batch_size", "micro_batch_size", "max_length", "save_every", "keep_checkpoints",
                    "log_every")
        problems += [f"{name} must be >= 1, got {getattr(self, name)}" for name in positive if getattr(self, name) < 1]
        if self.variant not in KINDS:
            problems.append(f"variant must be one of {', '.join(KINDS)}, got {self.variant!r}")
        if not known_init(self.init):
            problems.append(f"init must be one of {init_names()}, got {self.init!r}")
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
        if self.quantize is not None and self.quantize not in QUANTIZATIONS:
            problems.append(f"quantize must be one of {QUANTIZATIONS}, got {self.quantize!r}")
        if self.loraplus_ratio is not None and self.loraplus_ratio <= 0:
            problems.append(f"loraplus_ratio must be > 0, got {self.loraplus_ratio}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            problems.append(f"max_grad_norm must be > 0 (or null for no clipping), got {self.max_grad_norm}")
        if self.warmup_steps < 0 or self.eval_every < 0:
            problems.append("warmup_steps and eval_every must be >= 0")
        if self.batch_size % self.micro_batch_size:
            problems.append(f"batch_size {self.batch_size} is not a multiple of micro_batch_size "
                            f"{self.micro_batch_size}")
        problems += self._shard_problems() + self._method_problems()
        if problems:
            raise ConfigError("invalid training config:\n  " + "\n  ".join(problems))
        self.lora()  # rank, alpha, dropout and targets are checked by LoraConfig

    def _shard_problems(self) -> list[str]:
        if self.shard not in SHARDS:
            return [f"shard must be one of {', '.join(SHARDS)}, got {self.shard!r}"]
        if self.shard != "fsdp":
            return ["fsdp_offload needs --shard fsdp"] if self.fsdp_offload else []
        try:
            lora = self.lora()
        except ConfigError:
            return []  # reported by the check of the LoRA settings
        kind = adapter_class(lora)
        unsupported = {"quantize": self.quantize is not None, kind.describe(lora): not kind.shardable,
                       f"--method {self.method}": self.method != "sft"}
        return [f"--shard fsdp with {what} is not supported yet" for what, used in unsupported.items() if used]

    def _method_problems(self) -> list[str]:
        if self.method not in METHODS:
            return [f"method must be one of {', '.join(METHODS)}, got {self.method!r}"]
        own = METHOD_SETTINGS.get(self.method, ())
        given = [name for name in dict.fromkeys(n for names in METHOD_SETTINGS.values() for n in names)
                 if name not in own and getattr(self, name) not in (None, False, ())]
        problems = [f"--{name.replace('_', '-')} belongs to --method "
                    f"{', '.join(m for m, names in METHOD_SETTINGS.items() if name in names)}, not {self.method}"
                    for name in given]
        if problems:
            return problems
        if self.method == "sft":
            return []
        loss_type = self.get("loss_type")
        if loss_type not in LOSS_TYPES[self.method]:
            problems.append(f"loss_type must be one of {', '.join(LOSS_TYPES[self.method])} with --method "
                            f"{self.method}, got {loss_type!r}")
        if self.beta is not None and self.beta < 0 or self.method == "dpo" and self.get("beta") == 0:
            problems.append(f"beta must be > 0 with --method dpo and >= 0 with grpo, got {self.beta}")
        if self.method == "grpo":
            problems += self._grpo_problems()
        return problems

    def _grpo_problems(self) -> list[str]:
        problems = []
        generations = self.get("num_generations")
        if generations < 2:
            problems.append(f"num_generations must be >= 2 (advantages compare completions of one prompt), got "
                            f"{generations}")
        elif self.batch_size % generations:
            problems.append(f"batch_size {self.batch_size} counts completions: it must be a multiple of "
                            f"num_generations {generations}")
        if not self.reward:
            problems.append("--method grpo needs at least one --reward (a function, or a built-in such as "
                            "match:answer)")
        weights = self.weights()
        if weights is None:
            problems.append(f"reward_weights must be comma-separated numbers, got {self.reward_weights!r}")
        elif len(weights) != len(self.reward):
            problems.append(f"reward_weights has {len(weights)} weight(s) for {len(self.reward)} --reward(s)")
        if self.get("temperature") <= 0 or not 0 < self.get("top_p") <= 1:
            problems.append(f"temperature must be > 0 and top_p in (0, 1], got {self.get('temperature')} and "
                            f"{self.get('top_p')}")
        if self.get("max_completion_length") < 1 or self.get("epsilon") <= 0 or self.get("max_logprob_diff") <= 0:
            problems.append("max_completion_length, epsilon and max_logprob_diff must be > 0")
        if self.get("scale_rewards") not in SCALE_REWARDS:
            problems.append(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got "
                            f"{self.get('scale_rewards')!r}")
        return problems

    def get(self, name: str) -> Any:
        """A method setting's value: as given, else the method's default (TRL's)."""
        value = getattr(self, name)
        return METHOD_DEFAULTS.get(self.method, {}).get(name) if value is None else value

    def weights(self) -> list[float] | None:
        """One weight per reward (1 each when not given); None when they are not numbers."""
        if self.reward_weights is None:
            return [1.0] * len(self.reward)
        try:
            return [float(w) for w in self.reward_weights.split(",")]
        except ValueError:
            return None

    def warnings(self) -> list[str]:
        """What is legal but likely a mistake."""
        if self.lr < SMALL_LR:
            return [f"lr {self.lr:g} is a full fine-tuning rate: LoRA needs about 10x more (\"LoRA Without Regret\", "
                    f"2025: the best LoRA rate is ~10x the full one), so below {SMALL_LR:g} a run often learns "
                    "nothing; lorakit's recipes use 1e-5 to 2e-4 (docs/rl.md)"]
        return []

    def lora(self) -> LoraConfig:
        return LoraConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout, targets=self.targets,
                          init=self.init, variant=self.variant)


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


def dump_yaml(config: Settings) -> str:
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False)
