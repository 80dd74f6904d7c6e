"""Train the reward CNN: ``python -m ppo_ddpm.train_reward_model --cfg ... --set ...``.

With ``reward.kind: classifier`` (or a classifier term without a model_path) it is a classifier of
the labelled class folders ``{data.root}/<class>/`` (class index = folder order of ``class_folders``,
names stored with the model), written to ``{output_dir}/classifier.safetensors``. Otherwise it is
the real-vs-fake CNN of the ``model`` reward. Data (ImageFolder layout, classes 0 = fake, 1 = real):

- real: ``{data.root}/real``; with ``data.root`` empty, the procedural dataset made in
  ``{output_dir}/data/real``;
- fake: ``{data.root}/fake`` when it exists and was not written by this script; otherwise
  ``reward.num_fake`` DDIM samples (``sampling`` config) of the base DDPM at ``model.pretrained``,
  written to ``{output_dir}/data/fake`` as an ordinary image folder.

Per class, a fraction ``reward.held_out_fraction`` is held out (fixed permutation of ``seed``).
Training: ``reward.train_steps`` Adam steps on class-balanced batches of ``reward.batch_size``
with random horizontal flips, cross-entropy loss. The held-out accuracy is printed and stored
with the model in ``{output_dir}/reward_model.safetensors``; an existing one (or classifier.safetensors) is
replaced only with ``--overwrite``. TensorBoard (``{output_dir}/tb``) gets the loss and held-out accuracy
curves (``reward_model/``).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .config import Config, ConfigError, add_config_args, config_from_args, validate_config
from .data import DataError, load_images, resolve_data_root, save_images
from .reward import CLASS_NAMES, RewardCNN, freeze, save_reward_model, trained_model_kind
from .run_logger import tensorboard_writer
from .utils import resolve_device, set_seed
from .utils.checkpoint import atomic_write_text, refuse_overwrite
from .utils.cli import run_cli
from .utils.lock import RunLock

log = logging.getLogger(__name__)

FAKE_MANIFEST = "fake.json"  # next to a fake/ folder this script sampled
PROGRESS_POINTS = 20  # points of the TensorBoard loss / accuracy curves


def split_held_out(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class, a seeded permutation; the first round(fraction * n_c) (>= 1) are held out -> (train, held) indices."""
    g = torch.Generator().manual_seed(seed)
    train, held = [], []
    for c in labels.unique(sorted=True).tolist():
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        if len(idx) < 2:
            raise DataError(f"class {c} has {len(idx)} image(s); at least 2 are needed to hold one out")
        k = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        held.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train), torch.cat(held)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Fraction of argmax(model(x)) == y (model in eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    correct = sum(
        (model(x[i : i + batch_size].to(device)).argmax(1).cpu() == y[i : i + batch_size]).sum().item()
        for i in range(0, len(x), batch_size)
    )
    return correct / len(x)


def log_progress(writer, step: int, steps: int, losses: list[float], model: torch.nn.Module, held_x: torch.Tensor,
                 held_y: torch.Tensor, points: int = PROGRESS_POINTS) -> None:
    """At ``points`` evenly spaced steps (and the last): ``reward_model/loss`` (mean training loss since the
    previous point) and ``reward_model/held_out_accuracy`` to ``writer`` (nothing when it is None)."""
    every = max(1, steps // points)
    if writer is None or (step % every and step != steps):
        return
    writer.add_scalar("reward_model/loss", sum(losses[-every:]) / len(losses[-every:]), step)
    writer.add_scalar("reward_model/held_out_accuracy", accuracy(model, held_x, held_y), step)
    model.train()


def fit_reward_cnn(
    images: torch.Tensor, labels: torch.Tensor, *, hidden_channels: int = 16, steps: int = 300,
    batch_size: int = 64, lr: float = 2e-3, held_out_fraction: float = 0.2, seed: int = 0,
    device: str | torch.device = "cpu", progress: bool = True, writer=None,
) -> tuple[RewardCNN, float]:
    """Train a RewardCNN on images [N, 3, S, S] in [-1, 1] with labels [N] -> (frozen model, held-out accuracy).
    ``writer``: a SummaryWriter that gets the loss and held-out accuracy curves (:func:`log_progress`)."""
    num_classes = int(labels.max()) + 1
    train_idx, held_idx = split_held_out(labels, held_out_fraction, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = RewardCNN(images.shape[1], hidden_channels, max(2, num_classes), images.shape[-1]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed + 1)
    per_class = [train_idx[labels[train_idx] == c] for c in range(num_classes)]
    k = max(1, batch_size // num_classes)
    model.train()
    losses: list[float] = []
    held_x, held_y = images[held_idx], labels[held_idx]
    bar = tqdm(range(steps), desc="reward model", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        idx = torch.cat([pc[torch.randint(len(pc), (k,), generator=g)] for pc in per_class])
        x, y = images[idx], labels[idx]
        flip = torch.rand(len(idx), generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = F.cross_entropy(model(x.to(device)), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        log_progress(writer, len(losses), steps, losses, model, held_x, held_y)
    acc = accuracy(model, held_x, held_y)
    return freeze(model), acc


def _fake_folder(cfg: Config) -> tuple[Path, bool]:
    """(folder of fake images, whether to sample it from the base DDPM)."""
    if cfg.data.root:
        given = Path(cfg.data.root) / "fake"
        if given.is_dir() and not (given.parent / FAKE_MANIFEST).is_file():
            return given, False
    return Path(cfg.output_dir) / "data" / "fake", True


def sample_fakes(cfg: Config, folder: Path, device: torch.device) -> Path:
    """Write ``reward.num_fake`` DDIM samples of the model at ``model.pretrained`` to ``folder/fake_*.png``."""
    from .ddpm.ddim import DDIMPlan
    from .ddpm.model import build_model
    from .ddpm.sample import ddim_sample

    if not cfg.model.pretrained:
        raise ConfigError(
            f"no fake images: data.root={cfg.data.root!r} has no fake/ folder and model.pretrained is empty, "
            "so there is no base DDPM to sample fakes from (pretrain first, or provide data.root/fake)"
        )
    model = build_model(cfg.model).to(device)
    s = cfg.sampling
    plan = DDIMPlan.from_config(cfg).to(device)
    g = torch.Generator(device).manual_seed(cfg.seed + 1_000_003)
    if folder.is_dir():
        for old in folder.glob("fake_*.png"):
            old.unlink()
    shape = (cfg.model.in_channels, cfg.model.sample_size, cfg.model.sample_size)
    n, bs = cfg.reward.num_fake, cfg.reward.batch_size
    for start in tqdm(range(0, n, bs), desc="sampling fakes", dynamic_ncols=True):
        b = min(bs, n - start)
        x_T = torch.randn((b, *shape), generator=g, device=device)
        labels = None
        if cfg.model.num_classes > 0:
            labels = torch.randint(cfg.model.num_classes, (b,), generator=g, device=device)
        x0 = ddim_sample(model, plan, x_T, labels, clip_x0=s.clip_x0, generator=g, prediction_type=cfg.model.prediction_type)
        save_images(x0, folder, "fake", start=start)
    atomic_write_text(json.dumps({"pretrained": cfg.model.pretrained, "count": n, "seed": cfg.seed}), folder.parent / FAKE_MANIFEST)
    return folder


def _at_least_two(images: torch.Tensor, folder: Path, what: str) -> torch.Tensor:
    if len(images) < 2:
        raise DataError(f"{folder}: {len(images)} {what} image(s); at least 2 are needed (one is held out to "
                        "measure the accuracy)")
    return images


def class_folders(root: Path) -> list[Path]:
    """The class folders of ``root`` (its sub-folders, hidden ones excluded), numeric names in numeric order
    then the others by name, so folders 0..n-1 get class indices 0..n-1 (a class-conditional DDPM's labels)."""
    if not root.is_dir():
        raise DataError(f"data.root={str(root)!r} is not a folder of class folders (data.root/<class>/...)")
    folders = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    folders.sort(key=lambda d: (0, int(d.name), "") if d.name.isdigit() else (1, 0, d.name))
    if len(folders) < 2:
        raise DataError(f"data.root={str(root)!r} has {len(folders)} class folder(s) {[d.name for d in folders]}; "
                        "a classifier needs at least 2 (data.root/<class>/<images>)")
    return folders


def output_path(cfg: Config) -> Path:
    """Where :func:`train_reward_model` writes: ``classifier.safetensors`` or ``reward_model.safetensors``."""
    name = "classifier" if trained_model_kind(cfg.reward) == "classifier" else "reward_model"
    return Path(cfg.output_dir) / f"{name}.safetensors"


def train_classifier(cfg: Config, writer=None) -> tuple[Path, float]:
    """Train a classifier on the class folders of ``data.root`` -> (``{output_dir}/classifier.safetensors``,
    held-out accuracy); class names = folder names (``class_folders`` order), the reward ``classifier``."""
    r = cfg.reward
    if not cfg.data.root:
        raise ConfigError("reward.kind=classifier trains on labelled class folders data.root/<class>/...; data.root is empty")
    folders = class_folders(Path(cfg.data.root))
    parts = [_at_least_two(load_images(d, cfg.data.image_size), d, f"class {d.name!r}") for d in folders]
    images = torch.cat(parts)
    labels = torch.cat([torch.full((len(x),), c, dtype=torch.long) for c, x in enumerate(parts)])
    model, acc = fit_reward_cnn(images, labels, hidden_channels=r.hidden_channels, steps=r.train_steps,
                                batch_size=r.batch_size, lr=r.lr, held_out_fraction=r.held_out_fraction,
                                seed=cfg.seed, device=resolve_device(cfg.device), writer=writer)
    names = [d.name for d in folders]
    path = save_reward_model(model, output_path(cfg), class_names=names,
                             held_out_accuracy=acc, counts={n: len(x) for n, x in zip(names, parts)}, root=str(cfg.data.root))
    print(f"classifier: held-out accuracy {acc:.3f} over {len(names)} classes ({len(images)} images) -> {path}", flush=True)
    return path, acc


def train_reward_model(cfg: Config, overwrite: bool = False) -> tuple[Path, float]:
    """Train and save the reward CNN that ``cfg.reward`` needs (``reward.trained_model_kind``): the
    classifier of ``data.root/<class>/`` (:func:`train_classifier`), else the real-vs-fake CNN ->
    (:func:`output_path`, held-out accuracy). An existing output is replaced only with ``overwrite``."""
    validate_config(cfg)
    if not overwrite:
        refuse_overwrite([output_path(cfg)], flags="--overwrite to replace it")
    set_seed(cfg.seed)
    writer = tensorboard_writer(cfg)
    try:
        if trained_model_kind(cfg.reward) == "classifier":
            return train_classifier(cfg, writer)
        return _train_real_vs_fake(cfg, writer)
    finally:
        if writer is not None:
            writer.close()


def _train_real_vs_fake(cfg: Config, writer) -> tuple[Path, float]:
    r = cfg.reward
    device = resolve_device(cfg.device)
    size = cfg.data.image_size
    root = resolve_data_root(cfg)
    real = _at_least_two(load_images(root / "real", size), root / "real", "real")
    fake_dir, sample = _fake_folder(cfg)
    if sample:
        sample_fakes(cfg, fake_dir, device)
    fake = _at_least_two(load_images(fake_dir, size), fake_dir, "fake")
    images = torch.cat([fake, real])
    labels = torch.cat([torch.full((len(fake),), CLASS_NAMES.index("fake")),
                        torch.full((len(real),), CLASS_NAMES.index("real"))])
    model, acc = fit_reward_cnn(images, labels, hidden_channels=r.hidden_channels, steps=r.train_steps,
                                batch_size=r.batch_size, lr=r.lr, held_out_fraction=r.held_out_fraction,
                                seed=cfg.seed, device=device, writer=writer)
    path = save_reward_model(model, output_path(cfg), held_out_accuracy=acc,
                             num_real=len(real), num_fake=len(fake), real_dir=str(root / "real"), fake_dir=str(fake_dir))
    print(f"reward model: held-out accuracy {acc:.3f} ({len(real)} real, {len(fake)} fake images) -> {path}", flush=True)
    return path, acc


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = add_config_args(argparse.ArgumentParser(prog="python -m ppo_ddpm.train_reward_model",
                                                     description=__doc__.splitlines()[0]))
    parser.add_argument("--overwrite", action="store_true", help="replace an existing reward_model.safetensors")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def body() -> None:
        cfg = config_from_args(args)
        with RunLock(cfg.output_dir):
            train_reward_model(cfg, overwrite=args.overwrite)

    return run_cli("ppo_ddpm.train_reward_model", argv, body)


if __name__ == "__main__":
    sys.exit(main())
