"""`TrainingArguments`: Hugging Face's names and defaults for what a DeepSpeed config's "auto" reads."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

LR_SCHEDULER_TYPES = ("linear", "cosine", "constant", "constant_with_warmup")


@dataclasses.dataclass(frozen=True)
class TrainingArguments:
    """The subset of `transformers.TrainingArguments` zerojax uses, with the same names and defaults.

    `warmup_steps` follows Transformers 5: a value >= 1 is a step count, a value in (0, 1) a fraction of
    the total steps. `warmup_ratio` is the Transformers 4 spelling of that fraction. One field is not in
    Transformers: `train_dataset_size` (training samples per epoch), which with `num_train_epochs` gives
    the total step count when `max_steps` is not set — the Trainer reads it from its data loader.
    """

    output_dir: str | None = None
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    num_train_epochs: float = 3.0
    max_steps: int = -1
    lr_scheduler_type: str = "linear"
    warmup_steps: float = 0
    warmup_ratio: float = 0.0
    bf16: bool = False
    fp16: bool = False
    logging_steps: float = 500
    eval_steps: float | None = None
    save_steps: float = 500
    save_total_limit: int | None = None
    save_only_model: bool = False
    load_best_model_at_end: bool = False
    metric_for_best_model: str | None = None
    greater_is_better: bool | None = None
    seed: int = 42
    deepspeed: str | dict | None = None
    train_dataset_size: int | None = None

    def __post_init__(self):
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            _positive_int(name, getattr(self, name))
        for name in ("learning_rate", "weight_decay", "adam_epsilon", "max_grad_norm", "num_train_epochs",
                     "warmup_steps", "warmup_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
                raise ValueError(f"TrainingArguments: {name}={value!r} must be a finite number >= 0.")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"TrainingArguments: {name}={value!r} must be in [0, 1).")
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int):
            raise ValueError(f"TrainingArguments: max_steps={self.max_steps!r} must be an integer (-1: use epochs).")
        if self.train_dataset_size is not None:
            _positive_int("train_dataset_size", self.train_dataset_size)
        if self.lr_scheduler_type not in LR_SCHEDULER_TYPES:
            raise ValueError(
                f"TrainingArguments: lr_scheduler_type={self.lr_scheduler_type!r} is not supported; use one of "
                f"{list(LR_SCHEDULER_TYPES)}."
            )
        if self.warmup_ratio > 0 and self.warmup_steps > 0:
            raise ValueError(
                f"TrainingArguments: warmup_steps={self.warmup_steps!r} and warmup_ratio={self.warmup_ratio!r} are "
                "both set; set one (warmup_steps < 1 is a ratio, as in Transformers 5)."
            )
        if self.warmup_ratio >= 1:
            raise ValueError(f"TrainingArguments: warmup_ratio={self.warmup_ratio!r} must be below 1.")
        if self.fp16 and self.bf16:
            raise ValueError("TrainingArguments: fp16=True and bf16=True; choose one.")
        if self.save_only_model and self.load_best_model_at_end:
            raise ValueError(
                "TrainingArguments: save_only_model=True with load_best_model_at_end=True cannot resume the best "
                "model's optimizer state; set one of them to False (Transformers refuses this too)."
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainingArguments":
        """From a dict of field values; an unknown field is an error naming it."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"TrainingArguments: unknown fields {unknown}; known fields are {sorted(names)}.")
        return cls(**values)

    def total_steps(self, world_size: int) -> int | None:
        """Optimizer steps of the run as the Trainer counts them, or None when nothing determines it."""
        if self.max_steps > 0:
            return self.max_steps
        if self.train_dataset_size is None:
            return None
        batches = math.ceil(self.train_dataset_size / (self.per_device_train_batch_size * world_size))
        per_epoch = max(math.ceil(batches / self.gradient_accumulation_steps), 1)
        return math.ceil(self.num_train_epochs * per_epoch)

    def warmup_steps_for(self, total_steps: int) -> int:
        """Warmup steps: `warmup_steps` if >= 1, else ceil(total × fraction) (Transformers' rule)."""
        if self.warmup_steps >= 1:
            return int(self.warmup_steps)
        return math.ceil(total_steps * (self.warmup_steps or self.warmup_ratio))


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"TrainingArguments: {name}={value!r} must be a positive integer.")
