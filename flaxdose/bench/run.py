"""Throughput benchmark: flaxdose (JAX) against the PyTorch baseline, same model and step.

Every measurement is one *row*: framework, variant, task (`train`, `infer`, `train_e2e`),
batch, shape, the median synchronized step time of `steps` steps after `warmup` steps, and
the compile/warm-up time apart from it. `train` and `infer` use data resident on the
device; `train_e2e` feeds the same flax train step from the real grain pipeline (phantom
cases written to a temporary dataset) through a device prefetch queue. See
docs/performance.md for the method and the numbers.

jax, and every flaxdose module that imports it, is imported inside the functions that need it:
`--xla_flags` must reach XLA_FLAGS before jax loads (`flaxdose.bench.__main__`).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import datetime
import importlib.metadata as md
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from flaxdose import provenance
from flaxdose.errors import FlaxdoseError

FRAMEWORKS = ("flax", "torch")
DTYPES = {"float32": "float32", "fp32": "float32", "f32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}
TORCH_VARIANTS = ("eager_fp32", "eager_bf16", "eager_bf16_cl", "compile_bf16")
FLAX_STEPS = ("jit", "pmap")
TASKS = ("train", "infer", "e2e")

# Per model preset: training patch, full volume for inference and the grain phantom, default batch.
PRESET_SHAPES = {
    "paper": dict(patch=(96, 96, 48), volume=(120, 120, 64), batch=(8,)),
    "small": dict(patch=(32, 32, 16), volume=(64, 64, 32), batch=(4,)),
    "tiny": dict(patch=(16, 16, 8), volume=(24, 24, 16), batch=(2,)),
}


@dataclasses.dataclass
class BenchOptions:
    """What to measure; the fields mirror the `python -m flaxdose.bench` flags.

    `batches`, `patch` and `volume` (X, Y, Z voxels) default to the preset's `PRESET_SHAPES`;
    `dtypes` accepts the aliases of `DTYPES` and is stored as "float32"/"bfloat16". Raises
    FlaxdoseError for an unknown preset or choice, a batch/steps < 1, warmup < 0, or a patch that
    does not fit in the volume.
    """

    preset: str = "tiny"
    batches: tuple[int, ...] | None = None  # None: the preset's default
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    frameworks: tuple[str, ...] = FRAMEWORKS
    tasks: tuple[str, ...] = TASKS
    torch_variants: tuple[str, ...] = TORCH_VARIANTS
    steps: int = 20
    warmup: int = 3
    patch: tuple[int, int, int] | None = None
    volume: tuple[int, int, int] | None = None
    norm_order: str | None = None  # None: the preset's
    learning_rate: float = 1e-4
    seed: int = 0
    # flax levers
    flax_step: tuple[str, ...] = ("jit",)
    donate: bool = True
    groupnorm: str = "flax"
    convs: tuple[str, ...] = ("auto",)  # 3x3x3 convolution forms (flaxdose.convolution), each measured
    optimizer: str = "adam"
    xla_flags: str = "default"
    prefetch: int = 2
    workers: int = 0
    e2e_cases: int = 4
    # torch levers
    torch_compile_mode: str = "default"
    tag: str = ""

    def __post_init__(self):
        from flaxdose.bench.levers import GROUPNORM_VARIANTS, OPTIMIZERS, xla_flags_for
        from flaxdose.convolution import CONV_FORMS
        from flaxdose.model import PRESETS

        if self.preset not in PRESETS or self.preset not in PRESET_SHAPES:
            raise FlaxdoseError(f"unknown --preset {self.preset!r}; choose one of {sorted(PRESET_SHAPES)}")
        shapes = PRESET_SHAPES[self.preset]
        self.batches = tuple(int(b) for b in (self.batches or shapes["batch"]))
        self.patch = tuple(int(n) for n in (self.patch or shapes["patch"]))
        self.volume = tuple(int(n) for n in (self.volume or shapes["volume"]))
        self.dtypes = tuple(_check_choice(DTYPES, d, "--dtypes", DTYPES[d] if d in DTYPES else d) for d in self.dtypes)
        for name, values, allowed in [
            ("--frameworks", self.frameworks, FRAMEWORKS),
            ("--tasks", self.tasks, TASKS),
            ("--torch_variants", self.torch_variants, TORCH_VARIANTS),
            ("--flax_step", self.flax_step, FLAX_STEPS),
        ]:
            for v in values:
                _check_choice(allowed, v, name)
        _check_choice(GROUPNORM_VARIANTS, self.groupnorm, "--groupnorm")
        for form in self.convs:
            _check_choice(CONV_FORMS, form, "--conv")
        _check_choice(OPTIMIZERS, self.optimizer, "--optimizer")
        xla_flags_for(self.xla_flags)
        if any(b < 1 for b in self.batches) or self.steps < 1 or self.warmup < 0:
            raise FlaxdoseError("--batch values and --steps must be >= 1 and --warmup >= 0")
        if len(self.patch) != 3 or len(self.volume) != 3 or min(self.patch + self.volume) < 1:
            raise FlaxdoseError("--patch and --volume take three positive sizes, e.g. 96,96,48")
        if any(p > v for p, v in zip(self.patch, self.volume)):
            raise FlaxdoseError(f"--patch {self.patch} must fit in --volume {self.volume} (the grain phantom grid)")


def _check_choice(allowed, value, flag, result=None):
    if value not in allowed:
        raise FlaxdoseError(f"unknown {flag} value {value!r}; choose from {sorted(set(allowed))}")
    return value if result is None else result


# ---------------------------------------------------------------- timing helpers
def summarize(times_s: Sequence[float]) -> dict:
    """Step times (s) -> {"ms_per_step" (median), "ms_p10", "ms_p90" (nearest rank), "steps"}, in ms."""
    ms = sorted(t * 1e3 for t in times_s)
    q = lambda f: ms[min(len(ms) - 1, int(round(f * (len(ms) - 1))))]  # noqa: E731
    return {"ms_per_step": statistics.median(ms), "ms_p10": q(0.1), "ms_p90": q(0.9), "steps": len(ms)}


def make_row(framework, variant, task, dtype, batch, shape, timing, **extra) -> dict:
    """One result row: the identifying fields, `timing` (from `summarize`), throughput and `extra`.

    shape: (X, Y, Z) voxels of one patch or volume; patches_per_s = batch / step time,
    voxels_per_s = batch x X x Y x Z / step time.
    """
    voxels = batch * math.prod(shape)
    ms = timing["ms_per_step"]
    return {
        "framework": framework,
        "variant": variant,
        "task": task,
        "dtype": dtype,
        "batch": batch,
        "shape": list(shape),
        **timing,
        "patches_per_s": batch * 1e3 / ms,
        "voxels_per_s": voxels * 1e3 / ms,
        **extra,
    }


# ---------------------------------------------------------------- flax
def flax_device_info() -> dict:
    """{"platform", "device_kind", "device_count"} of JAX's first device (the one measured)."""
    import jax

    dev = jax.devices()[0]
    return {"platform": dev.platform, "device_kind": dev.device_kind, "device_count": jax.device_count()}


