"""Stable Diffusion end to end: prompts in, uint8 images out, diffusers' pipeline against ddim-fused.

One random-weight pipeline (bench.sd_pipeline: SD 1.5's architecture, or --tiny) saved as
a folder; every row turns B prompts into B decoded 512x512 images (16x16 with --tiny)
with S DDIM steps, guidance 7.5, eta 0:
    a  diffusers' StableDiffusionPipeline with DDIMScheduler
    b  (a) with ddim_fused.diffusers.use_fused
    c  (a) with pipe.unet = torch.compile(unet, mode="max-autotune")
    d  ddim-fused generate's batch (ddim_fused.generate.sample_batch: sampler, VAE decode, uint8)
    e  (d) with --cuda-graph: the whole S-step loop, CFG UNet call and fused step, one graph
    f  (e) with --compile (UNet and VAE decoder; mode max-autotune-no-cudagraphs, since the
       loop's own capture holds the graph)
Every row starts from the same latents (ddim_fused.initial_noise((B, 4, h, w), seed 0)) and
its first call's images are checked against row (a)'s before it is timed; a row that fails
the check is timed but its speedups are withheld. The first call of a row also warms it up
(compilation, capture); then --repeats calls are timed (wall clock, synchronized: each ends
with the images on the host). ddim-fused rows take B new prompts per call, so they encode
text every call as a bulk run of distinct prompts does (diffusers' pipeline encodes on every
call anyway).

    python -m bench.sd [--tiny] [--rows abcdef] [--batches 1 4 16] [--steps 50] [--repeats 3]
                       [--threads N] [--out DIR]

A line per row is printed (and appended to DIR/sd.jsonl) as soon as it finishes, so a run
cut short by a time limit keeps what it measured; DIR/sd.json and sd.txt are written at the
end. Rows that need CUDA (e, f) are reported as not run on a CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ddim_fused import initial_noise

from . import sd_pipeline
from .timing import environment, sync

# row letter: (its id, what it runs)
ROWS = {
    "a": ("diffusers", "diffusers StableDiffusionPipeline + DDIMScheduler"),
    "b": ("diffusers-fused", "(a) + use_fused"),
    "c": ("diffusers-compile", "(a) + torch.compile(unet, max-autotune)"),
    "d": ("generate", "ddim-fused generate"),
    "e": ("generate-cuda-graph", "ddim-fused generate --cuda-graph"),
    "f": ("generate-cuda-graph-compile", "ddim-fused generate --cuda-graph --compile"),
}
GUIDANCE, SEED = 7.5, 0
# The first call's images against row (a)'s, in 8-bit levels: float32 must agree to rounding;
# in half precision two correct loops drift apart by a few levels over 50 steps.
CHECKS = {"exact": {"max": 1.0}, "half": {"mean": 1.0, "p99": 8.0}}


def prompts(n: int) -> list[str]:
    """n distinct prompts."""
    return [f"a photo of a cat and a dog number {i}" for i in range(n)]


class DiffusersRows:
    """Rows a, b, c: one StableDiffusionPipeline, its scheduler or UNet swapped per row."""

    def __init__(self, folder: Path, device, dtype, steps: int):
        import diffusers  # noqa: PLC0415 - optional dependency

        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        self.pipe, self.steps, self.device = pipe.to(device=device, dtype=dtype), steps, device
        self.stock_scheduler, self.unet = pipe.scheduler, pipe.unet

    @contextlib.contextmanager
    def row(self, name: str):
        """The pipeline set up as row `name` for the `with` block."""
        if name == "b":
            from ddim_fused.diffusers import use_fused  # noqa: PLC0415 - imports diffusers

            use_fused(self.pipe)
        elif name == "c":
            torch._dynamo.reset()  # a fresh compilation per batch size, static shapes
            self.pipe.unet = torch.compile(self.unet, mode="max-autotune")
        try:
            yield
        finally:
            self.pipe.scheduler, self.pipe.unet = self.stock_scheduler, self.unet

    def call(self, texts: list[str], latents: torch.Tensor) -> np.ndarray:
        """(B, H, W, 3) uint8 images, as diffusers' VaeImageProcessor rounds them."""
        images = self.pipe(texts, num_inference_steps=self.steps, guidance_scale=GUIDANCE, eta=0.0,
                           latents=latents.clone(), output_type="np").images
        return (images * 255).round().astype(np.uint8)


