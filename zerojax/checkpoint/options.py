"""What a checkpoint folder keeps: `CheckpointOptions` (Hugging Face `TrainingArguments` names) and
the rotation policy that keeps the best step and the newest ones."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from orbax.checkpoint import checkpoint_managers as ocm


@dataclasses.dataclass(frozen=True)
class CheckpointOptions:
    """What to keep and how to save, with Hugging Face `TrainingArguments` names and defaults.

    `save_total_limit`: keep at most this many steps (None: all); the best step is never deleted, and
    with a limit of 1 the latest is kept besides the best (Transformers' rule). `metric_for_best_model`
    names the metric that ranks steps (looked up as given, then with the `eval_` prefix); it defaults
    to `"loss"` when `load_best_model_at_end` is set. `greater_is_better` defaults to False for names
    ending in `loss`, else True. `save_only_model`: save the compute-dtype parameters only (no master,
    optimizer or scaler state: the step cannot be resumed). `async_save`: `save` returns once the
    arrays are copied off the training buffers; the files are written in a background thread.
    `verify_integrity`: check each step's file checksums before restoring it (reads the step's files
    once more; the manifest is written either way).
    """

    save_total_limit: int | None = None
    metric_for_best_model: str | None = None
    greater_is_better: bool | None = None
    load_best_model_at_end: bool = False
    save_only_model: bool = False
    async_save: bool = True
    verify_integrity: bool = True

    def __post_init__(self):
        limit = self.save_total_limit
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(
                f"CheckpointOptions: save_total_limit={limit!r} must be a positive integer, or None to keep "
                "every checkpoint."
            )
        if self.save_only_model and self.load_best_model_at_end:
            raise ValueError(
                "CheckpointOptions: ZeRO checkpoints can't be used with `save_only_model` along with "
                "`load_best_model_at_end` (Transformers raises the same for DeepSpeed/FSDP); set "
                "save_only_model=False or load_best_model_at_end=False."
            )
        metric = self.metric_for_best_model
        if metric is None and self.load_best_model_at_end:
            object.__setattr__(self, "metric_for_best_model", metric := "loss")
        if metric is not None and (not isinstance(metric, str) or not metric):
            raise ValueError(
                f"CheckpointOptions: metric_for_best_model={metric!r} must be a metric name such as 'loss'."
            )
        if self.greater_is_better is None and metric is not None:
            object.__setattr__(self, "greater_is_better", not metric.endswith("loss"))

    def metric_value(self, metrics: dict) -> float:
        """The ranking metric from a step's `metrics` (`name`, else `eval_<name>`)."""
        name = self.metric_for_best_model
        for key in (name, f"eval_{name}"):
            if key in metrics:
                return float(metrics[key])
        raise KeyError(
            f"metric_for_best_model={name!r} is not in the metrics passed to save ({sorted(metrics)}); "
            f"pass metrics={{'{name}': value}} or change metric_for_best_model."
        )


@dataclasses.dataclass
class KeepBestAndLatest(ocm.PreservationPolicy):
    """Transformers' rotation: keep the best step and the newest ones, `limit` steps in all (the best
    plus the newest when `limit` is 1 and the best is not the newest); ties keep the earlier step."""

    limit: int | None
    rank: Callable[[dict], float] | None  # larger is better; None: no best tracking

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> Sequence[bool]:
        order = list(range(len(checkpoints)))
        best = best_index([c.metrics for c in checkpoints], self.rank)
        if best is not None and best < len(order) - 1:
            order.remove(best)
            order.insert(len(order) - 1, best)  # just before the newest: deleted last
        limit = self.limit if self.limit is not None else len(order)
        if best is not None and limit == 1 and best != len(checkpoints) - 1:
            limit = 2
        dropped = set(order[: max(0, len(order) - limit)])
        return [i not in dropped for i in range(len(checkpoints))]


def ranking(options: CheckpointOptions) -> Callable[[dict], float] | None:
    """A step's metrics -> a number that is larger for a better step (None: no metric to rank by)."""
    if options.metric_for_best_model is None:
        return None
    sign = 1.0 if options.greater_is_better else -1.0
    return lambda metrics: sign * options.metric_value(metrics)


def best_index(metrics: Sequence[dict | None], rank) -> int | None:
    """The index of the best of the steps' `metrics` by `rank` (the earliest on a tie); None when no
    step has metrics or there is no rank."""
    best, best_value = None, None
    for i, m in enumerate(metrics):
        if rank is None or m is None:
            continue
        value = rank(m)
        if best_value is None or value > best_value:
            best, best_value = i, value
    return best