def _jax_peak_bytes():
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without stats
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _compiled_bytes(compiled):
    try:
        m = compiled.memory_analysis()
        return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)
    except Exception:  # noqa: BLE001
        return None


def _random_batch(rng: np.random.Generator, batch: int, shape, channels: int) -> dict:
    return {
        "inputs": (rng.random((batch, *shape, channels)) < 0.3).astype(np.uint8),
        "target": rng.random((batch, *shape), dtype=np.float32),
    }


def _timed_loop(run, state, batches, warmup, steps, block):
    """Warm-up, then `steps` synchronized steps (median), then `steps` unsynchronized (pipelined)."""
    for i in range(warmup):
        state, out = run(state, batches[i % len(batches)])
        block(out)
    times = []
    for i in range(steps):
        t = time.perf_counter()
        state, out = run(state, batches[i % len(batches)])
        block(out)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    for i in range(steps):
        state, out = run(state, batches[i % len(batches)])
    block(out)
    pipelined = (time.perf_counter() - t) / steps
    return state, times, pipelined


def bench_flax(opts: BenchOptions, emit: Callable[[dict], None]) -> None:
    """Measure flaxdose on one device: `emit` one row per (dtype, batch, step kind) and task.

    train: the trainer's step on random (N, X, Y, Z, C) uint8 masks and (N, X, Y, Z) float32
    targets at `opts.patch`; infer: the jitted forward pass on one (1, *opts.volume, C) volume;
    e2e: the same train step fed by the grain pipeline from phantom cases written to a
    temporary folder (removed afterwards).
    """
    tmp_root = Path(tempfile.mkdtemp(prefix="flaxdose_bench_"))
    try:
        _bench_flax(opts, emit, tmp_root)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