class FusedRows:
    """Rows d, e, f: the model, inputs and sampler `ddim-fused generate` builds, one batch per call."""

    def __init__(self, folder: Path, device, dtype, steps: int, texts: list[str], compile_mode=None):
        from ddim_fused.generate import GenerateConfig  # noqa: PLC0415
        from ddim_fused.models import load_model_source, optimize  # noqa: PLC0415
        from ddim_fused.prompts import PromptConditioning  # noqa: PLC0415

        loaded = load_model_source(str(folder), device=device, dtype=dtype)
        if compile_mode is not None:
            torch._dynamo.reset()
            optimize(loaded, compile=True, compile_mode=compile_mode)
        self.inputs = PromptConditioning(loaded, texts, guidance=GUIDANCE, num=len(texts))
        self.sampler = self.inputs.sampler(steps, None, 0.0, seed=SEED)
        self.config = GenerateConfig(num=len(texts), shard_size=len(texts), steps=steps, guidance=GUIDANCE,
                                     discretize=loaded.discretize, classes=None, seed=SEED,
                                     dtype=str(dtype).removeprefix("torch."), device=str(device))

    def call(self, first: int, batch: int, cuda_graph: bool) -> np.ndarray:
        """Samples first..first+batch-1 as generate stores them: (B, H, W, 3) uint8."""
        import dataclasses  # noqa: PLC0415

        from ddim_fused.generate import sample_batch  # noqa: PLC0415

        config = dataclasses.replace(self.config, batch_size=batch, cuda_graph=cuda_graph)
        with torch.inference_mode():
            return sample_batch(self.inputs, self.sampler, config, first, first + batch)


def compare(images: np.ndarray, reference: np.ndarray, precision: str) -> dict:
    """Differences of uint8 images from row (a)'s, in 8-bit levels, and whether they pass CHECKS[precision]."""
    diff = np.abs(images.astype(np.int32) - reference.astype(np.int32))
    stats = {"max": float(diff.max()), "mean": float(diff.mean()), "p99": float(np.percentile(diff, 99))}
    stats["passed"] = all(stats[k] <= limit for k, limit in CHECKS[precision].items())
    return stats


def time_calls(fn, repeats: int, device) -> dict:
    """Wall seconds of `repeats` calls fn(r), r = 1..repeats (each synchronized), p20/p50/p80."""
    times = []
    for r in range(1, repeats + 1):
        sync(device)
        start = time.perf_counter()
        fn(r)
        sync(device)
        times.append(time.perf_counter() - start)
    q = np.quantile(times, (0.2, 0.5, 0.8))
    return {"seconds": times, "p20": float(q[0]), "p50": float(statistics.median(times)), "p80": float(q[2])}


def run(folder: Path, rows: str, batches: list[int], steps: int, repeats: int, device, dtype, log) -> list[dict]:
    """Every row at every batch size; log(row dict) as each finishes."""
    texts = prompts(max(batches) * (1 + repeats))
    precision = "exact" if dtype == torch.float32 else "half"
    diffusers_rows = DiffusersRows(folder, device, dtype, steps)
    fused = {}
    out = []
    latent_size = diffusers_rows.pipe.unet.config.sample_size
    for batch in batches:
        latents = initial_noise((batch, 4, latent_size, latent_size), SEED, device=device, dtype=dtype)
        reference = None
        for name in rows:
            row = {"row": name, "id": ROWS[name][0], "what": ROWS[name][1], "batch": batch, "steps": steps}
            if name in "ef" and device.type != "cuda":
                row["skipped"] = "needs CUDA (a CUDA graph)"
                out.append(row)
                log(row)
                continue
            try:
                if name in "abc":
                    with diffusers_rows.row(name):
                        first = diffusers_rows.call(texts[:batch], latents)
                        timing = time_calls(lambda r: diffusers_rows.call(texts[:batch], latents), repeats, device)
                else:
                    key = "f" if name == "f" else "d"
                    if key not in fused:
                        fused[key] = FusedRows(folder, device, dtype, steps, texts,
                                               "max-autotune-no-cudagraphs" if key == "f" else None)
                    model, graph = fused[key], name in "ef"
                    first = model.call(0, batch, graph)
                    timing = time_calls(lambda r: model.call(r * batch, batch, graph), repeats, device)
            except Exception as exc:  # noqa: BLE001 - a failed row is recorded, the others still run
                row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                out.append(row)
                log(row)
                continue
            if name == "a":
                reference = first
            if reference is not None:
                row["check"] = compare(first, reference, precision)
            row.update(timing)
            row["s_per_image"] = timing["p50"] / batch
            row["images_per_s"] = batch / timing["p50"]
            row["ms_per_step"] = 1000 * timing["p50"] / steps
            out.append(row)
            log(row)
    return out


def speedups(rows: list[dict]) -> list[dict]:
    """Each row against (a) and (c) of its batch size, where both ran; withheld unless both passed the check."""
    def timed(letter, batch):
        return next((r for r in rows if r["row"] == letter and r["batch"] == batch and "p50" in r), None)

    out = []
    for row in rows:
        if "p50" not in row:
            continue
        for base_letter in ("a", "c"):
            base = timed(base_letter, row["batch"])
            if base is None or base is row:
                continue
            entry = {"row": row["row"], "id": row["id"], "batch": row["batch"], "vs": base_letter}
            if all(r.get("check", {}).get("passed", False) for r in (row, base)):
                entry["speedup"] = base["p50"] / row["p50"]
            else:
                entry["withheld"] = "a row failed its check against (a)"
            out.append(entry)
    return out


