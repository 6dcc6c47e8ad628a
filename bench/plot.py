"""Draw a run's PNG from its results.json: GB/s against size per provider, and loop overhead.

Usage: python -m bench.plot RESULTS.json [OUT.png]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

COLORS = {"triton": "tab:red", "torch": "tab:blue", "labml": "tab:gray", "minimal": "tab:orange",
          "compile": "tab:green", "diffusers": "tab:purple", "fused": "tab:blue", "reference": "tab:gray",
          "fused-cudagraph": "tab:red"}


def plot(results_json, out_png) -> Path:
    """Draw the figure.

    Args:
        results_json: path of a results.json written by the runner.
        out_png: path of the PNG to write.

    Returns:
        out_png as a Path.
    """
    import matplotlib  # noqa: PLC0415 - only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    result = json.loads(Path(results_json).read_text())
    env = result["environment"]
    steps = [r for r in result["steps"] if r.get("p50_s")]
    cases = list(dict.fromkeys(r["case"] for r in steps))
    panels = [(c, "fp32") for c in cases] + [("eta0", d) for d in ("fp16", "bf16")
                                             if any(r["dtype"] == d for r in steps)]
    n = len(panels) + 1
    cols = 4
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    copy = result["copy_bandwidth"]["gbs"]
    for ax, (case, dtype) in zip(axes.flat, panels):
        sel = [r for r in steps if r["case"] == case and r["dtype"] == dtype]
        for prov in dict.fromkeys(r["provider"] for r in sel):
            pts = sorted((r["bytes"] / 1e6, r["gbs"]) for r in sel if r["provider"] == prov)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, label=prov, color=COLORS.get(prov))
        ax.axhline(copy, ls="--", color="k", lw=0.8, label="copy")
        if result.get("cache_bytes"):
            # Left of this line the traffic can live in the last-level cache.
            ax.axvline(2 * result["cache_bytes"] / 1e6, ls=":", color="k", lw=0.8, label="2x cache")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"step {case} {dtype}", fontsize=9)
        ax.set_xlabel("minimum traffic (MB)", fontsize=8)
        ax.set_ylabel("GB/s", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, which="both")
    if panels:
        axes.flat[0].legend(fontsize=7)
    _loop_panel(axes.flat[len(panels)], result["loops"])
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"ddim-fused: {env['device_name']}, torch {env['torch']}, {env['date']}, "
                 f"commit {str(env['commit'])[:10]}", fontsize=10)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _loop_panel(ax, loops):
    rows = [r for r in loops if r.get("host_overhead_us") is not None and r["model"] == "trivial"]
    if not rows:
        ax.axis("off")
        return
    loop_ids = list(dict.fromkeys(r["loop"] for r in rows))
    provs = list(dict.fromkeys(r["provider"] for r in rows))
    width = 0.8 / len(provs)
    for k, prov in enumerate(provs):
        vals = [next((r["host_overhead_us"] for r in rows if r["loop"] == lid and r["provider"] == prov), 0)
                for lid in loop_ids]
        ax.bar([i + k * width for i in range(len(loop_ids))], vals, width, label=prov, color=COLORS.get(prov))
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(loop_ids))])
    ax.set_xticklabels(loop_ids, fontsize=7, rotation=20)
    ax.set_ylabel("host overhead per step (us)", fontsize=8)
    ax.set_title("50-step loop, trivial eps-model", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    src = Path(sys.argv[1])
    print(plot(src, sys.argv[2] if len(sys.argv) == 3 else src.with_suffix(".png")))
