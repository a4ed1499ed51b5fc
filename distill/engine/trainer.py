"""The training loop shared by ``detkd train`` and distillation.

What differs between plain training and distillation is only the *step function* (batch -> named
loss terms) and the extra trainable modules (e.g. feature adapters); everything else — optimizer,
schedule, clipping, progress, JSON metrics, evaluation, atomic checkpoints and resume — is here once.

Run folder layout::

    RUN/recipe.yaml                 the resolved recipe (resume reads it back)
    RUN/run.json                    data path, classes, versions, command
    RUN/metrics.jsonl               one JSON object per optimizer step and per evaluation
    RUN/checkpoints/last.safetensors  student only (+ .json sidecar)
    RUN/checkpoints/best.safetensors  best val AP so far
    RUN/train_state.safetensors     optimizer + adapters + position, for --resume
    RUN/summary.json                final metrics
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch import Tensor, nn

from distill.config import Recipe
from distill.checkpoint import atomic_write_text, load_train_state, read_checkpoint, save_checkpoint, save_train_state
from distill.engine.evaluate import evaluate_detector
from distill.report import console, make_progress, metrics_table
from distill.engine.schedule import lr_factor
from distill.errors import DetkdError
from distill.structures import Batch

StepFn = Callable[[nn.Module, Batch], dict[str, Tensor]]


def detector_step(model: nn.Module, batch: Batch) -> dict[str, Tensor]:
    """Plain supervised step: the detector's own losses."""
    predictions = model.head(model.features(batch.images), batch.image_sizes)
    losses, _ = model.loss(predictions, batch.targets, batch.image_sizes)
    return losses


def build_optimizer(params: list[tuple[str, nn.Parameter]], recipe: Recipe) -> torch.optim.Optimizer:
    """SGD or AdamW; no weight decay on biases and norm weights (1-d tensors)."""
    spec = recipe.train
    decay = [p for _, p in params if p.ndim > 1]
    no_decay = [p for _, p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if spec.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum)
    return torch.optim.AdamW(groups, lr=spec.lr)


@dataclass
class FitResult:
    epochs: int
    steps: int
    best_ap: float
    final_metrics: dict[str, float]
    seconds: float


