"""Plots (matplotlib) and TensorBoard logs: what is drawn equals the data, what is logged can be read back."""
import json
import math

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ppo_ddpm.config import load_config
from ppo_ddpm.ddpm.model import build_model, load_model, save_model
from ppo_ddpm.eval import evaluate
from ppo_ddpm.plots import figure_array, per_step_figure, reward_curve, reward_histogram, upscale
from ppo_ddpm.report import main as report_main
from ppo_ddpm.run_logger import RunLogger
from ppo_ddpm.utils.checkpoint import CheckpointError


def _events(folder):
    ea = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0, "histograms": 0, "tensors": 0})
    ea.Reload()
    return ea


def test_reward_histogram_counts_are_numpys_and_non_finite_is_left_out():
    base = np.array([0.0, 0.1, 0.1, 0.5, np.nan, np.inf])
    ft = np.array([0.2, 0.9, 1.0, -np.inf])
    fig = reward_histogram(base, ft, bins=4)
    ax = fig.axes[0]
    edges = np.linspace(0.0, 1.0, 5)
    heights = [p.get_height() for p in ax.patches]
    assert heights[:4] == np.histogram(base[np.isfinite(base)], edges)[0].tolist()
    assert heights[4:] == np.histogram(ft[np.isfinite(ft)], edges)[0].tolist()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "2 non-finite left out" in labels[0] and "1 non-finite left out" in labels[1]
    img = figure_array(fig)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    figure_array(reward_histogram([np.nan], [np.nan]))  # nothing finite: an empty plot, no crash
    figure_array(reward_histogram([1e300, -1e300], [0.0]))


def test_reward_curve_and_per_step_figure_plot_the_data():
    rows = [{"iteration": 0, "reward_mean": 1.0, "reward_std": 0.5}, {"iteration": 1, "skipped": 1.0},
            {"iteration": 2, "reward_mean": 2.0, "reward_std": 0.1}, {"iteration": 3, "reward_mean": float("nan")}]
    ax = reward_curve(rows).axes[0]
    line = ax.lines[0]
    assert line.get_xdata().tolist() == [1.0, 3.0] and line.get_ydata().tolist() == [1.0, 2.0]
    assert "1 non-finite left out" in ax.get_title()
    ax = per_step_figure([900, 500, 100], [0.1, 0.2, 0.3], "KL", "title").axes[0]
    assert ax.lines[0].get_xdata().tolist() == [900, 500, 100] and ax.xaxis_inverted()
    assert upscale(np.zeros((10, 70, 3), np.uint8), 256).shape == (40, 280, 3)
    assert upscale(np.zeros((2, 300, 3), np.uint8), 256).shape == (2, 300, 3)


