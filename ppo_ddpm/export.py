"""Export a (fine-tuned) model as a diffusers pipeline folder: ``python -m ppo_ddpm.export --cfg FILE``.

    python -m ppo_ddpm.export --cfg configs/diffusers.yaml [--model runs/x/finetuned.pth] [--out DIR] [--force]

Writes ``DIR`` (default ``{output_dir}/diffusers``) with ``DDIMPipeline.save_pretrained`` (safetensors):

    model_index.json
    unet/config.json, unet/diffusion_pytorch_model.safetensors      UNet2DModel
    scheduler/scheduler_config.json                                 DDIMScheduler sampling as the config does

so ``DDIMPipeline.from_pretrained(DIR)`` / ``DDPMPipeline.from_pretrained(DIR)`` load and sample it, and
``model.pretrained: DIR`` loads it back (schedule and prediction type included). A model loaded from a
diffusers folder is its UNet2DModel; our own UNet is converted exactly (``ddpm.unet_to_diffusers``) or
refused with the reason. The folder is written next to ``DIR`` and renamed into place: an existing
``DIR`` is kept unless ``--force`` (then replaced only once the new folder is complete).
"""
from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
from pathlib import Path

from torch import nn

from .config import Config, add_config_args, config_from_args
from .ddpm.diffusers_config import ddim_scheduler_config
from .ddpm.diffusers_unet import DiffusersUNet
from .ddpm.model import load_model, unwrap
from .ddpm.unet import UNet
from .ddpm.unet_to_diffusers import ExportError, unet_to_diffusers
from .utils.checkpoint import CheckpointError
from .utils.cli import run_cli

EXPORT_SECTIONS = ("model", "schedule", "sampling", "output_dir")  # the keys export reads (validated)


def to_unet2d(model: nn.Module, cfg: Config) -> nn.Module:
    """The diffusers UNet2DModel of ``model`` (a copy; ``model`` is left untouched)."""
    model = unwrap(model)
    if isinstance(model, DiffusersUNet):
        return copy.deepcopy(model.unet).cpu().eval()
    if isinstance(model, UNet):
        return unet_to_diffusers(model.cpu(), cfg.model)
    raise ExportError(f"cannot export a {type(model).__name__}: expected ppo_ddpm's UNet or a diffusers UNet2DModel")


def export_diffusers(model: nn.Module, cfg: Config, out: str | Path, force: bool = False) -> Path:
    """Write ``model`` and the DDIM scheduler of ``cfg`` as a diffusers pipeline folder ``out`` (module docstring)."""
    from diffusers import DDIMPipeline, DDIMScheduler

    out = Path(out)
    if out.exists() and not force:
        raise ExportError(f"{out} exists; pass --force to replace it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    pipe = DDIMPipeline(unet=to_unet2d(model, cfg), scheduler=DDIMScheduler.from_config(ddim_scheduler_config(cfg)))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if out.exists():
            old = tmp.with_name(tmp.name + ".old")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = add_config_args(argparse.ArgumentParser(prog="python -m ppo_ddpm.export", description=__doc__.split("\n")[0]))
    parser.add_argument("--model", default=None, help="model file or folder (default: {output_dir}/finetuned.pth)")
    parser.add_argument("--out", default=None, help="output folder (default: {output_dir}/diffusers)")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)

    def body() -> None:
        cfg = config_from_args(args, sections=EXPORT_SECTIONS)
        path = Path(args.model or Path(cfg.output_dir) / "finetuned.pth")
        if not path.exists():
            raise CheckpointError(f"model {path} does not exist; run `python -m ppo_ddpm.finetune` or pass --model")
        out = export_diffusers(load_model(path, cfg.model), cfg, args.out or Path(cfg.output_dir) / "diffusers", args.force)
        print(f"[export] {path} -> {out} (DDIMPipeline.from_pretrained({str(out)!r}))")

    return run_cli("ppo_ddpm.export", argv, body, errors=(ExportError, ImportError))


if __name__ == "__main__":
    sys.exit(main())