def _bench_flax(opts: BenchOptions, emit: Callable[[dict], None], tmp_root: Path) -> None:
    import jax
    import jax.numpy as jnp

    from flaxdose import inference
    from flaxdose.bench.levers import make_optimizer, with_groupnorm
    from flaxdose.convolution import resolve_form
    from flaxdose.model import count_params, init_params, preset
    from flaxdose.training import trainer
    from flaxdose.training.devices import AXIS, replicate, shard_to_devices

    devices = jax.devices()[:1]
    block = jax.block_until_ready
    rng = np.random.default_rng(opts.seed)
    base_levers = dict(
        donate=opts.donate, groupnorm=opts.groupnorm, optimizer=opts.optimizer, xla_flags=opts.xla_flags
    )
    fresh = lambda tree: jax.tree.map(lambda a: jnp.array(a, copy=True), tree)  # noqa: E731 - donation-safe copy
    for dtype, conv in itertools.product(opts.dtypes, opts.convs):
        form = resolve_form(conv)
        levers = {**base_levers, "conv": form}
        tag = "" if len(opts.convs) == 1 else f"_{form}"  # variant names stay short when one form is measured
        spec = preset(opts.preset, dtype=dtype, conv=form, **({"norm_order": opts.norm_order} if opts.norm_order else {}))
        params = jax.jit(init_params, static_argnums=0)(spec, jax.random.key(opts.seed))
        n_params = count_params(params)
        tx = make_optimizer(opts.optimizer, opts.learning_rate)
        for batch in opts.batches if "train" in opts.tasks or "e2e" in opts.tasks else ():
            host_batches = [_random_batch(rng, batch, opts.patch, spec.in_channels) for _ in range(2)]
            for kind in opts.flax_step:
                if kind == "jit":
                    step = with_groupnorm(trainer.make_train_step(spec, tx), opts.groupnorm)
                    fn = jax.jit(step, donate_argnums=(0,) if opts.donate else ())
                    put = lambda b: jax.device_put(b, devices[0])  # noqa: E731
                    state = put(trainer.TrainState(jnp.asarray(0), fresh(params), tx.init(params)))
                else:
                    step = with_groupnorm(trainer.make_train_step(spec, tx, AXIS), opts.groupnorm)
                    fn = jax.pmap(step, axis_name=AXIS, donate_argnums=(0,) if opts.donate else ())
                    put = lambda b: shard_to_devices(b, devices)  # noqa: E731
                    state = replicate(trainer.TrainState(np.asarray(0), fresh(params), tx.init(params)), devices)
                dev_batches = [put(b) for b in host_batches]
                t = time.perf_counter()
                compiled = fn.lower(state, dev_batches[0]).compile()
                compile_s = time.perf_counter() - t
                t = time.perf_counter()
                state, times, pipelined = _timed_loop(compiled, state, dev_batches, opts.warmup, opts.steps, block)
                common = dict(
                    compile_s=compile_s,
                    warmup_s=None,
                    peak_mem_bytes=_jax_peak_bytes(),
                    compiled_mem_bytes=_compiled_bytes(compiled),
                    params=n_params,
                    pipelined_ms_per_step=pipelined * 1e3,
                    levers=levers,
                )
                if "train" in opts.tasks:
                    emit(make_row("flax", f"{kind}_{_short(dtype)}{tag}", "train", dtype, batch, opts.patch, summarize(times), **common))
                if "e2e" in opts.tasks:
                    e2e_s = _flax_e2e(opts, spec, compiled, state, put, batch, tmp_root)
                    ratio = pipelined / e2e_s
                    row = make_row(
                        "flax", f"{kind}_{_short(dtype)}{tag}", "train_e2e", dtype, batch, opts.patch,
                        {"ms_per_step": e2e_s * 1e3, "ms_p10": None, "ms_p90": None, "steps": opts.steps},
                        **{**common, "e2e_fraction_of_resident": ratio, "workers": opts.workers, "prefetch": opts.prefetch},
                    )
                    emit(row)
                del state, dev_batches, compiled
        if "infer" in opts.tasks:
            infer_form = resolve_form(conv, inference=True)  # "auto" predicts with the fastest forward-only form
            infer_spec = dataclasses.replace(spec, conv=infer_form)
            infer_tag = "" if len(opts.convs) == 1 else f"_{infer_form}"
            predict = jax.jit(with_groupnorm(inference.make_predict_fn(infer_spec), opts.groupnorm))
            x = jax.device_put(_random_batch(rng, 1, opts.volume, spec.in_channels)["inputs"], devices[0])
            p = jax.device_put(params, devices[0])
            t = time.perf_counter()
            compiled = predict.lower(p, x).compile()
            compile_s = time.perf_counter() - t
            run = lambda s, b: (s, compiled(p, b))  # noqa: E731
            _, times, pipelined = _timed_loop(run, None, [x], opts.warmup, opts.steps, block)
            emit(make_row(
                "flax", f"jit_{_short(dtype)}{infer_tag}", "infer", dtype, 1, opts.volume, summarize(times),
                compile_s=compile_s, warmup_s=None, peak_mem_bytes=_jax_peak_bytes(),
                compiled_mem_bytes=_compiled_bytes(compiled), params=n_params,
                pipelined_ms_per_step=pipelined * 1e3, levers={**levers, "conv": infer_form},
            ))


