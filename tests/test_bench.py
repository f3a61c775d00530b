"""The PyTorch baseline computes flaxdose's function; the benchmark CLI runs and reports."""

import io
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxdose.bench import levers
from flaxdose.errors import FlaxdoseError
from flaxdose.model import UNet3D, count_params, init_params, preset


def _random_params(spec, seed=0):
    """Random params of the right shapes from numpy (fast: no JAX RNG compilation on the CPU).

    Kernels are scaled by 1/sqrt(fan-in); biases and GroupNorm scales/offsets are not 0 / 1.
    """
    shapes = jax.eval_shape(lambda: init_params(spec, jax.random.key(0)))
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        if "kernel" in name:
            return rng.normal(0, 1 / np.sqrt(np.prod(s.shape[:-1])), s.shape).astype(np.float32)
        centre = 1.0 if "scale" in name else 0.0
        return (centre + 0.1 * rng.normal(size=s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@pytest.mark.parametrize(
    "spec_kwargs, shape",
    [
        (dict(name="tiny", norm_order="relu_norm"), (9, 6, 5)),  # odd sizes: padded and cropped
        (dict(name="tiny", norm_order="norm_relu"), (8, 8, 8)),
        (dict(name="small", features=(4, 8, 16), convs_per_level=2, groups=2, norm_order="norm_relu"), (11, 7, 6)),
    ],
)
def test_torch_baseline_equals_flaxdose(spec_kwargs, shape):
    torch = pytest.importorskip("torch")
    from flaxdose.bench.torch_unet import count_torch_params, torch_model_from_flax

    spec_kwargs = dict(spec_kwargs)
    spec = preset(spec_kwargs.pop("name"), **spec_kwargs)
    params = _random_params(spec)
    x = np.asarray(jax.random.bernoulli(jax.random.key(7), 0.3, (2, *shape, spec.in_channels)), np.float32)
    ours = np.asarray(jax.jit(UNet3D(spec).apply)({"params": params}, x))
    model = torch_model_from_flax(spec, params).eval()
    with torch.no_grad():
        theirs = model(torch.from_numpy(x).permute(0, 4, 1, 2, 3).contiguous()).numpy()
    assert theirs.shape == ours.shape == (2, *shape)
    assert _rel(ours, theirs) <= 1e-5
    assert count_torch_params(model) == count_params(params)


def test_paper_preset_parameter_count_matches_torch():
    pytest.importorskip("torch")
    from flaxdose.bench.torch_unet import TorchUNet3D, count_torch_params

    spec = preset("paper")
    params = jax.eval_shape(lambda: init_params(spec, jax.random.key(0)))
    assert count_torch_params(TorchUNet3D(spec)) == count_params(params)


def test_converter_refuses_params_of_another_spec():
    pytest.importorskip("torch")
    from flaxdose.bench.torch_unet import torch_model_from_flax

    params = _random_params(preset("tiny"))
    with pytest.raises(FlaxdoseError, match="same spec"):
        torch_model_from_flax(preset("tiny", features=(4, 16)), params)


@pytest.mark.parametrize("norm_order", ["relu_norm", "norm_relu"])
def test_fused_groupnorm_lever_matches_flax_values_and_gradients(norm_order):
    spec = preset("tiny", norm_order=norm_order, features=(4, 8, 16))
    params = _random_params(spec)
    x = jax.random.bernoulli(jax.random.key(2), 0.3, (2, 8, 8, 4, 6)).astype(jnp.float32)
    target = jax.random.normal(jax.random.key(3), (2, 8, 8, 4))

    def loss(p):
        return jnp.mean(jnp.square(UNet3D(spec).apply({"params": p}, x) - target))

    l1, g1 = jax.jit(jax.value_and_grad(loss))(params)
    l2, g2 = jax.jit(jax.value_and_grad(levers.with_groupnorm(loss, "fused")))(params)
    flat = lambda g: np.concatenate([np.ravel(v) for v in jax.tree.leaves(g)])  # noqa: E731
    assert abs(float(l1) - float(l2)) <= 1e-5 * abs(float(l1))
    assert _rel(flat(g2), flat(g1)) <= 1e-4


def test_bad_options_say_what_to_fix():
    from flaxdose.bench.run import BenchOptions

    with pytest.raises(FlaxdoseError, match="unknown --preset"):
        BenchOptions(preset="huge")
    with pytest.raises(FlaxdoseError, match="--frameworks"):
        BenchOptions(frameworks=("flax", "tensorflow"))
    with pytest.raises(FlaxdoseError, match="--dtypes"):
        BenchOptions(dtypes=("float16",))
    with pytest.raises(FlaxdoseError, match="--xla_flags"):
        BenchOptions(xla_flags="fastest")
    with pytest.raises(FlaxdoseError, match="must fit"):
        BenchOptions(patch=(32, 32, 32))


def test_missing_torch_says_how_to_install(monkeypatch):
    from flaxdose.bench import torch_unet

    monkeypatch.setattr(torch_unet, "torch", None)
    with pytest.raises(FlaxdoseError, match=r"pip install -e \"\.\[bench\]\"|pip install torch"):
        torch_unet.require_torch()


ROW_FIELDS = {
    "framework", "variant", "task", "dtype", "batch", "shape", "ms_per_step", "patches_per_s", "voxels_per_s",
    "peak_mem_bytes", "compile_s", "warmup_s", "pipelined_ms_per_step", "steps",
}


def bench_cli(*args):
    """`python -m flaxdose.bench ARGS` in a fresh process (the CLI sets XLA flags before JAX starts)."""
    proc = subprocess.run([sys.executable, "-m", "flaxdose.bench", *args], capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def test_cli_smoke_run_writes_json_and_markdown(tmp_path):
    pytest.importorskip("torch")
    from flaxdose.bench.run import print_ratios

    out = tmp_path / "bench.json"
    rc, log = bench_cli(
        "--preset", "tiny", "--batch", "2", "--steps", "2", "--warmup", "1", "--patch", "8,8,8",
        "--volume", "16,16,8", "--dtypes", "fp32,bf16", "--torch_variants", "eager_fp32,eager_bf16_cl",
        "--out", str(out),
    )
    assert rc == 0, log
    result = json.loads(out.read_text())
    assert {"options", "env", "device", "rows", "ratios", "errors"} <= set(result)
    assert result["errors"] == []
    assert result["env"]["versions"]["jax"] and result["env"]["versions"]["torch"]
    assert result["device"]["flax"]["device_kind"] and result["device"]["torch"]["device_kind"]
    rows = result["rows"]
    seen = {(r["framework"], r["task"], r["dtype"]) for r in rows}
    for framework in ("flax", "torch"):
        for task in ("train", "infer"):
            assert (framework, task, "float32") in seen and (framework, task, "bfloat16") in seen
    assert ("flax", "train_e2e", "float32") in seen
    for r in rows:
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        assert r["ms_per_step"] > 0 and r["patches_per_s"] > 0
    flax_train = [r for r in rows if r["framework"] == "flax" and r["task"] == "train"]
    assert all(r["compile_s"] > 0 and r["steps"] == 2 for r in flax_train)
    e2e = [r for r in rows if r["task"] == "train_e2e"]
    assert all(r["e2e_fraction_of_resident"] > 0 for r in e2e)
    compares = {(q["task"], q["compare"]) for q in result["ratios"]}
    assert {("train", "best"), ("infer", "best"), ("train", "fp32"), ("train", "bf16")} <= compares
    assert all(q["ratio"] > 0 for q in result["ratios"])
    table = out.with_suffix(".md").read_text()
    assert "| flax | jit_fp32 | train |" in table and "flax/torch throughput" in table
    buf = io.StringIO()
    print_ratios(result, file=buf)
    assert "flaxdose/PyTorch train" in buf.getvalue()

    merged = tmp_path / "merged.json"
    assert bench_cli(f"--merge={out},{out}", "--out", str(merged))[0] == 0
    assert len(json.loads(merged.read_text())["rows"]) == 2 * len(rows)


def test_cli_flax_only_levers(tmp_path):
    out = tmp_path / "levers.json"
    rc, log = bench_cli(
        "--preset", "tiny", "--frameworks", "flax", "--tasks", "train", "--dtypes", "bf16", "--batch", "2",
        "--steps", "2", "--warmup", "0", "--patch", "8,8,8", "--volume", "8,8,8", "--flax_step", "pmap",
        "--nodonate", "--groupnorm", "fused", "--optimizer", "adam_flat", "--tag", "levers",
        "--xla_flags=--xla_force_host_platform_device_count=2", "--out", str(out),
    )
    assert rc == 0, log
    rows = json.loads(out.read_text())["rows"]
    assert {r["variant"] for r in rows} == {"pmap_bf16"}
    assert all(r["tag"] == "levers" and r["levers"]["groupnorm"] == "fused" and not r["levers"]["donate"] for r in rows)
