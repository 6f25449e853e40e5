"""The optimiser of a run: AdamW with global-norm clipping, the learning rate over time
(the paper's one-cycle, or cosine with warmup), and a lower rate for a fine-tuned backbone."""

from __future__ import annotations

import keras

from convmixer_tf.config import HEAD


@keras.saving.register_keras_serializable(package="convmixer_tf")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """The paper's one-cycle schedule, per step: 0 -> peak at 2/5 of training ->
    peak/20 at 4/5 -> 0 at the end, linear in between (np.interp of the CIFAR repo)."""

    def __init__(self, peak: float, total_steps: int):
        self.peak, self.total_steps = float(peak), int(total_steps)

    def __call__(self, step):
        t = keras.ops.cast(step, "float32") / float(max(self.total_steps, 1))
        ramp_up = self.peak * t / 0.4
        ramp_down = self.peak + (self.peak / 20 - self.peak) * (t - 0.4) / 0.4
        tail = self.peak / 20 * (1.0 - t) / 0.2
        lr = keras.ops.where(t < 0.4, ramp_up, keras.ops.where(t < 0.8, ramp_down, tail))
        return keras.ops.maximum(lr, 0.0)

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps}


def learning_rate(config, total_steps: int, steps_per_epoch: int):
    """The schedule of `config` (a TrainConfig) over `total_steps` optimiser steps."""
    if config.schedule == "onecycle":
        return OneCycle(config.lr, total_steps)
    if config.schedule == "cosine":
        warmup = int(round(config.warmup_epochs * steps_per_epoch))
        return keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if warmup else config.lr,
            decay_steps=max(total_steps - warmup, 1),
            warmup_target=config.lr if warmup else None,
            warmup_steps=warmup,
        )
    return config.lr


@keras.saving.register_keras_serializable(package="convmixer_tf")
class BackboneScaledAdamW(keras.optimizers.AdamW):
    """AdamW whose learning rate is multiplied by `backbone_lr_mult` for every variable
    outside the head (a new one, when fine-tuning). Weight decay keeps the full rate, as in
    decoupled AdamW."""

    def __init__(self, backbone_lr_mult: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.backbone_lr_mult = float(backbone_lr_mult)

    def build(self, variables):
        super().build(variables)
        # By index: update_step may see the backend's variable rather than the Keras one.
        self._scaled = [v.path.split("/")[0] != HEAD for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        if self._scaled[self._get_variable_index(variable)]:
            learning_rate = keras.ops.cast(learning_rate, variable.dtype) * self.backbone_lr_mult
        return super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        return dict(super().get_config(), backbone_lr_mult=self.backbone_lr_mult)


def compile_model(model, config, steps_per_epoch: int):
    """AdamW, the learning-rate schedule, label-smoothed cross-entropy on logits, top-1/top-5."""
    kwargs = dict(
        learning_rate=learning_rate(config, config.epochs * steps_per_epoch, steps_per_epoch),
        weight_decay=config.weight_decay,
        global_clipnorm=config.clip_norm,
    )
    optimizer = (
        BackboneScaledAdamW(backbone_lr_mult=config.backbone_lr_mult, **kwargs)
        if config.backbone_lr_mult != 1.0
        else keras.optimizers.AdamW(**kwargs)
    )
    metrics = [keras.metrics.CategoricalAccuracy(name="accuracy")]
    if model.output_shape[-1] > 5:
        metrics.append(keras.metrics.TopKCategoricalAccuracy(k=5, name="top5"))
    model.compile(
        optimizer=optimizer,
        # Weighted mean: the padding that evens out several processes' validation shards has
        # weight 0 (pipelines.eval_pipeline); without weights it is the plain mean.
        loss=keras.losses.CategoricalCrossentropy(
            from_logits=True,
            label_smoothing=config.label_smoothing,
            reduction="mean_with_sample_weight",
        ),
        weighted_metrics=metrics,  # weighted: the padding's weight 0 keeps it out of the accuracies
        jit_compile=config.jit_compile,
    )