def _short(dtype: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16"}[dtype]


def _phantom_dataset(opts, root: Path):
    """Write (once per run) the phantom dataset the end-to-end number reads through grain."""
    from flaxdose.data import write_dataset
    from flaxdose.synthetic.phantom import phantom_cases

    path = root / "data"
    if not path.is_dir():
        cases = phantom_cases(opts.seed, opts.e2e_cases, shape=opts.volume)
        write_dataset(path, cases, {"train": [c.case_id for c in cases]})
    return path


def _flax_e2e(opts, spec, compiled, state, put, batch, root: Path) -> float:
    """Seconds per step feeding `compiled` from the grain pipeline through a device prefetch queue."""
    import jax

    from flaxdose.data import PROSTATE_STRUCTURES, Dataset, pipeline

    dataset = Dataset.open(_phantom_dataset(opts, root))
    source = pipeline.CaseSource(dataset, dataset.split("train"), PROSTATE_STRUCTURES)
    ds = pipeline.patch_dataset(
        source, patch_shape=opts.patch, sigma=tuple(p / 8 for p in opts.patch), batch_size=batch,
        seed=opts.seed, structures=PROSTATE_STRUCTURES, flip_lr=True,
    )
    iterator = pipeline.make_iterator(ds, workers=opts.workers)
    queue = collections.deque()

    def next_batch():
        while len(queue) < max(1, opts.prefetch):
            queue.append(put(next(iterator)))
        return queue.popleft()

    try:
        for _ in range(max(1, opts.warmup)):  # fills the source cache and the queues
            state, out = compiled(state, next_batch())
        jax.block_until_ready(out)
        t = time.perf_counter()
        for _ in range(opts.steps):
            state, out = compiled(state, next_batch())
        jax.block_until_ready(out)
        return (time.perf_counter() - t) / opts.steps
    finally:
        close = getattr(iterator, "close", None)
        if close:
            close()


# ---------------------------------------------------------------- torch
def torch_device_info() -> dict:
    """{"device" ("cuda" or "cpu"), "device_kind", "threads"} of the device PyTorch runs on.

    Raises FlaxdoseError when torch is not installed.
    """
    from flaxdose.bench.torch_unet import require_torch

    torch = require_torch()
    if torch.cuda.is_available():
        return {"device": "cuda", "device_kind": torch.cuda.get_device_name(0), "threads": torch.get_num_threads()}
    return {"device": "cpu", "device_kind": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


def bench_torch(opts: BenchOptions, emit: Callable[[dict], None]) -> None:
    """Measure the PyTorch baseline (`TorchUNet3D`, same initial weights as flaxdose): one row per variant and task.

    Variants: eager fp32, eager bf16 autocast, the same channels-last, and torch.compile bf16
    channels-last; a variant whose dtype is not in `opts.dtypes` is skipped. train: Adam + MSE
    on random (N, C, X, Y, Z) inputs at `opts.patch`; infer: one (1, C, *opts.volume) volume.
    Raises FlaxdoseError when torch is not installed.
    """
    import jax

    from flaxdose.bench.torch_unet import (
        count_torch_params,
        require_torch,
        torch_model_from_flax,
    )
    from flaxdose.model import init_params, preset

    torch = require_torch()
    import torch.nn.functional as F

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    spec = preset(opts.preset, **({"norm_order": opts.norm_order} if opts.norm_order else {}))
    params = jax.jit(init_params, static_argnums=0)(spec, jax.random.key(opts.seed))  # the same initial weights as flax
    rng = np.random.default_rng(opts.seed)

    def peak():
        return int(torch.cuda.max_memory_allocated()) if cuda else None

    for variant in opts.torch_variants:
        bf16 = variant.endswith("bf16") or variant.endswith("bf16_cl")
        channels_last = variant.endswith("_cl") or variant.startswith("compile")
        dtype = "bfloat16" if bf16 else "float32"
        if dtype not in opts.dtypes:
            continue
        fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
        amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

        def to_torch(b):
            x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(b["inputs"], -1, 1))).to(device)
            out = {"inputs": x.contiguous(memory_format=fmt)}
            if "target" in b:
                out["target"] = torch.from_numpy(b["target"]).to(device)
            return out

        base = torch_model_from_flax(spec, params).to(device).to(memory_format=fmt)
        n_params = count_torch_params(base)
        if "train" in opts.tasks:
            for batch in opts.batches:
                model = torch_model_from_flax(spec, params).to(device).to(memory_format=fmt).train()
                net = torch.compile(model, mode=opts.torch_compile_mode) if variant.startswith("compile") else model
                opt = torch.optim.Adam(model.parameters(), lr=opts.learning_rate, **({"fused": True} if cuda else {}))
                batches = [to_torch(_random_batch(rng, batch, opts.patch, spec.in_channels)) for _ in range(2)]

                def step(state, b):
                    opt.zero_grad(set_to_none=True)
                    with amp():
                        pred = net(b["inputs"].float())
                    loss = F.mse_loss(pred.float(), b["target"])
                    loss.backward()
                    opt.step()
                    return state, loss

                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                t = time.perf_counter()
                step(None, batches[0])
                sync()
                first_s = time.perf_counter() - t
                _, times, pipelined = _timed_loop(step, None, batches, opts.warmup, opts.steps, lambda _: sync())
                emit(make_row(
                    "torch", variant, "train", dtype, batch, opts.patch, summarize(times),
                    compile_s=first_s if variant.startswith("compile") else None, warmup_s=first_s,
                    peak_mem_bytes=peak(), compiled_mem_bytes=None, params=n_params,
                    pipelined_ms_per_step=pipelined * 1e3, levers={"compile_mode": opts.torch_compile_mode} if variant.startswith("compile") else {},
                ))
                del model, net, opt, batches
        if "infer" in opts.tasks:
            model = base.eval()
            net = torch.compile(model, mode=opts.torch_compile_mode) if variant.startswith("compile") else model
            x = to_torch(_random_batch(rng, 1, opts.volume, spec.in_channels))["inputs"]

            def infer(state, b):
                with torch.inference_mode(), amp():
                    return state, net(b.float())

            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            infer(None, x)
            sync()
            first_s = time.perf_counter() - t
            _, times, pipelined = _timed_loop(infer, None, [x], opts.warmup, opts.steps, lambda _: sync())
            emit(make_row(
                "torch", variant, "infer", dtype, 1, opts.volume, summarize(times),
                compile_s=first_s if variant.startswith("compile") else None, warmup_s=first_s,
                peak_mem_bytes=peak(), compiled_mem_bytes=None, params=n_params,
                pipelined_ms_per_step=pipelined * 1e3, levers={},
            ))
        del base


