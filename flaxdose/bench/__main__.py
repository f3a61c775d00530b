"""`python -m flaxdose.bench` (``flaxdose-bench``): flaxdose vs PyTorch training and inference throughput.

Examples:
  python -m flaxdose.bench --preset=tiny --steps=5 --out=bench.json          # CPU smoke run
  python -m flaxdose.bench --preset=paper --batch=8 --dtypes=bf16 --out=r.json
  python -m flaxdose.bench --preset=paper --frameworks=flax --xla_flags=autotune0 --tag=autotune0 --out=l.json
  python -m flaxdose.bench --xla_flags='--xla_gpu_autotune_level=0' --out=raw.json  # raw XLA flags: write '='
  python -m flaxdose.bench --merge=a.json,b.json --out=all.json                 # one table + ratios
"""

from __future__ import annotations

import os
import sys

from absl import flags

from flaxdose import cli
from flaxdose.errors import FlaxdoseError

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined only when run as a program, so tests can import the module)."""
    flags.DEFINE_string("preset", "tiny", "model preset: paper, small or tiny (tiny: CPU smoke runs)")
    flags.DEFINE_list("batch", None, "batch sizes, comma-separated (default: the preset's: paper 8, small 4, tiny 2)")
    flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "compute dtypes: fp32,bf16")
    flags.DEFINE_integer("steps", 20, "timed steps per measurement; the median is reported")
    flags.DEFINE_integer("warmup", 3, "untimed steps after compilation")
    flags.DEFINE_list("frameworks", ["flax", "torch"], "flax,torch")
    flags.DEFINE_list("tasks", ["train", "infer", "e2e"], "train,infer,e2e")
    flags.DEFINE_list("torch_variants", None,
                      "eager_fp32,eager_bf16,eager_bf16_cl,compile_bf16 (default all; compile_bf16 only on a GPU)")
    flags.DEFINE_string("torch_compile_mode", "default", "torch.compile mode")
    flags.DEFINE_list("patch", None, "training patch X,Y,Z (default: paper 96,96,48)")
    flags.DEFINE_list("volume", None, "inference volume and grain phantom grid X,Y,Z (default: paper 120,120,64)")
    flags.DEFINE_enum("norm_order", None, ["relu_norm", "norm_relu"], "override the preset's norm order")
    flags.DEFINE_list("flax_step", ["jit"], "jit (donated state) and/or pmap on one device")
    flags.DEFINE_bool("donate", True, "lever: donate the train state buffers (--nodonate: do not)")
    flags.DEFINE_string("groupnorm", "flax", "lever: flax (nn.GroupNorm) or fused (one-pass stats, hand-written backward)")
    flags.DEFINE_list("conv", ["auto"], "lever: 3x3x3 convolution forms, each measured: auto (2d on CPU, 3d on GPU), 3d, 2d")
    flags.DEFINE_string("optimizer", "adam", "lever: adam (optax.adam) or adam_flat (optax.flatten(adam))")
    flags.DEFINE_string("xla_flags", "default", "lever: XLA flag preset (default, autotune0, cmdbuf_off, runtime_fusion, "
                        "lhs, no_triton_gemm) or raw flags, written --xla_flags='--xla_...'")
    flags.DEFINE_integer("prefetch", 2, "end-to-end: batches kept in flight on the device")
    flags.DEFINE_integer("workers", 0, "end-to-end: grain worker processes (0: threads)")
    flags.DEFINE_string("tag", "", "label stored with every row (e.g. the lever being measured)")
    flags.DEFINE_string("out", None, "write results to FILE.json and the Markdown table to FILE.md")
    flags.DEFINE_list("merge", None, "only combine earlier result files (comma-separated) into one table")


def _ints(values, flag: str) -> tuple[int, ...] | None:
    if values is None:
        return None
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise FlaxdoseError(f"--{flag} takes comma-separated integers, got {','.join(values)!r}") from None


def main(argv) -> int:
    """absl main: `--merge` combines result files, else runs `bench()`; exit status 0, or 1 if some measurements failed.

    Raises FlaxdoseError for positional arguments and for bad flag values.
    """
    if len(argv) > 1:
        raise FlaxdoseError(f"unexpected arguments {argv[1:]}; flags are written --name=value")
    if FLAGS.merge:
        from flaxdose.bench.run import markdown, merge, print_ratios

        result = merge(FLAGS.merge, FLAGS.out)
        print(markdown(result))
        print_ratios(result)
        return 0
    return bench()


def bench() -> int:
    """Run the benchmark the flags describe; 1 if some measurements failed (listed), else 0."""
    from flaxdose.bench.levers import xla_flags_for

    xla_flags = xla_flags_for(FLAGS.xla_flags)
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():  # flags act only before the backend starts
        if xla_flags:
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags).strip()
        if "torch" in FLAGS.frameworks:
            # The torch run uses JAX too (flaxdose's initial weights); JAX would otherwise take
            # 75 % of GPU memory up front and starve PyTorch.
            os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    elif xla_flags:
        print(f"warning: JAX already started; --xla_flags={FLAGS.xla_flags} not applied", file=sys.stderr)

    from flaxdose.bench.run import TORCH_VARIANTS, BenchOptions, markdown, print_ratios, run_benchmark

    variants = FLAGS.torch_variants
    if variants is None:
        variants = TORCH_VARIANTS
        if "torch" in FLAGS.frameworks:
            try:
                import torch

                if not torch.cuda.is_available():  # inductor on a 2-core CPU takes minutes
                    variants = tuple(v for v in variants if not v.startswith("compile"))
            except ImportError:
                pass
    opts = BenchOptions(
        preset=FLAGS.preset, batches=_ints(FLAGS.batch, "batch"), dtypes=tuple(FLAGS.dtypes),
        frameworks=tuple(FLAGS.frameworks), tasks=tuple(FLAGS.tasks), torch_variants=tuple(variants), steps=FLAGS.steps,
        warmup=FLAGS.warmup, patch=_ints(FLAGS.patch, "patch"), volume=_ints(FLAGS.volume, "volume"),
        norm_order=FLAGS.norm_order, flax_step=tuple(FLAGS.flax_step), donate=FLAGS.donate, groupnorm=FLAGS.groupnorm, convs=tuple(FLAGS.conv),
        optimizer=FLAGS.optimizer, xla_flags=FLAGS.xla_flags, prefetch=FLAGS.prefetch, workers=FLAGS.workers,
        torch_compile_mode=FLAGS.torch_compile_mode, tag=FLAGS.tag,
    )
    result = run_benchmark(opts, FLAGS.out, log=lambda s: print(s, flush=True))
    print()
    print(markdown(result))
    print_ratios(result)
    for err in result["errors"]:
        print(f"error: {err}", file=sys.stderr)
    return cli.PARTIAL_FAILURE if result["errors"] else 0


def run():
    """Console script ``flaxdose-bench``."""
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
