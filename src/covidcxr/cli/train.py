"""`covidcxr train`, `reproduce` and `experiment`: the commands that fit models."""

from __future__ import annotations

import argparse
import dataclasses

from covidcxr.cli.args import (
    COUNT_ARG,
    FRACTION_ARG,
    IMAGE_SIZE_ARG,
    NON_NEGATIVE_ARG,
    POSITIVE_ARG,
    POSITIVE_INT_ARG,
    Commands,
)
from covidcxr.config import (
    ARCH_CHOICES,
    BALANCE_CHOICES,
    CROP_CHOICES,
    EQUALIZE_CHOICES,
    OPTIMIZER_CHOICES,
    TrainConfig,
    from_dict,
    read_yaml,
    to_dict,
)
from covidcxr.data.tasks import TASKS


def train_config(a: argparse.Namespace) -> TrainConfig:
    """Defaults <- --config YAML <- explicit flags."""
    values = to_dict(TrainConfig())
    if a.config:
        values.update(read_yaml(a.config, "TrainConfig settings"))
    flags = {f.name for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in vars(a).items() if k in flags and v is not None})
    values["data"], values["out"] = str(a.data), str(a.out)
    if a.holdout:
        values["holdout_sources"] = a.holdout
    if a.split_file:
        values["split_files"] = [str(f) for f in a.split_file]
    if a.target_sensitivity is not None:
        values["threshold_method"] = "sensitivity"
    preprocessing = {"equalize": a.equalize, "crop": a.crop, "lung_model": a.lung_model}
    values["augment"] = {**values["augment"], **{k: v for k, v in preprocessing.items() if v is not None}}
    if a.no_gate:
        values["gate"] = {**values["gate"], "enabled": False}
    if a.gate_negatives:
        values["gate"] = {**values["gate"], "negatives": a.gate_negatives}
    return from_dict(TrainConfig, values)


def _train(a: argparse.Namespace) -> int:
    from covidcxr.training.trainer import train
    run = train(train_config(a), resume=a.resume, keep_last=a.keep_last)
    print(f"run written to {run}")
    return 0


def _reproduce(a: argparse.Namespace) -> int:
    from covidcxr.reproduce import reproduce
    summary = reproduce(a.data, a.out, weights=a.weights, quick=a.quick, device=a.device, image_size=a.image_size,
                        guard=a.guard, gate_negatives=a.gate_negatives or "")
    print(f"summary: {summary}")
    return 0


