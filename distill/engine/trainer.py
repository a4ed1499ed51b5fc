"""The training loop shared by ``detkd train`` and distillation.

What differs between plain training and distillation is only the *step function* (batch -> named
loss terms) and the extra trainable modules (e.g. feature adapters); everything else — device and
precision, DDP, optimizer, schedule, clipping, non-finite steps, progress, JSON metrics,
evaluation, atomic checkpoints and resume — is here once.

Run folder layout::

    RUN/recipe.yaml                 the resolved recipe (resume reads it back)
    RUN/run.json                    data path, classes, versions, command
    RUN/metrics.jsonl               one JSON object per optimizer step and per evaluation
    RUN/checkpoints/last.safetensors  student only (+ .json sidecar)
    RUN/checkpoints/best.safetensors  best val AP so far
    RUN/train_state.safetensors     student + optimizer + adapters + position, for --resume
    RUN/summary.json                final metrics

Under torchrun every rank trains its share of each global batch; rank 0 alone evaluates and
writes the run folder.
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

from distill import distributed as dist
from distill.checkpoint import (
    append_line,
    atomic_write_text,
    check_finite,
    load_train_state,
    make_dir,
    read_train_state_info,
    save_checkpoint,
    save_train_state,
)
from distill.config import Recipe
from distill.engine.device import Runtime, auto_workers, autocast, grad_scaler
from distill.engine.evaluate import check_scorable, evaluate_detector
from distill.engine.forward import StudentForward, student_forward, unwrap
from distill.engine.run_state import STATE, clean_leftovers, has_saved_step, read_summary, truncate_metrics
from distill.engine.schedule import lr_factor
from distill.errors import CheckpointError, ConfigError, DataError, DetkdError, OutputError
from distill.report import console, make_progress, metrics_table, warn
from distill.structures import Batch

# (the StudentForward, possibly DDP-wrapped, or a bare detector) , batch -> named loss terms
StepFn = Callable[[nn.Module, Batch], dict[str, Tensor]]

MAX_BAD_STEPS = 3  # non-finite steps in a row before the run stops
SHOWN_TERMS = 4  # loss terms a non-finite step's message names (metrics.jsonl lists them all)


def detector_step(model: nn.Module, batch: Batch) -> dict[str, Tensor]:
    """Plain supervised step: the detector's own losses (forward through the DDP-visible wrapper)."""
    _, outputs = student_forward(model)(batch.images, batch.image_sizes, batch.targets)
    losses, _ = unwrap(model).loss(outputs, batch.targets, batch.image_sizes)
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


def check_splits(train_set, val_set) -> None:
    """Refuse splits that would train on nothing or report AP 0 of nothing."""
    check_scorable(val_set, "val")
    coco = getattr(train_set, "coco", None)
    if coco is not None and not coco.getAnnIds(imgIds=list(getattr(train_set, "image_ids", []))):
        raise DataError(f"{getattr(train_set, 'ann_file', 'train split')}: the train split has no annotations; nothing to learn from")


def check_batches(train_set, recipe: Recipe) -> None:
    """A training split with fewer images than one (global) batch trains no step."""
    if len(train_set) < recipe.train.batch_size:
        raise DetkdError(f"training split has {len(train_set)} images, fewer than batch_size {recipe.train.batch_size}")