class Trainer:
    """Trains ``model`` on ``train_set`` following ``recipe.train``, evaluating on ``val_set``.

    ``meta`` is stored in every checkpoint (it must hold ``student`` and ``classes``; the trainer
    adds step, epoch, metrics and the recipe).
    """

    def __init__(
        self,
        model: nn.Module,
        recipe: Recipe,
        train_set,
        val_set,
        out_dir: str | Path,
        meta: dict[str, Any],
        step_fn: StepFn = detector_step,
        extra_modules: dict[str, nn.Module] | None = None,
        show_progress: bool = True,
    ) -> None:
        self.model = model
        self.recipe = recipe
        self.train_set = train_set
        self.val_set = val_set
        self.out = Path(out_dir)
        self.meta = meta
        self.step_fn = step_fn
        self.extra = extra_modules or {}
        self.show_progress = show_progress
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        for name, module in self.extra.items():
            params += [(f"{name}.{n}", p) for n, p in module.named_parameters() if p.requires_grad]
        self.params = [p for _, p in params]
        self.optimizer = build_optimizer(params, recipe)
        self.base_lrs = [recipe.train.lr for _ in self.optimizer.param_groups]

    # ------------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def _save(self, name: str, epoch: int, step: int, metrics: dict[str, float] | None) -> None:
        meta = {**self.meta, "recipe": self.recipe.to_dict(), "epoch": epoch, "step": step, "metrics": metrics}
        save_checkpoint(self.out / "checkpoints" / f"{name}.safetensors", self.model, meta)

    def evaluate(self, progress=None) -> dict[str, float]:
        task = None
        if progress is not None:
            task = progress.add_task("eval", total=len(self.val_set), info="")
        callback = (lambda done, total: progress.update(task, completed=done)) if task is not None else None
        metrics = evaluate_detector(self.model, self.val_set, self.recipe.eval.batch_size, progress=callback)
        if task is not None:
            progress.remove_task(task)
        return metrics

    def fit(self, resume: bool = False) -> FitResult:
        from distill.data import build_loader, set_epoch

        spec = self.recipe.train
        self.out.mkdir(parents=True, exist_ok=True)
        loader = build_loader(self.train_set, spec.batch_size, shuffle=True, seed=spec.seed, num_workers=spec.num_workers, drop_last=True)
        steps_per_epoch = len(loader)
        if steps_per_epoch == 0:
            raise DetkdError(f"training split has {len(self.train_set)} images, fewer than batch_size {spec.batch_size}")
        start_epoch, step, best_ap = 0, 0, -1.0
        if resume:
            state, last_meta = read_checkpoint(self.out / "checkpoints" / "last.safetensors")
            self.model.load_state_dict(state)
            info = load_train_state(self.out / "train_state.safetensors", self.optimizer, self.extra)
            if last_meta.get("step") != info["step"]:
                raise DetkdError(
                    f"{self.out}: last checkpoint (step {last_meta.get('step')}) and train_state (step {info['step']}) "
                    "disagree; the previous run stopped while saving, so resume from an earlier copy"
                )
            start_epoch, step, best_ap = info["epoch"] + 1, info["step"], info["best_ap"]
        else:
            atomic_write_text(self.out / "recipe.yaml", yaml.safe_dump(self.recipe.to_dict(), sort_keys=False))
            (self.out / "metrics.jsonl").unlink(missing_ok=True)

        metrics: dict[str, float] = {}
        started = time.perf_counter()
        with make_progress(self.show_progress) as progress:
            task = progress.add_task("train", total=spec.epochs * steps_per_epoch, completed=step, info="")
            for epoch in range(start_epoch, spec.epochs):
                set_epoch(loader, epoch)
                self.model.train()
                for module in self.extra.values():
                    module.train()
                for batch in loader:
                    record = self._train_step(batch, step, steps_per_epoch, epoch)
                    step += 1
                    progress.update(task, advance=1, info=f"ep {epoch + 1}/{spec.epochs} loss {record['loss']:.3f}")
                last_epoch = epoch == spec.epochs - 1
                if (epoch + 1) % spec.eval_every == 0 or last_epoch:
                    metrics = self.evaluate(progress)
                    self._log({"epoch": epoch + 1, "step": step, "val": metrics})
                    if metrics["AP"] > best_ap:
                        best_ap = metrics["AP"]
                        self._save("best", epoch, step, metrics)
                self._save("last", epoch, step, metrics or None)
                save_train_state(self.out / "train_state.safetensors", self.optimizer, self.extra, {"epoch": epoch, "step": step, "best_ap": best_ap})
        seconds = time.perf_counter() - started
        result = FitResult(epochs=spec.epochs, steps=step, best_ap=max(best_ap, 0.0), final_metrics=metrics, seconds=seconds)
        summary = {"recipe": self.recipe.name, "epochs": spec.epochs, "steps": step, "best_AP": result.best_ap, "final": metrics, "seconds": round(seconds, 2), "seed": spec.seed}
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
        if metrics:  # the closing table, with or without the progress bar
            console.print(metrics_table(f"{self.recipe.name}: val metrics after {spec.epochs} epochs", {"final": metrics}, ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"]))
        return result

    def _train_step(self, batch: Batch, step: int, steps_per_epoch: int, epoch: int) -> dict[str, Any]:
        factor = lr_factor(step, steps_per_epoch, self.recipe.train)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        losses = self.step_fn(self.model, batch)
        total = sum(losses.values())
        if not torch.isfinite(total):
            bad = [k for k, v in losses.items() if not torch.isfinite(v)]
            raise DetkdError(f"loss is not finite at step {step} (epoch {epoch + 1}): {', '.join(bad)}; lower train.lr or check the data")
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = None
        if self.recipe.train.grad_clip is not None:
            grad_norm = float(nn.utils.clip_grad_norm_(self.params, self.recipe.train.grad_clip))
        self.optimizer.step()
        record = {"step": step, "epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"], "loss": float(total.detach())}
        record.update({k: float(v.detach()) for k, v in losses.items()})
        if grad_norm is not None and math.isfinite(grad_norm):
            record["grad_norm"] = grad_norm
        self._log(record)
        return record