def test_run_logger_writes_config_hparams_histograms_and_a_readable_grid(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}", "ppo.lr=0.001"])
    logger = RunLogger(cfg, 0, True)
    logger.log(0, {"reward_mean": 0.5, "reward_term/jpeg": -3.0})
    logger.histograms(0, torch.tensor([0.0, 1.0, float("nan"), 2.0]), torch.tensor([-1.0, 0.0, 1.0, 0.5]))
    x0 = torch.linspace(-1, 1, 16 * 3 * 16 * 16).reshape(16, 3, 16, 16)
    logger.grid(9, x0)
    logger.close()
    ea = _events(tmp_path / "tb")
    assert {"ppo/reward_mean", "ppo/reward_term/jpeg"} <= set(ea.Tags()["scalars"])
    hist = ea.Histograms("ppo/rewards")[0].histogram_value
    assert hist.num == 3 and hist.min == 0.0 and hist.max == 2.0  # NaN left out
    assert ea.Histograms("ppo/advantages")[0].histogram_value.num == 4
    logger = RunLogger(cfg, 1, True)  # rewards beyond 1e20, where TensorBoard's default buckets end, are counted
    logger.histograms(1, torch.tensor([0.0, 3e25]), torch.tensor([-1.0, 1.0]))
    logger.histograms(2, torch.tensor([4e25, 3e25]), torch.tensor([-1.0, 1.0]))  # default buckets: "histogram is empty"
    logger.close()
    for event in _events(tmp_path / "tb").Histograms("ppo/rewards")[1:]:
        assert sum(event.histogram_value.bucket) == 2 and event.histogram_value.max > 2.9e25
    image = ea.Images("samples")[0]
    assert image.width >= 256 and image.width == 4 * (4 * 17 + 1)  # 4 per row, 16 px + 1 px padding, x4
    from ppo_ddpm.quality import image_stats

    stats = image_stats(x0)  # the grid's quality curves, at the grid's iteration
    for k in ("diversity", "grain", "saturation"):
        (event,) = ea.Scalars(f"quality/{k}")
        assert event.step == 9 and event.value == pytest.approx(stats[k], rel=1e-6)
    text = ea.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "lr: 0.001" in text and "    ppo:" in text
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.HParamsPluginData.FromString(ea.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    hp = start.session_start_info.hparams
    assert hp["ppo.lr"].number_value == 0.001 and hp["model.channel_mults"].string_value == "[1, 2]"
    assert (tmp_path / "samples" / "iter_000010.png").is_file()


TINY = ["model.sample_size=8", "data.image_size=8", "model.base_channels=8", "model.channel_mults=[1]",
        "model.attention_resolutions=[]", "sampling.num_inference_steps=3", "device=cpu",
        "reward.kind=jpeg_compressibility", "eval.num_samples=4", "eval.batch_size=4", "ppo.sigma_floor=0.05"]


def test_pretraining_with_v_targets_logs_its_loss_curve(tmp_path):
    from ppo_ddpm.pretrain import pretrain

    cfg = load_config(None, TINY + [f"output_dir={tmp_path}", "pretrain.steps=4", "pretrain.log_every=2",
                                    "pretrain.batch_size=4", "data.procedural_count=8", "model.prediction_type=v_prediction"])
    path = pretrain(cfg)
    losses = [e.value for e in _events(tmp_path / "tb").Scalars("pretrain/loss")]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert load_model(path).sample_size == 8  # stored with its config ...
    cfg.model.prediction_type = "epsilon"
    with pytest.raises(CheckpointError, match="prediction_type: file 'v_prediction' vs config 'epsilon'"):
        load_model(path, cfg.model)  # ... and an epsilon config refuses a v-prediction model


def test_eval_writes_figures_report_and_tensorboard_images(tmp_path, capsys):
    cfg = load_config(None, TINY + [f"output_dir={tmp_path}"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    base = save_model(model, tmp_path / "base.pth", cfg.model)
    with torch.no_grad():
        model.conv_out.bias += 0.2
    ft = save_model(model, tmp_path / "ft.pth", cfg.model)
    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"iteration": i, "reward_mean": -1.0 + 0.1 * i, "reward_std": 0.2}) + "\n" for i in range(5)))
    result = evaluate(cfg, str(base), str(ft))
    out = tmp_path / "eval"
    for name in ("side_by_side", "reward_hist", "kl_per_step", "reward_curve", "report"):
        assert (out / f"{name}.png").stat().st_size > 0, name
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and f"{result['win_rate']:.3f}" in page
    assert "Reward over PPO iterations" in page
    ea = _events(tmp_path / "tb")
    assert {"eval/side_by_side", "eval/reward_hist", "eval/kl_per_step", "eval/reward_curve"} <= set(ea.Tags()["images"])
    assert not any("by_step" in t for t in ea.Tags()["scalars"])  # no step index on a time axis
    assert ea.Images("eval/side_by_side")[0].width >= 2 * 256
    (out / "report.html").unlink()
    assert report_main(["--set", f"output_dir={tmp_path}"]) == 0 and (out / "report.html").is_file()
    assert report_main(["--set", f"output_dir={tmp_path / 'nothing'}"]) == 2
    assert "run `python -m ppo_ddpm.eval` first" in capsys.readouterr().err
