"""Throughput benchmark of flaxdose against the same UNet in PyTorch.

- `flaxdose.bench.torch_unet`: the PyTorch baseline (`TorchUNet3D`) and the converter
  `flax_to_torch_state_dict` (needs the optional extra: `pip install flaxdose[bench]`).
- `flaxdose.bench.run`: the measurements (`BenchOptions`, `run_benchmark`, `merge`).
- `flaxdose.bench.levers`: speed levers switched by flags (XLA flag presets, GroupNorm
  variant, optimizer).
- `python -m flaxdose.bench --help`: the command line. Method and numbers: docs/performance.md.
"""
