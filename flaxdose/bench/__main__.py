"""`python -m flaxdose.bench`: flaxdose vs PyTorch training and inference throughput.

Examples:
  python -m flaxdose.bench --preset tiny --steps 5 --out bench.json          # CPU smoke run
  python -m flaxdose.bench --preset paper --batch 8 --dtypes bf16 --out r.json
  python -m flaxdose.bench --preset paper --frameworks flax --xla-flags autotune0 --tag autotune0 --out l.json
  python -m flaxdose.bench --merge a.json b.json --out all.json                 # one table + ratios
"""

from __future__ import annotations

import argparse
import os
import sys


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flaxdose.bench",
        description="Training-step and full-volume inference throughput of flaxdose (JAX) and the same UNet in PyTorch.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    p.add_argument("--preset", default="tiny", help="model preset: paper, small or tiny (default tiny, for CPU smoke runs)")
    p.add_argument("--batch", type=_ints, default=None, help="batch sizes, comma-separated (default: the preset's: paper 8, small 4, tiny 2)")
    p.add_argument("--dtypes", type=_names, default=("float32", "bfloat16"), help="compute dtypes: fp32,bf16 (default both)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement; the median is reported (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation (default 3)")
    p.add_argument("--frameworks", type=_names, default=("flax", "torch"), help="flax,torch (default both)")
    p.add_argument("--tasks", type=_names, default=("train", "infer", "e2e"), help="train,infer,e2e (default all)")
    p.add_argument("--torch-variants", type=_names, default=None,
                   help="eager_fp32,eager_bf16,eager_bf16_cl,compile_bf16 (default all; compile_bf16 only on a GPU)")
    p.add_argument("--torch-compile-mode", default="default", help="torch.compile mode (default 'default')")
    p.add_argument("--patch", type=_ints, default=None, help="training patch X,Y,Z (default: paper 96,96,48)")
    p.add_argument("--volume", type=_ints, default=None, help="inference volume and grain phantom grid X,Y,Z (default: paper 120,120,64)")
    p.add_argument("--norm-order", default=None, choices=("relu_norm", "norm_relu"), help="override the preset's norm order")
    p.add_argument("--flax-step", type=_names, default=("jit",), help="jit (donated state) and/or pmap on one device (default jit)")
    p.add_argument("--no-donate", action="store_true", help="lever: do not donate the train state buffers")
    p.add_argument("--groupnorm", default="flax", help="lever: flax (nn.GroupNorm) or fused (one-pass stats, hand-written backward)")
    p.add_argument("--optimizer", default="adam", help="lever: adam (optax.adam) or adam_flat (optax.flatten(adam))")
    p.add_argument("--xla-flags", default="default",
                   help="lever: XLA flag preset (default, autotune0, cmdbuf_off, runtime_fusion, lhs, no_triton_gemm) or raw '--xla_...' flags")
    p.add_argument("--prefetch", type=int, default=2, help="end-to-end: batches kept in flight on the device (default 2)")
    p.add_argument("--workers", type=int, default=0, help="end-to-end: grain worker processes (default 0: threads)")
    p.add_argument("--tag", default="", help="label stored with every row (e.g. the lever being measured)")
    p.add_argument("--out", default=None, help="write results to FILE.json and the Markdown table to FILE.md")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON", help="only combine earlier result files into one table")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from flaxdose.errors import FlaxdoseError

    try:
        if args.merge:
            from flaxdose.bench.run import markdown, merge, print_ratios

            result = merge(args.merge, args.out)
            print(markdown(result))
            print_ratios(result)
            return 0
        return run(args)
    except FlaxdoseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    from flaxdose.bench.levers import xla_flags_for

    flags = xla_flags_for(args.xla_flags)
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():  # flags act only before the backend starts
        if flags:
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
        if "torch" in args.frameworks:
            # The torch run uses JAX too (flaxdose's initial weights); JAX would otherwise take
            # 75 % of GPU memory up front and starve PyTorch.
            os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    elif flags:
        print(f"warning: JAX already started; --xla-flags {args.xla_flags} not applied", file=sys.stderr)

    from flaxdose.bench.run import TORCH_VARIANTS, BenchOptions, markdown, print_ratios, run_benchmark

    variants = args.torch_variants
    if variants is None:
        variants = TORCH_VARIANTS
        if "torch" in args.frameworks:
            try:
                import torch

                if not torch.cuda.is_available():  # inductor on a 2-core CPU takes minutes
                    variants = tuple(v for v in variants if not v.startswith("compile"))
            except ImportError:
                pass
    opts = BenchOptions(
        preset=args.preset, batches=args.batch, dtypes=args.dtypes, frameworks=args.frameworks, tasks=args.tasks,
        torch_variants=variants, steps=args.steps, warmup=args.warmup, patch=args.patch, volume=args.volume,
        norm_order=args.norm_order, flax_step=args.flax_step, donate=not args.no_donate, groupnorm=args.groupnorm,
        optimizer=args.optimizer, xla_flags=args.xla_flags, prefetch=args.prefetch, workers=args.workers,
        torch_compile_mode=args.torch_compile_mode, tag=args.tag,
    )
    result = run_benchmark(opts, args.out, log=lambda s: print(s, flush=True))
    print()
    print(markdown(result))
    print_ratios(result)
    for err in result["errors"]:
        print(f"error: {err}", file=sys.stderr)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