# ---------------------------------------------------------------- report
def environment() -> dict:
    """Where the numbers come from: UTC date, git commit, host CPUs, machine, package versions, XLA_FLAGS."""
    versions = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "optax", "grain", "numpy", "torch"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": provenance.commit(),
        "host_cpus": os.cpu_count(),
        "machine": platform.machine(),
        "versions": versions,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def ratios(rows: Sequence[dict]) -> list[dict]:
    """flaxdose / PyTorch throughput ratios (> 1: flaxdose faster), per task and batch.

    `best`: the fastest flax row against the fastest torch row; `bf16`: fastest flax bf16
    against the fastest torch bf16 variant; `fp32`: flax fp32 against torch eager fp32.
    """
    out = []
    keyed = collections.defaultdict(list)
    for r in rows:
        if r["task"] in ("train", "infer"):
            keyed[(r["task"], r["batch"], tuple(r["shape"]))].append(r)
    for (task, batch, shape), group in sorted(keyed.items()):
        for label, flt in [("best", lambda r: True), ("bf16", lambda r: r["dtype"] == "bfloat16"), ("fp32", lambda r: r["dtype"] == "float32")]:
            f = [r for r in group if r["framework"] == "flax" and flt(r)]
            t = [r for r in group if r["framework"] == "torch" and flt(r)]
            if f and t:
                fb, tb = min(f, key=lambda r: r["ms_per_step"]), min(t, key=lambda r: r["ms_per_step"])
                out.append({
                    "task": task, "batch": batch, "shape": list(shape), "compare": label,
                    "flax": fb["variant"], "torch": tb["variant"],
                    "flax_ms": fb["ms_per_step"], "torch_ms": tb["ms_per_step"],
                    "ratio": tb["ms_per_step"] / fb["ms_per_step"],
                })
    return out