def row_line(row: dict) -> str:
    head = f"({row['row']}) B={row['batch']:<3} {row['what']:<50}"
    if "skipped" in row:
        return f"{head} not run: {row['skipped']}"
    if "error" in row:
        return f"{head} failed: {row['error']}"
    check = row.get("check")
    verdict = "" if check is None else (f"  vs (a): max {check['max']:.0f} mean {check['mean']:.2f} p99 "
                                        f"{check['p99']:.0f} levels {'ok' if check['passed'] else 'FAILED'}")
    return (f"{head} {row['s_per_image']:.4f} s/image  {row['ms_per_step']:.2f} ms/step  "
            f"(p20 {row['p20']:.4f} p80 {row['p80']:.4f} s/call){verdict}")


def summary(rows: list[dict], env: dict, settings: dict) -> str:
    lines = [f"bench.sd: {settings['config']} pipeline, {settings['steps']} steps, guidance {GUIDANCE}, "
             f"{settings['dtype']}, {env['device_name']}, torch {env['torch']}, commit {env['commit']}",
             *map(row_line, rows), "speedups (p50 of the baseline over p50 of the row):"]
    for s in speedups(rows):
        value = f"{s['speedup']:.2f}x" if "speedup" in s else f"withheld ({s['withheld']})"
        lines.append(f"  ({s['row']}) vs ({s['vs']}) at B={s['batch']}: {value}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """Build the pipeline, run the rows, print and write the results."""
    parser = argparse.ArgumentParser(prog="python -m bench.sd", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny configuration (CPU: ratios only)")
    parser.add_argument("--rows", default="abcdef", help="rows to run, e.g. abde (default abcdef)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default 1 4 16)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per row after the first (default 3)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                        help="default float16 on CUDA, float32 on the CPU")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/<dev>-sd-<date>)")
    args = parser.parse_args(argv)
    if not args.rows or set(args.rows) - set(ROWS):
        parser.error(f"--rows must be letters of {''.join(ROWS)}, got {args.rows!r}")
    if args.steps < 1 or args.repeats < 1 or (args.batches and min(args.batches) < 1):
        parser.error("--steps, --repeats and --batches must be >= 1")
    if args.threads < 0:
        parser.error("--threads must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    config = "tiny" if args.tiny else "sd15"
    env = environment(device)
    out = args.out or Path(__file__).resolve().parent / "results" / f"{device.type}-sd-{env['date'][:10]}"
    out.mkdir(parents=True, exist_ok=True)
    settings = {"config": config, "steps": args.steps, "dtype": str(dtype).removeprefix("torch."),
                "batches": args.batches or [1, 4, 16], "repeats": args.repeats, "guidance": GUIDANCE, "eta": 0.0}
    jsonl = out / "sd.jsonl"

    def log(row: dict) -> None:
        print(row_line(row), flush=True)
        with open(jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps({**row, "settings": settings}) + "\n")

    missing = [name for name in ("diffusers", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        print(f"bench.sd: error: needs diffusers and transformers ({', '.join(missing)} not installed)", file=sys.stderr)
        return 2
    print(f"building a random {config} pipeline ...", flush=True)
    with _quiet(), tempfile.TemporaryDirectory() as tmp:
        folder = _build(Path(tmp), config, device, dtype)
        rows = run(folder, args.rows, settings["batches"], args.steps, args.repeats, device, dtype, log)
    text = summary(rows, env, settings)
    print(text, end="")
    (out / "sd.json").write_text(json.dumps({"environment": env, "settings": settings, "rows": rows,
                                             "speedups": speedups(rows)}, indent=2) + "\n")
    (out / "sd.txt").write_text(text)
    return 0


@contextlib.contextmanager
def _quiet():
    """diffusers' and transformers' loading progress bars and notes off in the block (the rows are the output)."""
    from diffusers.utils import logging as diffusers_logging  # noqa: PLC0415 - optional dependencies
    from transformers.utils import logging as transformers_logging  # noqa: PLC0415

    libraries = (diffusers_logging, transformers_logging)
    before = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libraries]
    for lib in libraries:
        lib.disable_progress_bar()
        lib.set_verbosity_error()
    try:
        yield
    finally:
        for lib, (verbosity, bar) in zip(libraries, before):
            lib.set_verbosity(verbosity)
            if bar:
                lib.enable_progress_bar()


def _build(root: Path, config: str, device, dtype) -> Path:
    """The random pipeline folder (weights saved in dtype); built on `device`, where random init is fast."""
    tokenizer = sd_pipeline.write_tokenizer(root / "tokenizer")
    with torch.device(device):
        parts = sd_pipeline.components(tokenizer, config)
    return sd_pipeline.save_pipeline(root / "pipe", parts, sd_pipeline.scheduler(1), dtype=dtype)


if __name__ == "__main__":
    sys.exit(main())