class Trainer:
    """Trains ``model`` on ``train_set`` following ``recipe.train``, evaluating on ``val_set``.

    ``meta`` is stored in every checkpoint (it must hold ``student`` and ``classes``; the trainer
    adds step, epoch, metrics and the recipe). ``runtime``: device and precision (default CPU, fp32).
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
        runtime: Runtime | None = None,
    ) -> None:
        self.runtime = runtime or Runtime()
        self.device = self.runtime.torch_device
        self.model = model.to(self.device)
        self.recipe = recipe
        self.train_set = train_set
        self.val_set = val_set
        self.out = Path(out_dir)
        self.meta = meta
        self.step_fn = step_fn
        self.extra = {k: m.to(self.device) for k, m in (extra_modules or {}).items()}
        self.show_progress = show_progress
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        extra_params = []
        for name, module in self.extra.items():
            extra_params += [(f"{name}.{n}", p) for n, p in module.named_parameters() if p.requires_grad]
        self.params = [p for _, p in params + extra_params]
        self.param_names = [n for n, _ in params + extra_params]
        self.extra_params = [p for _, p in extra_params]
        self.optimizer = build_optimizer(params + extra_params, recipe)
        self.base_lrs = [recipe.train.lr for _ in self.optimizer.param_groups]
        self.scaler = grad_scaler(self.runtime)
        self.forward: nn.Module = StudentForward(self.model)
        self.bad_steps = 0
        self.epoch_seconds: list[tuple[float, int]] = []  # (seconds, images) of each epoch fit ran, for the summary

    # ------------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        if dist.is_main():
            try:
                append_line(self.out / "metrics.jsonl", json.dumps(record, sort_keys=True) + "\n")
            except OutputError as exc:  # disk full: say what the run keeps and how to go on
                raise OutputError(f"{exc}; {self._kept()}") from None

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

    def _wrap_for_ddp(self) -> None:
        if dist.is_distributed():
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward = DistributedDataParallel(StudentForward(self.model), device_ids=ids)

    def _resume(self) -> tuple[int, int, float, dict]:
        """(start epoch, step, best AP, info) from the training state; the metrics log is cut there."""
        info = load_train_state(self.out / STATE, self.optimizer, self.extra, model=self.model)
        if None not in (info.get("kind"), self.meta.get("kind")) and info["kind"] != self.meta["kind"]:
            raise CheckpointError(f"{self.out}: is a {info.get('kind')} run; resume it with detkd {info.get('kind')}")
        done, asked = info["epoch"] + 1, self.recipe.train.epochs
        if asked < done:  # before anything in the folder is touched
            raise ConfigError(
                f"{self.out}: the run has already done {done} epochs (step {info['step']}); train.epochs {asked} is fewer, "
                f"nothing to do: pass --epochs {done + 1} or more to extend it"
            )
        if dist.is_main():
            truncate_metrics(self.out, info["step"])
            last = self.out / "checkpoints" / "last.safetensors"
            if not _checkpoint_at_step(last, info["step"]):  # killed between the state and last
                self._save("last", info["epoch"], info["step"], info.get("metrics"))
        return info["epoch"] + 1, info["step"], info["best_ap"], info

    def fit(self, resume: bool = False) -> FitResult:
        from distill.data import build_loader, set_epoch

        spec = self.recipe.train
        main = dist.is_main()
        if main:
            make_dir(self.out)
            clean_leftovers(self.out)
        dist.barrier()
        check_splits(self.train_set, self.val_set)
        dist.local_batch_size(spec.batch_size)
        loader = build_loader(
            self.train_set, spec.batch_size, shuffle=True, seed=spec.seed, num_workers=auto_workers(spec.num_workers, self.device, dist.world_size()), drop_last=True,
            rank=dist.rank(), world=dist.world_size(), pin_memory=self.device.type == "cuda",
        )
        steps_per_epoch = len(loader)
        if steps_per_epoch == 0:
            raise DetkdError(f"training split has {len(self.train_set)} images, fewer than batch_size {spec.batch_size}")
        start_epoch, step, best_ap, metrics = 0, 0, -1.0, {}
        if resume and has_saved_step(self.out):
            start_epoch, step, best_ap, info = self._resume()
            metrics = info.get("metrics") or {}
            if start_epoch >= spec.epochs:
                return self._finished(step, best_ap, metrics)
        else:
            if resume and main:
                warn(f"{self.out}: no step was saved before the previous run stopped; starting from step 0")
            if main:
                atomic_write_text(self.out / "recipe.yaml", yaml.safe_dump(self.recipe.to_dict(), sort_keys=False))
                (self.out / "metrics.jsonl").unlink(missing_ok=True)
        self._wrap_for_ddp()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

        started = time.perf_counter()
        train_seconds, images = 0.0, 0
        self.epoch_seconds = []
        with make_progress(self.show_progress and main) as progress:
            task = progress.add_task("train", total=spec.epochs * steps_per_epoch, completed=step, info="")
            for epoch in range(start_epoch, spec.epochs):
                set_epoch(loader, epoch)
                self.model.train()
                for module in self.extra.values():
                    module.train()
                tick = time.perf_counter()
                for batch in loader:
                    record = self._train_step(batch.to(self.device), step, steps_per_epoch, epoch)
                    step += 1
                    images += spec.batch_size
                    progress.update(task, advance=1, info=f"ep {epoch + 1}/{spec.epochs} loss {record.get('loss', float('nan')):.3f}")
                train_seconds += time.perf_counter() - tick
                self.epoch_seconds.append((time.perf_counter() - tick, steps_per_epoch * spec.batch_size))
                last_epoch = epoch == spec.epochs - 1
                self._check_weights(epoch, step)
                improved = False
                if ((epoch + 1) % spec.eval_every == 0 or last_epoch) and main:
                    metrics = self.evaluate(progress)
                    self._log({"epoch": epoch + 1, "step": step, "val": metrics})
                    improved = metrics["AP"] > best_ap
                    best_ap = max(best_ap, metrics["AP"])
                if main:
                    self._save_epoch(epoch, step, best_ap, metrics, improved)
                dist.barrier()
        seconds = time.perf_counter() - started
        result = FitResult(epochs=spec.epochs, steps=step, best_ap=max(best_ap, 0.0), final_metrics=metrics, seconds=seconds)
        if main:
            self._write_summary(result, train_seconds, images)
            self._write_curves()
            if metrics:  # the closing table, with or without the progress bar
                console.print(metrics_table(f"{self.recipe.name}: val metrics after {spec.epochs} epochs", {"final": metrics}, ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"]))
        return result

    def _finished(self, step: int, best_ap: float, metrics: dict) -> FitResult:
        """Resume of a run that already reached its last epoch: nothing to do, summary kept."""
        summary = read_summary(self.out) if dist.is_main() else None
        if dist.is_main():
            console.print(f"{self.out}: already trained for {self.recipe.train.epochs} epochs (step {step}); pass --epochs N to extend it", markup=False, highlight=False, soft_wrap=True)
        seconds = float(summary.get("seconds", 0.0)) if summary else 0.0
        result = FitResult(self.recipe.train.epochs, step, max(best_ap, 0.0), metrics, seconds)
        if dist.is_main() and summary is None:
            self._write_summary(result, 0.0, 0)
        return result

    def _write_summary(self, result: FitResult, train_seconds: float, images: int) -> None:
        spec = self.recipe.train
        summary = {
            "recipe": self.recipe.name, "epochs": spec.epochs, "steps": result.steps, "best_AP": result.best_ap, "final": result.final_metrics,
            "seconds": round(result.seconds, 2), "seed": spec.seed, "world_size": dist.world_size(), "device": self.runtime.device,
            "amp": self.runtime.amp, "dtype": self.runtime.dtype, "train_seconds": round(train_seconds, 3), "images_per_s": round(images / train_seconds, 2) if train_seconds else None,
        }
        later = self.epoch_seconds[1:]  # without the first epoch's warm-up (allocator, caches)
        if later and sum(t for t, _ in later) > 0:
            summary["steady_images_per_s"] = round(sum(n for _, n in later) / sum(t for t, _ in later), 2)
        if self.device.type == "cuda":
            summary["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        try:
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
        except OutputError as exc:
            raise OutputError(f"{exc}; {self._kept()}") from None

    def _write_curves(self) -> None:
        """RUN/curves.png; a picture never fails a finished run: a problem is one warning line."""
        try:
            from distill.viz.curves import write_run_curves

            write_run_curves(self.out)
        except Exception as exc:  # noqa: BLE001  (matplotlib missing or broken, disk full, ...)
            warn(f"{self.out / 'curves.png'}: training curves not drawn ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")

    def _check_weights(self, epoch: int, step: int) -> None:
        """Never save weights that are not finite: stop, the last good checkpoint stays as it is."""
        try:
            check_finite(self.model.state_dict(), "student")
            for name, module in self.extra.items():
                check_finite(module.state_dict(), name)
        except CheckpointError as exc:
            raise DetkdError(
                f"{self.out}: weights are not finite after step {step} (epoch {epoch + 1}): {exc}; nothing saved, "
                "the last good checkpoint is kept; lower train.lr or set train.grad_clip"
            ) from None

    def _save_epoch(self, epoch: int, step: int, best_ap: float, metrics: dict, improved: bool) -> None:
        # Order: best, then the state (the resume point, one atomic file), then last. A kill after
        # the state leaves last behind, which the resume rewrites from the state.
        try:
            if improved:
                self._save("best", epoch, step, metrics)
            info = {"epoch": epoch, "step": step, "best_ap": best_ap, "metrics": metrics or None, "kind": self.meta.get("kind")}
            save_train_state(self.out / STATE, self.optimizer, self.extra, info, model=self.model)
            self._save("last", epoch, step, metrics or None)
        except OutputError as exc:  # disk full: say what the run keeps and how to go on
            raise OutputError(f"{exc}; {self._kept()}") from None

    def _kept(self) -> str:
        kind = self.meta.get("kind") or "train"
        info = read_train_state_info(self.out / STATE)
        if info is None:
            return "the run has no saved step yet"
        return (f"the run keeps its last saved step (epoch {info['epoch'] + 1}, step {info['step']}): "
                f"free space and resume with detkd {kind} --resume {self.out}")

    def _train_step(self, batch: Batch, step: int, steps_per_epoch: int, epoch: int) -> dict[str, Any]:
        factor = lr_factor(step, steps_per_epoch, self.recipe.train)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.runtime):
            losses = self.step_fn(self.forward, batch)
        total = sum(losses.values())
        # backward on every rank even for a bad step: DDP's gradient all-reduce is a collective
        (self.scaler.scale(total) if self.scaler else total).backward()
        dist.average_gradients(self.extra_params)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.recipe.train.grad_clip is not None:
            grad_norm = float(nn.utils.clip_grad_norm_(self.params, self.recipe.train.grad_clip))
        else:
            grads = [p.grad for p in self.params if p.grad is not None]
            grad_norm = float(nn.utils.get_total_norm(grads)) if grads else 0.0
        values = dist.mean_of_values([float(total.detach())] + [float(v.detach()) for v in losses.values()], self.device)
        record = {"step": step, "epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"]}
        if not all(math.isfinite(v) for v in values) or not math.isfinite(grad_norm):
            return self._skip(record, dict(zip(["loss", *losses], values)), step, epoch)
        self.bad_steps = 0
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        record["loss"] = values[0]
        record.update(dict(zip(losses, values[1:])))
        if self.recipe.train.grad_clip is not None:
            record["grad_norm"] = grad_norm
        self._log(record)
        return record

    def _skip(self, record: dict[str, Any], values: dict[str, float], step: int, epoch: int) -> dict[str, Any]:
        """A non-finite loss or gradient: no update; a warning naming the term; stop after a few."""
        bad = [k for k, v in values.items() if k != "loss" and not math.isfinite(v)] or ["gradients"]
        if bad == ["gradients"]:  # a finite loss: which tensors' gradients were not, to find the op that made them
            record["nonfinite_grads"] = [
                n for n, p in zip(self.param_names, self.params) if p.grad is not None and not bool(torch.isfinite(p.grad).all())
            ][:SHOWN_TERMS]
        if self.scaler is not None:
            self.scaler.update()  # lowers the scale; also required before the next unscale_()
            if bad == ["gradients"]:  # fp16 overflow with a finite loss: an expected skip
                self._log({**record, "skipped": "fp16 overflow"})
                return record
        self.bad_steps += 1
        self._log({**record, "skipped": ", ".join(bad)})  # the log keeps every term
        where = f"step {step} (epoch {epoch + 1})"
        # a diverged sparse detector makes 20+ terms NaN at once: the line names the first few
        terms = ", ".join(bad[:SHOWN_TERMS]) + (f" and {len(bad) - SHOWN_TERMS} more terms" if len(bad) > SHOWN_TERMS else "")
        if record.get("nonfinite_grads"):
            terms += f" (first: {', '.join(record['nonfinite_grads'])})"
        if self.bad_steps >= MAX_BAD_STEPS:
            raise DetkdError(
                f"{self.out}: {self.bad_steps} steps in a row were not finite (last: {where}, {terms}); stopped, "
                "the last good checkpoint is kept; lower train.lr or check the data"
            )
        if dist.is_main():
            warn(f"{where}: {terms} not finite; step skipped ({self.bad_steps} in a row, the run stops at {MAX_BAD_STEPS})")
        return record


def _checkpoint_at_step(path: Path, step: int) -> bool:
    sidecar = path.with_suffix(".json")
    if not path.is_file() or not sidecar.is_file():
        return False
    try:
        return json.loads(sidecar.read_text()).get("step") == step
    except json.JSONDecodeError:
        return False
