"""PNG plots of an expert-statistics report (matplotlib, Agg backend: no display needed).

load_heatmap.png              layers x experts, load_fraction (share of processed tokens)
coactivation_layer_{i}.png    [E, E] co-activation counts of MoE layer i, normalised by
                              the layer's token count (diagonal = tokens_per_expert / T)
max_activation.png            max |down-projection output| per expert and layer, log
                              scale; super experts marked
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moejax.training.paths import as_path  # noqa: E402


def _save(fig, path: str) -> str:
  """PNG to `path` (a local path or a URI, through etils.epath)."""
  fig.tight_layout()
  with as_path(path).open("wb") as f:
    fig.savefig(f, dpi=100, format="png")
  plt.close(fig)
  return path


def load_heatmap(report: dict, path: str) -> str:
  layers = sorted(report["layers"], key=int)
  load = np.array([report["layers"][i]["load_fraction"] for i in layers])  # [layers, E]
  fig, ax = plt.subplots(
    figsize=(max(4.5, 1.5 + 0.4 * load.shape[1]), max(2.5, 1.2 + 0.4 * len(layers)))
  )
  im = ax.imshow(load, aspect="auto", cmap="viridis", vmin=0.0)
  ax.set_xlabel("expert")
  ax.set_ylabel("layer")
  ax.set_yticks(range(len(layers)), layers)
  ax.set_title("expert load (share of processed tokens)")
  ax.set_xticks(range(load.shape[1]))
  fig.colorbar(im, ax=ax)
  return _save(fig, path)


def coactivation_plot(layer: dict, title: str, path: str) -> str:
  co = np.asarray(layer["coactivation"]) / max(layer["tokens"], 1.0)
  size = max(3.5, 1.5 + 0.35 * co.shape[0])
  fig, ax = plt.subplots(figsize=(size + 1.0, size))
  im = ax.imshow(co, cmap="magma", vmin=0.0)
  ax.set_xlabel("expert j")
  ax.set_ylabel("expert i")
  ax.set_title(title)
  fig.colorbar(im, ax=ax, label="tokens routed to both / tokens")
  return _save(fig, path)


def max_activation_plot(report: dict, path: str) -> str:
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for i in sorted(report["layers"], key=int):
    layer = report["layers"][i]
    m = np.asarray(layer["max_abs_activation"])
    (line,) = ax.plot(np.arange(len(m)), np.maximum(m, 1e-12), "o-", label=f"layer {i}")
    for e in layer["super_experts"]:
      ax.plot([e], [m[e]], "*", markersize=14, color=line.get_color())
  ax.set_yscale("log")
  ax.xaxis.get_major_locator().set_params(integer=True)
  ax.set_xlabel("expert")
  ax.set_ylabel("max |down_proj output|")
  ax.set_title("expert output maxima (* = super expert)")
  ax.legend(fontsize="small")
  return _save(fig, path)


def write_plots(report: dict, out_dir: str) -> list[str]:
  """Writes every plot of `report` into `out_dir`; returns the file paths."""
  out = as_path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  files = [
    load_heatmap(report, str(out / "load_heatmap.png")),
    max_activation_plot(report, str(out / "max_activation.png")),
  ]
  for i, layer in sorted(report["layers"].items(), key=lambda kv: int(kv[0])):
    files.append(
      coactivation_plot(
        layer,
        f"layer {i}: expert co-activation",
        str(out / f"coactivation_layer_{i}.png"),
      )
    )
  return files
