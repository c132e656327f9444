"""Trainer callbacks with Hugging Face's names: `TrainerCallback`, `TrainerState`, `TrainerControl`.

A callback is any object with some of the hooks `on_train_begin`, `on_step_end`, `on_epoch_end`,
`on_log`, `on_evaluate`, `on_save`, `on_train_end`, each called as `hook(args, state, control, **kwargs)`
(so a `transformers.TrainerCallback` subclass works as it is). A hook may set `control.should_log`,
`should_evaluate`, `should_save` or `should_training_stop`, or return a `TrainerControl`; the Trainer acts
on them after the hooks of that event ran. `DefaultFlow` sets them from `logging_strategy`,
`eval_strategy` and `save_strategy` (Transformers' `DefaultFlowCallback` rules), and `TensorBoard`
writes every logged record as TensorBoard scalars (`report_to="tensorboard"`, needs `tensorboardX`).
Callbacks run on every process; the TensorBoard writer on process 0 only.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from pathlib import Path


from zerojax.args import TrainingArguments, interval


@dataclasses.dataclass
class TrainerState:
    """Where training is (Hugging Face's `TrainerState` names): `global_step` optimizer steps done,
    `epoch` (fractional), `log_history` (every logged record), `best_metric` (of metric_for_best_model)."""

    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0
    steps_per_epoch: int | None = None
    logging_steps: int = 0
    eval_steps: int = 0
    save_steps: int = 0
    log_history: list = dataclasses.field(default_factory=list)
    best_metric: float | None = None
    best_global_step: int | None = None
    is_world_process_zero: bool = True


@dataclasses.dataclass
class TrainerControl:
    """What the Trainer does after the hooks of an event (Hugging Face's `TrainerControl` names)."""

    should_training_stop: bool = False
    should_epoch_stop: bool = False
    should_save: bool = False
    should_evaluate: bool = False
    should_log: bool = False


class TrainerCallback:
    """Base class with every hook doing nothing; subclass it and override what you need."""

    def on_init_end(self, args, state, control, **kwargs): ...
    def on_train_begin(self, args, state, control, **kwargs): ...
    def on_train_end(self, args, state, control, **kwargs): ...
    def on_epoch_begin(self, args, state, control, **kwargs): ...
    def on_epoch_end(self, args, state, control, **kwargs): ...
    def on_step_begin(self, args, state, control, **kwargs): ...
    def on_step_end(self, args, state, control, **kwargs): ...
    def on_evaluate(self, args, state, control, **kwargs): ...
    def on_save(self, args, state, control, **kwargs): ...
    def on_log(self, args, state, control, **kwargs): ...


class CallbackHandler:
    """Calls one event's hook on every callback, in order; a returned `TrainerControl` replaces the current."""

    def __init__(self, callbacks: list):
        self.callbacks = list(callbacks)

    def call(self, event: str, args, state: TrainerState, control: TrainerControl, **kwargs) -> TrainerControl:
        for callback in self.callbacks:
            hook = getattr(callback, event, None)
            if hook is None:
                continue
            result = hook(args, state, control, **kwargs)
            if isinstance(result, TrainerControl) or type(result).__name__ == "TrainerControl":
                control = result
        return control


class DefaultFlow(TrainerCallback):
    """Sets should_log / should_evaluate / should_save from the strategies (Transformers' DefaultFlowCallback,
    and zerojax's default `eval_strategy=None`: every eval_steps and at the last step). The first step and
    the last are always logged (logging_strategy "steps")."""

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        step, last = state.global_step, state.global_step >= state.max_steps
        first = kwargs.get("first", False)
        if args.logging_strategy == "steps" and (first or last or _every(state.logging_steps, step)
                                                 or (step == 1 and args.logging_first_step)):
            control.should_log = True
        delay_ok = args.eval_delay <= step
        if args.eval_strategy is None and (_every(state.eval_steps, step) or last):
            control.should_evaluate = True
        elif args.eval_strategy == "steps" and delay_ok and (_every(state.eval_steps, step) or last):
            control.should_evaluate = True
        if args.save_strategy == "steps" and (_every(state.save_steps, step) or last):
            control.should_save = True
        if last:
            control.should_training_stop = True
        return control

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if args.logging_strategy == "epoch":
            control.should_log = True
        if args.eval_strategy == "epoch" and args.eval_delay <= state.epoch:
            control.should_evaluate = True
        if args.save_strategy == "epoch":
            control.should_save = True
        return control


class TensorBoard(TrainerCallback):
    """Writes each logged record's numbers as TensorBoard scalars (`train/loss`, `eval/loss`, ...) in
    `log_dir`: `logging_dir` if set, else `$TENSORBOARD_LOGGING_DIR`, else `output_dir/runs/<run_name or
    date_host>` (Transformers' layout). Uses `tensorboardX` (pip install tensorboardX, or zerojax[tensorboard])."""

    def __init__(self, args: TrainingArguments):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ImportError('report_to="tensorboard" needs tensorboardX: pip install tensorboardX '
                              "(or 'zerojax[tensorboard]').") from None
        self._writer_class, self.writer = SummaryWriter, None
        name = args.run_name or f"{time.strftime('%b%d_%H-%M-%S')}_{socket.gethostname()}"
        self.log_dir = Path(args.logging_dir or os.environ.get("TENSORBOARD_LOGGING_DIR")
                            or Path(args.output_dir or ".") / "runs" / name)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.writer is None:
            self.writer = self._writer_class(logdir=str(self.log_dir))
            self.writer.add_text("args", _args_text(args))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.writer is None:
            self.on_train_begin(args, state, control)
        for key, value in (logs or {}).items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
            self.writer.add_scalar(tag, value, state.global_step)
        self.writer.flush()

    def on_train_end(self, args, state, control, **kwargs):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def resolve_intervals(args: TrainingArguments, state: TrainerState) -> None:
    """Step counts of logging/eval/save intervals (fractions of `state.max_steps` below 1, as Transformers)."""
    state.logging_steps = interval(args.logging_steps, state.max_steps)
    eval_steps = args.eval_steps
    if args.eval_strategy == "steps" and not eval_steps:
        eval_steps = args.logging_steps  # Transformers' fallback
    state.eval_steps = interval(eval_steps, state.max_steps)
    state.save_steps = interval(args.save_steps, state.max_steps)


def improved(args: TrainingArguments, state: TrainerState, metrics: dict) -> bool:
    """Whether `metrics` beat `state.best_metric` on metric_for_best_model (default "loss"); updates it."""
    name = args.metric_for_best_model or "loss"
    value = metrics.get(name, metrics.get(f"eval_{name}"))
    if value is None:
        raise KeyError(f'metric_for_best_model={name!r} is not among the evaluation metrics {sorted(metrics)}; '
                       "choose one of them.")
    greater = args.greater_is_better if args.greater_is_better is not None else not name.endswith("loss")
    better = state.best_metric is None or (value > state.best_metric if greater else value < state.best_metric)
    if better:
        state.best_metric, state.best_global_step = float(value), state.global_step
    return better


def _every(n: int, step: int) -> bool:
    return n > 0 and step % n == 0


def _args_text(args: TrainingArguments) -> str:
    import json

    values = {k: v for k, v in dataclasses.asdict(args).items() if k != "transformers4_fields"}
    return json.dumps(values, indent=2, default=str)


def default_callbacks(args: TrainingArguments) -> list:
    """The callbacks every Trainer runs before the user's: the flow, and TensorBoard when asked for."""
    return [DefaultFlow(), *([TensorBoard(args)] if "tensorboard" in args.reporters else [])]


__all__ = ["TrainerCallback", "TrainerState", "TrainerControl", "CallbackHandler", "DefaultFlow", "TensorBoard",
           "default_callbacks", "resolve_intervals", "improved"]

