"""Fine-tuning loop: uint8 cache -> batched on-device augmentation -> gray model; checkpoints every epoch, resumable.

Launched as a plain process (one device) or by torchrun (DDP across GPUs/nodes; gloo on CPUs). Rank 0 alone writes
files and prints; every rank sees the same epoch order (a DistributedSampler seeded by the run's seed and the epoch),
so an interrupted run resumed from its last checkpoint (at an epoch's end, or within one with `checkpoint_steps`)
ends with the same weights as an uninterrupted one. Beside the loop: `distributed` (the job), `rundata` (the images
and their split), `feed` (the images held in memory or streamed from the cache), `schedule` (the order, weighting
and learning rate of the steps), `runfiles` (what the run folder holds).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from covidcxr.config import AUTO, TrainConfig, config_hash, to_dict
from covidcxr.data import tasks
from covidcxr.data.manifest import manifest_hash
from covidcxr.device import autocast, resolve_device
from covidcxr.errors import InputError, RunExistsError
from covidcxr.model.network import build_model, forward_with_features, source_logits
from covidcxr.model.threshold import choose_threshold
from covidcxr.model.weights import resolve_weights
from covidcxr.preprocess.augment import augment_batch
from covidcxr.preprocess.transform import Preprocess, PreprocessSpec
from covidcxr.scoring import BATCH_SIZE, predict_probs
from covidcxr.training.distributed import check_ranks_agree, init_distributed
from covidcxr.training.feed import Images, in_memory
from covidcxr.training.gate import fit_gate
from covidcxr.training.rundata import load_data
from covidcxr.training.runfiles import (
    cut_history,
    record_epoch,
    resume_checkpoint,
    save_best,
    save_last,
    tensorboard_writer,
    write_run_files,
)
from covidcxr.training.schedule import (
    batches_per_epoch,
    build_optimizer,
    class_weights,
    epoch_order,
    lr_lambda,
    seed_everything,
)
from covidcxr.trust.gate import GATE_FILE

log = logging.getLogger(__name__)

AUTO_IMAGE_SIZE = {"cuda": 224, "cpu": 112}  # the paper's resolution where a GPU makes it affordable


def resolve_image_size(image_size: int | str, device: torch.device) -> int:
    """image_size "auto" -> 224 on a GPU, 112 elsewhere; a number as it is."""
    return AUTO_IMAGE_SIZE.get(device.type, AUTO_IMAGE_SIZE["cpu"]) if image_size == AUTO else int(image_size)


def positive_auc(y: np.ndarray, probs: np.ndarray) -> float:
    """AUC of COVID-19 (class 1) against everything else; NaN when only one class is present."""
    positive = (y == tasks.POSITIVE_INDEX).astype(int)
    if positive.min() == positive.max():
        return float("nan")
    return float(roc_auc_score(positive, probs[:, tasks.POSITIVE_INDEX]))


class Trainer:
    """One training run; `fit()` runs (or resumes) it to the end."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, keep_last: bool = False) -> None:
        self.cfg, self.out, self.keep_last = cfg, Path(cfg.out), keep_last
        self.d = init_distributed(resolve_device(cfg.device).type)
        self.device = resolve_device(cfg.device, self.d.local_rank)
        seed_everything(cfg.seed, cfg.deterministic)
        self.cache, self.df = load_data(cfg)
        self.weights, self.image_size = self._resolve_auto(resume)
        self.manifest_hash = manifest_hash(self.df)  # identity of the data this run uses, written with every checkpoint
        self.classes = tasks.class_names(cfg.task)
        train = self.df[self.df["split"] == "train"].reset_index(drop=True)
        self.train_df = train
        self.sources = sorted(train["source"].unique())
        # the deterministic preprocessing, once per set: the same code and rounding that scoring uses
        self.preprocess = Preprocess(PreprocessSpec(self.cache.square, self.cache.size, self.image_size, cfg.augment))
        val = self.df[self.df["split"] == "val"].reset_index(drop=True)
        self.val_df = val
        self.in_memory = in_memory(cfg.data_path, len(train) + len(val), self.cache.size, self.device)
        self.train_images = Images(self.cache, train["cache_index"].to_numpy(), self.preprocess, self.device,
                                   self.in_memory)
        val_device = torch.device("cpu") if self.in_memory else self.device  # scoring moves each batch on
        self.val_images = Images(self.cache, val["cache_index"].to_numpy(), self.preprocess, val_device,
                                 self.in_memory)
        self.train_y = torch.tensor(train["y"].to_numpy()).to(self.device)
        source_index = train["source"].map({s: i for i, s in enumerate(self.sources)})
        self.train_src = torch.tensor(source_index.to_numpy()).to(self.device)
        self.model = self._build_model()
        self.optimizer = build_optimizer(self.model, cfg, self.weights)
        batchnorm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in self.model.modules())
        self.steps_per_epoch = batches_per_epoch(len(train), cfg.batch_size, self.d.world, batchnorm)
        total = self.steps_per_epoch * cfg.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(total, warmup=max(1, self.steps_per_epoch // 2)))
        self.loss_weights = class_weights(train["y"].to_numpy(), len(self.classes)).to(self.device)
        self.start_epoch, self.best_auc, self.bad_epochs = 0, -1.0, 0
        self.within: dict[str, Any] | None = None  # where a run checkpointed within an epoch resumes that epoch
        self.best: tuple[dict, dict, np.ndarray] | None = None  # (weights, meta, validation scores) not yet saved
        self.best_dirty = False
        if self.d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            if not resume and (self.out / "last.pt").exists():
                raise RunExistsError(
                    f"{self.out} already holds a run; add --resume to continue it or choose a new --out")
        if self.d.main:  # once the model is built: a bad --weights is then the one line a run prints
            log.info("%d training and %d validation images %s", len(train), len(val),
                     "held in memory" if self.in_memory else "streamed from the cache")
        if resume:
            self._resume()
        elif self.d.main:
            self._write_run_files()
        self.ddp_model = self.model
        if self.d.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.step_model: torch.nn.Module = cast(torch.nn.Module, torch.compile(self.ddp_model)) if cfg.compile \
            else self.ddp_model  # torch.compile returns an OptimizedModule, typed as a plain callable
        self.tensorboard = tensorboard_writer(self.out / "tensorboard") if self.d.main else None

    def _resolve_auto(self, resume: bool) -> tuple[str, int]:
        """(weights, image size) for "auto" settings: a resumed run keeps the ones it started with."""
        saved = self.out / "config.json"
        if resume and saved.exists():
            run = json.loads(saved.read_text())
            if "weights_used" in run:
                return run["weights_used"], int(run["image_size_used"])
        weights, _ = resolve_weights(self.cfg.weights, self.cfg.arch)
        size = resolve_image_size(self.cfg.image_size, self.device)
        if self.cfg.image_size == AUTO and self.d.main:
            log.info("image size %d px (auto on %s; --image-size to choose)", size, self.device.type)
        return weights, size

    def _build_model(self) -> torch.nn.Module:
        """The classifier (with a source head for domain-adversarial runs), channels-last for faster convolutions."""
        n_sources = len(self.sources) if self.cfg.domain_adversarial > 0 else 0
        model = build_model(self.cfg.arch, len(self.classes), self.weights, num_sources=n_sources).to(self.device)
        return model.to(memory_format=torch.channels_last)

    def meta(self, epoch: int, val_auc: float, threshold: float | None = None) -> dict:
        """What a checkpoint says about its model, enough for every later stage to score with it."""
        cfg = self.cfg
        return {"arch": cfg.arch, "task": cfg.task, "classes": self.classes, "positive_index": tasks.POSITIVE_INDEX,
                "image_size": self.image_size, "weights_used": self.weights, "cache_size": self.cache.size,
                "square": self.cache.square,
                "augment": to_dict(cfg.augment), "num_sources": len(self.sources) if cfg.domain_adversarial > 0 else 0,
                "threshold": threshold, "threshold_method": cfg.threshold_method, "amp": cfg.amp, "epoch": epoch,
                "val_auc": val_auc, "config_hash": config_hash(cfg), "manifest_hash": self.manifest_hash}

    def _write_run_files(self) -> None:
        """A new run's files, with what its "auto" settings resolved to, so a resume keeps them."""
        write_run_files(self.out, self.cfg, self.df, {
            "weights_used": self.weights, "image_size_used": self.image_size, "manifest_hash": self.manifest_hash,
            "optimizer_used": type(self.optimizer).__name__.lower(),  # what build_optimizer resolved "auto" to
            "config_hash": config_hash(self.cfg), "train_sources": self.sources, "torch": torch.__version__,
            "data_path_used": "memory" if self.in_memory else "stream"})

    def _resume(self) -> None:
        """Continue from last.pt: model, optimizer, schedule, early-stopping state; history cut back to match."""
        ckpt = resume_checkpoint(self.out, self.cfg)
        if ckpt.get("finished"):  # early-stopped or complete: nothing left to do
            self.start_epoch = self.cfg.epochs
            if self.d.main:
                log.info("%s: finished after epoch %d; nothing to resume", self.out, ckpt["epoch"] + 1)
            return
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.start_epoch, self.best_auc, self.bad_epochs = ckpt["epoch"] + 1, ckpt["best_auc"], ckpt["bad_epochs"]
        self.within = ckpt.get("within_epoch")
        if self.within is not None and len(self.within["rng"]) != self.d.world:
            raise InputError(f"{self.out}: checkpointed within an epoch by {len(self.within['rng'])} process(es); "
                             "resume it with as many")
        if self.d.main:
            cut_history(self.out, ckpt["epoch"])
            log.info("resuming %s after epoch %d (best val AUC %.4f)", self.out, ckpt["epoch"], self.best_auc)

    def train_epoch(self, epoch: int, stop: int | None = None) -> tuple[float, float]:
        """One pass over this rank's shard (its first `stop` steps when given); returns (mean loss, images/s)."""
        cfg, model = self.cfg, self.step_model
        stop = self.steps_per_epoch if stop is None else min(stop, self.steps_per_epoch)
        model.train()
        torch.manual_seed(cfg.seed * 1_000_003 + epoch * 7919 + self.d.rank)  # dropout: a function of the epoch
        gen = torch.Generator(self.device).manual_seed(cfg.seed * 1_000_003 + epoch)
        order = epoch_order(self.train_df, cfg, epoch, self.d).to(self.device)
        losses, seen, first, before = torch.zeros((), device=self.device), 0, 0, 0.0
        if self.within is not None and epoch == self.start_epoch:  # resumed within this epoch: where it stood
            first, before, seen = self.within["step"], self.within["seconds"], self.within["seen"]
            losses += self.within["loss_sum"]
            self._set_rng(gen, self.within["rng"][self.d.rank])
            self.within = None
        start = time.perf_counter() - before
        bar = tqdm(range(first, stop), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                   disable=not self.d.main, leave=False)
        batches = self.train_images.batches(order, cfg.batch_size, first, stop)
        for step, images in zip(bar, batches):
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            x = augment_batch(images, cfg.augment, self.image_size, gen)
            loss = self._loss(model, x.contiguous(memory_format=torch.channels_last), idx, epoch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            losses += loss.detach()
            seen += len(idx)
            if step % 10 == 0 or step == stop - 1:
                bar.set_postfix(loss=f"{losses.item() / (step + 1):.4f}",
                                img_s=f"{seen * self.d.world / (time.perf_counter() - start):.0f}")
            if cfg.checkpoint_steps and (step + 1) % cfg.checkpoint_steps == 0 and step + 1 < stop:
                self._checkpoint_within(epoch, {"step": step + 1, "seen": seen, "loss_sum": losses.item(),
                                                "seconds": time.perf_counter() - start}, gen)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return losses.item() / stop, seen * self.d.world / (time.perf_counter() - start)

    def _rng(self, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """This process's random state within an epoch: the augmentation's generator and dropout's."""
        state = {"augment": gen.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _set_rng(self, gen: torch.Generator, state: dict[str, torch.Tensor]) -> None:
        gen.set_state(state["augment"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def _checkpoint_within(self, epoch: int, progress: dict[str, Any], gen: torch.Generator) -> None:
        """last.pt within an epoch: how far it got and every rank's random state, so a resume continues the epoch
        exactly (every rank takes part: the states are gathered to rank 0, which writes)."""
        states: list[Any] = [self._rng(gen)]
        if self.d.world > 1:
            states = [None] * self.d.world
            dist.all_gather_object(states, self._rng(gen))
        if self.d.main:
            self._checkpoint(epoch - 1, float("nan"), False, {**progress, "rng": states})

    def _loss(self, model: torch.nn.Module, x: torch.Tensor, idx: torch.Tensor, epoch: int) -> torch.Tensor:
        """Class-weighted cross-entropy, plus the source head's loss for domain-adversarial runs."""
        with autocast(self.device, self.cfg.amp):
            if self.cfg.domain_adversarial > 0:
                logits, feats = forward_with_features(model, x)
                src_logits = source_logits(model, feats, self.cfg.domain_adversarial)
                src_loss = F.cross_entropy(src_logits.float(), self.train_src[idx])
            else:
                return F.cross_entropy(model(x).float(), self.train_y[idx], weight=self.loss_weights)
            return F.cross_entropy(logits.float(), self.train_y[idx], weight=self.loss_weights) + src_loss

    def validate(self) -> tuple[float, float, np.ndarray]:
        """(loss, AUC, probabilities) on the validation images, scored as every later stage scores them."""
        probs = torch.cat([predict_probs(self.model, images, self.preprocess, self.device)
                           for images in self.val_images.in_order(BATCH_SIZE)])
        y = self.val_df["y"].to_numpy()
        loss = F.nll_loss(torch.log(probs.clamp_min(1e-7)), torch.tensor(y)).item()
        return loss, positive_auc(y, probs.numpy()), probs.numpy()

    def fit(self) -> Path:
        """Train from start_epoch to the end or to early stopping; rank 0 decides when to stop, every rank stops."""
        cfg = self.cfg
        for epoch in range(self.start_epoch, cfg.epochs):
            start = time.perf_counter()
            train_loss, speed = self.train_epoch(epoch)
            stop = torch.zeros(1, device=self.device)
            if self.d.main:
                stop[0] = float(self._end_epoch(epoch, train_loss, speed, time.perf_counter() - start))
            if self.d.world > 1:
                dist.broadcast(stop, 0)
            if stop.item():
                break
        if self.d.world > 1:
            check_ranks_agree(self.model, self.d, self.out)
        return self.out

    def _end_epoch(self, epoch: int, train_loss: float, speed: float, seconds: float) -> bool:
        """Validate, log, keep the best weights (by validation AUC), checkpoint; True when early stopping says stop."""
        val_loss, val_auc, probs = self.validate()
        record_epoch(self.out, self.tensorboard, epoch, {
            "train_loss": train_loss, "val_loss": val_loss, "val_auc": val_auc,
            "lr": self.optimizer.param_groups[0]["lr"], "images_per_s": speed, "seconds": seconds})
        improved = val_auc > self.best_auc or (np.isnan(self.best_auc) and not np.isnan(val_auc))
        if improved:
            self.best_auc, self.bad_epochs = val_auc, 0
            self._keep_best(epoch, val_auc, probs)
        else:
            self.bad_epochs += 1
        stop = self.bad_epochs >= self.cfg.patience
        finished = stop or epoch + 1 == self.cfg.epochs
        if finished or (epoch + 1) % self.cfg.checkpoint_every == 0:
            self._checkpoint(epoch, val_auc, finished)
        log.info("epoch %d/%d  train_loss %.4f  val_loss %.4f  val_auc %.4f%s  %.0f img/s  %.0fs", epoch + 1,
                 self.cfg.epochs, train_loss, val_loss, val_auc, "  *best*" if improved else "", speed, seconds)
        return stop

    def _keep_best(self, epoch: int, val_auc: float, probs: np.ndarray) -> None:
        """Hold the best weights in memory with their operating threshold, chosen on validation data only."""
        positive = (self.val_df["y"].to_numpy() == tasks.POSITIVE_INDEX).astype(int)
        score = probs[:, tasks.POSITIVE_INDEX]
        threshold = choose_threshold(positive, score, self.cfg.threshold_method, self.cfg.target_sensitivity)
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.best = (state, self.meta(epoch, val_auc, float(threshold)), score)
        self.best_dirty = True

    def _checkpoint(self, epoch: int, val_auc: float, finished: bool, within: dict[str, Any] | None = None) -> None:
        """model.pt (best so far) first, then last.pt: a crash between the two leaves a resumable pair. `within`:
        taken within the epoch after `epoch`, where that epoch stood.

        Once the run is finished nothing can resume it, so last.pt then keeps only the record that it is finished
        (a finished AlexNet run is model.pt's ~228 MB instead of ~684 MB); `keep_last` keeps the whole of it."""
        if self.best_dirty:
            assert self.best is not None  # set with best_dirty by _keep_best
            state, meta, score = self.best
            save_best(self.out, self.model, state, meta, self.val_df, score)
            self.best_dirty = False
        progress = {"epoch": epoch, "best_auc": self.best_auc, "bad_epochs": self.bad_epochs, "finished": finished,
                    "within_epoch": within}
        training = None  # a finished run keeps no optimizer state, unless keep_last
        if not finished or self.keep_last:
            training = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        save_last(self.out, self.model, self.meta(epoch, val_auc), progress, training)


def train(cfg: TrainConfig, resume: bool = False, keep_last: bool = False) -> Path:
    """Fine-tune as configured, then fit the run's gate (unless `cfg.gate.enabled` is off); returns the run folder.
    `keep_last` keeps the finished run's resumable last.pt."""
    tasks.check_task(cfg.task)
    trainer = Trainer(cfg, resume, keep_last)
    try:
        run = trainer.fit()
    finally:
        if trainer.d.world > 1:
            dist.destroy_process_group()
    if trainer.d.main and cfg.gate.enabled and not (run / GATE_FILE).is_file():
        fit_gate(run, cfg.data, cfg.gate, cfg.seed)
    return run