def _fmt(v, scale=1.0, digits=1):
    return "-" if v is None else f"{v * scale:.{digits}f}"


def markdown(result: dict) -> str:
    """The result (from `run_benchmark` or `merge`) as Markdown: a header line, the rows table, the ratios table
    and one sentence per end-to-end row."""
    env = result["env"]
    lines = [
        f"Benchmark: preset `{result['options']['preset']}`, device {result.get('device', {}).get('flax', {}).get('device_kind') or result.get('device', {}).get('torch', {}).get('device_kind')}, "
        f"{env['date']}, commit {env['commit']}; "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v),
        "",
        "| framework | variant | task | batch | shape | ms/step (median) | p10-p90 | patches/s | Mvoxel/s | peak MiB | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    mib = 1 / 2**20
    for r in result["rows"]:
        mem = r.get("peak_mem_bytes") or r.get("compiled_mem_bytes")
        lines.append(
            f"| {r['framework']} | {r['variant']}{' ' + r['tag'] if r.get('tag') else ''} | {r['task']} | {r['batch']} | "
            f"{'x'.join(map(str, r['shape']))} | {_fmt(r['ms_per_step'], digits=2)} | "
            f"{'-' if r['ms_p10'] is None else _fmt(r['ms_p10'], digits=1) + '-' + _fmt(r['ms_p90'], digits=1)} | {_fmt(r['patches_per_s'])} | "
            f"{_fmt(r['voxels_per_s'], 1e-6)} | {_fmt(mem, mib, 0)} | {_fmt(r.get('compile_s') or r.get('warmup_s'), digits=1)} |"
        )
    if result.get("ratios"):
        lines += ["", "| task | batch | compare | flax | torch | flax ms | torch ms | flax/torch throughput |", "|---|---|---|---|---|---|---|---|"]
        for q in result["ratios"]:
            lines.append(
                f"| {q['task']} | {q['batch']} | {q['compare']} | {q['flax']} | {q['torch']} | "
                f"{q['flax_ms']:.2f} | {q['torch_ms']:.2f} | **{q['ratio']:.2f}x** |"
            )
    e2e = [r for r in result["rows"] if r["task"] == "train_e2e"]
    for r in e2e:
        lines.append(
            f"\nEnd-to-end through grain ({r['variant']}, batch {r['batch']}, workers {r.get('workers')}, prefetch {r.get('prefetch')}): "
            f"{r['ms_per_step']:.2f} ms/step = {100 * r['e2e_fraction_of_resident']:.0f} % of the device-resident pipelined rate "
            f"({r['pipelined_ms_per_step']:.2f} ms/step)."
        )
    return "\n".join(lines) + "\n"