def _experiment(a: argparse.Namespace) -> int:
    from covidcxr.experiment import run_experiment
    run_experiment(a.config, a.out, data=a.data)
    return 0


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """Train's flags default to None, so that only the flags given override --config (see train_config)."""
    d = TrainConfig()
    aug = d.augment
    p.add_argument("data", help="ingested data folder (covidcxr ingest --out)")
    p.add_argument("--out", required=True, help="run folder to write (required)")
    p.add_argument("--config", help="YAML file with TrainConfig settings; flags override it (default: none)")
    p.add_argument("--arch", choices=ARCH_CHOICES, help=f"backbone (default {d.arch})")
    p.add_argument("--weights", help="auto | imagenet | none | PATH to a torchvision state dict or covidcxr checkpoint "
                   f"(default {d.weights}: ImageNet weights when cached or downloadable, else random initialisation "
                   "with a warning; imagenet insists)")
    p.add_argument("--task", choices=list(TASKS), help=f"classes to tell apart (default {d.task})")
    p.add_argument("--epochs", type=POSITIVE_INT_ARG,
                   help=f"most epochs; early stopping may end sooner (default {d.epochs})")
    p.add_argument("--batch-size", dest="batch_size", type=POSITIVE_INT_ARG, help=f"default {d.batch_size}")
    p.add_argument("--optimizer", choices=OPTIMIZER_CHOICES,
                   help=f"default {d.optimizer}: sgd when fine-tuning pretrained weights (the paper's), adamw at "
                        f"--adamw-lr when training from scratch")
    p.add_argument("--lr", type=POSITIVE_ARG, help=f"SGD's learning rate of the new head; pretrained layers get x"
                   f"{d.backbone_lr_scale} (default {d.lr})")
    p.add_argument("--adamw-lr", dest="adamw_lr", type=POSITIVE_ARG,
                   help=f"AdamW's learning rate (same rule for pretrained layers; default {d.adamw_lr:g})")
    p.add_argument("--image-size", dest="image_size", type=IMAGE_SIZE_ARG,
                   help=f"model input side in pixels, or auto: 224 on a GPU, 112 on a CPU (default {d.image_size})")
    p.add_argument("--device", help=f"auto | cpu | cuda | cuda:N | mps (default {d.device}: cuda when available)")
    p.add_argument("--seed", type=COUNT_ARG, help=f"default {d.seed}")
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="deterministic kernels, slower (default off)")
    p.add_argument("--holdout", nargs="+", metavar="SOURCE",
                   help="sources kept out of training and validation: the test part is them (default: none)")
    p.add_argument("--split-file", dest="split_file", nargs="+", metavar="FILE",
                   help="a published split instead of covidcxr's own: files named for their part (train, val, "
                        "test), lines `patient_id filename class source` (COVIDx's); without a val file, validation "
                        "patients come from the train file's (default: none)")
    path = p.add_mutually_exclusive_group()
    path.add_argument("--data-in-memory", dest="data_path", action="store_const", const="memory",
                      help="hold the images in memory (default auto: in memory while they fit, else streamed)")
    path.add_argument("--stream", dest="data_path", action="store_const", const="stream",
                      help="stream the images from the data folder's cache file batch by batch: memory stays flat "
                           "however many images (default auto)")
    p.add_argument("--checkpoint-steps", dest="checkpoint_steps", type=COUNT_ARG,
                   help="also checkpoint every N steps within an epoch, to resume long epochs (default 0: at epoch "
                        "ends only)")
    p.add_argument("--balance", choices=BALANCE_CHOICES, help=f"how the sampler weights images (default {d.balance})")
    p.add_argument("--target-sensitivity", dest="target_sensitivity", type=FRACTION_ARG,
                   help="choose the threshold on validation data for this sensitivity (default: Youden's J)")
    p.add_argument("--domain-adversarial", dest="domain_adversarial", type=NON_NEGATIVE_ARG,
                   help=f"weight of a gradient-reversal source head, 0 = off (default {d.domain_adversarial:g})")
    p.add_argument("--max-train-images", dest="max_train_images", type=COUNT_ARG,
                   help="subsample training images to this many, 0 = all (default 0)")
    p.add_argument("--equalize", choices=EQUALIZE_CHOICES,
                   help=f"histogram equalization of every image (default {aug.equalize})")
    p.add_argument("--crop", choices=CROP_CHOICES,
                   help=f"crop to the content box less its border, or to the lungs (default {aug.crop})")
    p.add_argument("--lung-model", dest="lung_model",
                   help="lung checkpoint for --crop lungs (covidcxr lungs train; default: none)")
    p.add_argument("--no-gate", dest="no_gate", action="store_true",
                   help="fit no gate: the run then scores every image, whatever it shows (default: a gate is fitted "
                        f"after training, {d.gate.steps} steps, and stored as RUN/gate.onnx)")
    p.add_argument("--gate-negatives", dest="gate_negatives", metavar="DIR",
                   help="folder of images the gate must refuse, e.g. lateral films and CT slices (metadata.csv with "
                        "path and kind columns, or sub-folders named lateral, ct, mr, photo, document; default: "
                        "none, so the gate is shown no lateral films and says so)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (default off)")
    p.add_argument("--keep-last", dest="keep_last", action="store_true",
                   help="keep the finished run's last.pt with its optimizer state (~2x model.pt; default: only the "
                        "record that the run is finished, since nothing can resume it)")


def add_train(sub: Commands) -> None:
    """`covidcxr train`: fine-tune the gray model."""
    p = sub.add_parser("train", help="fine-tune the gray model")
    add_train_flags(p)
    p.set_defaults(func=_train)



def add_reproduce(sub: Commands) -> None:
    """`covidcxr reproduce`: the main job."""
    p = sub.add_parser("reproduce", help="the paper's experiment end to end, plus the checks it lacked")
    p.add_argument("--data", default="data/sources",
                   help="database folder(s) root or an ingested data folder (default data/sources)")
    p.add_argument("--out", required=True, help="folder for everything it writes (required)")
    p.add_argument("--weights", default="auto", help="auto | imagenet | none | PATH, as for train (default auto)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    p.add_argument("--image-size", dest="image_size", type=IMAGE_SIZE_ARG, default="auto",
                   help="model input side for every run: auto = 224 on a GPU, 112 on a CPU (default auto)")
    p.add_argument("--quick", action="store_true", help="smaller, faster settings: a smoke test (default off)")
    p.add_argument("--gate-negatives", dest="gate_negatives", metavar="DIR",
                   help="folder of images every run's gate must refuse, e.g. lateral films and CT slices (as for "
                        "train; default: none)")
    p.add_argument("--guard", action="store_true",
                   help="also fit and measure the member guard (models trained with other sources held out; it "
                        "flags few wrong predictions at new sites and halves serving throughput; default off)")
    p.set_defaults(func=_reproduce)



def add_experiment(sub: Commands) -> None:
    """`covidcxr experiment`: a grid under the cross-source protocol."""
    p = sub.add_parser("experiment", help="train a grid of settings under a cross-source protocol")
    p.add_argument("config", help="experiment YAML")
    p.add_argument("--data", help="ingested data folder (default: the YAML's data)")
    p.add_argument("--out", required=True, help="folder for runs and results (required)")
    p.set_defaults(func=_experiment)