def print_ratios(result: dict, file=sys.stdout) -> None:
    """One line per flaxdose/PyTorch throughput ratio, then each end-to-end row's share of the resident rate."""
    for q in result.get("ratios", []):
        print(
            f"flaxdose/PyTorch {q['task']:5s} batch {q['batch']} [{q['compare']}]: {q['ratio']:.2f}x "
            f"({q['flax']} {q['flax_ms']:.2f} ms vs {q['torch']} {q['torch_ms']:.2f} ms)",
            file=file,
        )
    for r in result["rows"]:
        if r["task"] == "train_e2e":
            print(f"grain end-to-end {r['variant']} batch {r['batch']}: {100 * r['e2e_fraction_of_resident']:.0f} % of device-resident", file=file)


def keep_host_memory() -> bool:
    """Keep large host allocations in glibc's heap instead of mmap/munmap per allocation.

    Without this, PyTorch's eager CPU step maps and unmaps (and page-faults) its multi-MB
    activations every step until glibc's adaptive threshold catches up, which made CPU steps
    10-80x slower and erratic on the dev machine. Applies to both frameworks alike; no effect
    on device memory.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


def run_benchmark(opts: BenchOptions, out: str | os.PathLike | None = None, log=print) -> dict:
    """Run every requested measurement; write JSON (after each row) and Markdown beside it.

    Returns {"options", "env", "device", "rows", "errors", "ratios"}. A framework that fails
    (other than with FlaxdoseError, which propagates) is recorded in "errors" and the other
    framework's rows are kept. Raises FlaxdoseError up front when torch is requested but missing.
    """
    malloc_tuned = keep_host_memory()
    result = {"options": _jsonable(dataclasses.asdict(opts)), "env": environment(), "device": {}, "rows": [], "errors": []}
    result["env"]["host_malloc_kept"] = malloc_tuned
    out = Path(out) if out else None

    def save():
        result["ratios"] = ratios(result["rows"])
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1) + "\n")
            out.with_suffix(".md").write_text(markdown(result))

    def emit(row):
        if opts.tag:
            row["tag"] = opts.tag
        result["rows"].append(row)
        log(f"{row['framework']:5s} {row['variant']:14s} {row['task']:9s} batch {row['batch']:2d} "
            f"{row['ms_per_step']:9.2f} ms/step {row['patches_per_s']:8.1f} patches/s")
        save()

    if "torch" in opts.frameworks:
        from flaxdose.bench.torch_unet import require_torch

        require_torch()  # fail early with the install hint
    for framework in opts.frameworks:
        try:
            if framework == "flax":
                result["device"]["flax"] = flax_device_info()
                bench_flax(opts, emit)
            else:
                result["device"]["torch"] = torch_device_info()
                bench_torch(opts, emit)
        except FlaxdoseError:
            raise
        except Exception as e:  # noqa: BLE001 - keep the other framework's numbers
            result["errors"].append(f"{framework}: {type(e).__name__}: {e}")
            log(f"{framework} benchmark failed: {type(e).__name__}: {e}")
    save()
    return result


def merge(paths: Sequence[str | os.PathLike], out: str | os.PathLike | None = None) -> dict:
    """Combine result files (e.g. one process per framework or lever) into one table and ratios.

    Options and environment are the first file's. Writes `out` (JSON) and its `.md` when given.
    Raises FlaxdoseError for an unreadable file or an empty list.
    """
    results = []
    for p in paths:
        try:
            results.append(json.loads(Path(p).read_text()))
        except (OSError, ValueError) as e:
            raise FlaxdoseError(f"cannot read benchmark result {p}: {e}; pass JSON files written by --out") from None
    if not results:
        raise FlaxdoseError("--merge needs at least one JSON file")
    merged = {
        "options": results[0]["options"],
        "env": results[0]["env"],
        "device": {k: v for r in results for k, v in r.get("device", {}).items()},
        "rows": [row for r in results for row in r["rows"]],
        "errors": [e for r in results for e in r.get("errors", [])],
        "sources": [str(p) for p in paths],
    }
    merged["ratios"] = ratios(merged["rows"])
    if out:
        Path(out).write_text(json.dumps(merged, indent=1) + "\n")
        Path(out).with_suffix(".md").write_text(markdown(merged))
    return merged


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
