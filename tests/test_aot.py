"""jaxmed.aot: the run's real train and eval steps compiled by libtpu's (and the CUDA plugin's) deviceless compiler
for targets this machine does not have. Tiny models only: a full-size compile takes minutes here."""

import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys

import pytest

from helpers_configs import ROOT, config_file

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu is not installed (the aot-tpu extra; make test installs it)")
# find_spec of a submodule imports its parent: without any jax plugin there is no jax_plugins package to look in
GPU_COMPILER = (importlib.util.find_spec("jax_plugins") is not None
                and importlib.util.find_spec("jax_plugins.xla_cuda12") is not None)


def small_vit(hidden=128):
    """A ViT whose larger kernels (≥ 2^14 elements) are sharded by fsdp; 32² images of 8² patches (17 tokens)."""
    config = config_file("tests/tiny_config.py")
    config.model.hf_config.update(dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                       num_attention_heads=4, hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0))
    config.model.dtype = "bfloat16"
    return config


def compile_records(config, target, **options):
    from jaxmed.compile import report, targets

    targets.prepare_process()
    return report.compile_all(config, [target], **options)


def env():
    return dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")


def test_demo_compiles_for_a_v5litepod_8_and_fits(tmp_path):
    """The command as a user types it: table on stdout, DIR/aot.json with fitting records for train and eval."""
    out = tmp_path / "aot"
    done = subprocess.run([sys.executable, "-m", "jaxmed.aot", "--config", str(ROOT / "configs/demo.py"),
                           "--target", "v5litepod-8", "--out", str(out)], capture_output=True, text=True,
                          env=env(), cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "v5litepod-8" in done.stdout and "train/train" in done.stdout and "GiB/dev" in done.stdout
    records = json.loads((out / "aot.json").read_text())
    assert [r["program"] for r in records] == ["train/train", "eval"]
    for record in records:
        for key in ("target", "program", "devices", "hosts", "per_device_batch", "compile_seconds",
                    "bytes_per_device", "temporary_bytes", "hbm_bytes", "fits", "flops_per_step",
                    "hbm_traffic_bytes", "roofline_images_per_second", "roofline_bound", "host_callbacks",
                    "host_transfers", "collectives", "attention_kernel", "grouped_convolutions"):
            assert key in record, key
        assert record["fits"] is True and record["hosts"] == 1 and record["hbm_bytes"] == 16 * 2**30
        assert record["host_callbacks"] == 0 and record["host_transfers"] == 0
        assert record["flops_per_step"] > 0 and record["hbm_traffic_bytes"] > 0
        assert record["roofline_images_per_second"] > 0 and record["roofline_bound"] in ("compute", "memory")
        assert record["attention_kernel"] is None  # a ResNet
    # demo's mesh.data=1: the run uses one device, with the whole batch of 32 on it
    assert records[0]["devices"] == 1 and records[0]["per_device_batch"] == 32


def test_fsdp_over_a_multihost_v5litepod_16_shards_the_parameters():
    """4 hosts of 4 chips; mesh.fsdp=4 splits the large kernels (and their Adam moments) four ways: the step's
    arguments per device fall, and the step gathers parameters / scatters gradients."""
    replicated, sharded = small_vit(), small_vit()
    sharded.mesh.fsdp = 4
    [plain] = compile_records(replicated, "v5litepod-16", per_device_batch=2, include_eval=False)
    [fsdp] = compile_records(sharded, "v5litepod-16", per_device_batch=2, include_eval=False)
    for record in (plain, fsdp):
        assert "error" not in record, record
        assert record["hosts"] == 4 and record["devices"] == 16 and record["host_callbacks"] == 0
        assert record["attention_kernel"] == "pallas"  # FlashAttention inside shard_map over the batch
    assert fsdp["argument_bytes"] < 0.45 * plain["argument_bytes"], (plain, fsdp)
    assert set(fsdp["collectives"]) & {"all-gather", "reduce-scatter"}, fsdp["collectives"]
    assert "all-gather" not in plain["collectives"]  # data parallel only: one gradient all-reduce


@pytest.mark.parametrize("path", sorted(p.name for p in (ROOT / "configs").glob("*.py")))
def test_every_shipped_config_builds_its_programs_from_shapes_alone(path):
    """Without the hub or the datasets (this machine), each shipped config's run is built abstractly as the compile
    needs it — the hub models' shapes from hub_configs.toml (EfficientNet-B0 once got B7's top width from the class
    defaults and failed here, a traceback for a user) — and its train step lowers for a v5litepod-8."""
    from jaxmed.compile import programs, report, targets

    targets.prepare_process()
    config = config_file(f"configs/{path}")
    config.model.dtype = "bfloat16"
    config.mesh.data, config.mesh.fsdp = -1, 1
    target = targets.target("v5litepod-8")
    mesh = programs.target_mesh(config, targets.devices(target), target.hosts, target.name)
    run = programs.abstract_run(config, mesh, programs.class_names(config, None))
    [first, *_] = programs.train_programs(run, target.name, per_device_batch=1)
    lowered = first.step.lower(*first.args)  # traced with the TPU kernels staged, as the compile gets it
    assert lowered.out_info[1]["loss"].shape == () and report.program_devices(first) == 8


def test_a_batch_that_does_not_fit_reports_a_smaller_one_that_does(monkeypatch, capsys):
    """A chip with a few MiB of HBM (the real 16 GiB would need a large model and minutes): 64 images per device
    do not fit, --fit-batch finds a smaller batch that does; the record keeps the compiles that show it."""
    from jaxmed.compile import report, targets

    real = targets.target

    def small_chip(name):
        target = real(name)
        return dataclasses.replace(target, chip=dataclasses.replace(target.chip, hbm_bytes=13 * 2**20))

    monkeypatch.setattr(report.jtargets, "target", small_chip)
    [record] = compile_records(config_file("tests/tiny_config.py"), "v5litepod-8", per_device_batch=64,
                               include_eval=False, fit_batch=True, resolution=0.5)
    assert record["fits"] is False and record["host_callbacks"] == 0
    largest, probes = record["largest_fitting_batch"], record["fit_probes"]
    assert 1 <= largest < 64
    assert probes[0] == {"per_device_batch": 64, "fits": False, "bytes": probes[0]["bytes"]}
    limit = 0.95 * 13 * 2**20
    for probe in probes:  # each verdict is the size against the headroom
        assert probe["fits"] == (probe["bytes"] <= limit), probe
    assert {"per_device_batch": largest, "fits": True} in [{k: p[k] for k in ("per_device_batch", "fits")}
                                                          for p in probes]
    misses = [p["per_device_batch"] for p in probes if not p["fits"] and p["per_device_batch"] > largest]
    assert min(misses) <= max(largest + 8, largest * 1.5)  # a compiled miss within the resolution (or 8) above
    assert len({p["per_device_batch"] for p in probes}) == len(probes)  # no batch compiled twice
    err = capsys.readouterr().err
    assert f"fit search v5litepod-8: {largest} per device fits" in err


def test_host_callbacks_inside_a_step_are_counted():
    """The counter the train-step records rely on finds a jax.debug.print compiled for a TPU."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxmed.compile import analysis, targets

    targets.prepare_process()
    devices = targets.devices(targets.target("v5litepod-8"))
    mesh = jax.sharding.Mesh(devices, ("data",))
    x = jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=NamedSharding(mesh, P("data")))

    def noisy(x):
        jax.debug.print("sum {}", x.sum())
        return x * 2

    text = jax.jit(noisy).lower(x).compile().as_text()
    assert analysis.structure(text, "tpu", "vit", "float32")["host_callbacks"] >= 1
    clean = jax.jit(lambda x: x * 2).lower(x).compile().as_text()
    assert analysis.structure(clean, "tpu", "vit", "float32")["host_callbacks"] == 0


def _dies_compiling_for_v6e(config, name, options, path):
    """A stand-in compiler for `isolated.compile_all`'s child: killed by SIGSEGV on v6e-8, as libtpu 0.0.42.1 dies
    on ResNet-50 there; the other targets write a record."""
    if name == "v6e-8":
        os.kill(os.getpid(), signal.SIGSEGV)
    path.write_text(json.dumps([{"target": name, "program": "train/train", "fits": True, "options": options}]))


def test_a_compiler_that_dies_costs_its_target_only():
    from jaxmed.compile import isolated

    records = isolated.compile_all(config_file("configs/demo.py"), ["v5litepod-8", "v6e-8", "v5p-8"],
                                   worker=_dies_compiling_for_v6e, fit_batch=True)
    assert [r["target"] for r in records] == ["v5litepod-8", "v6e-8", "v5p-8"]
    assert records[0]["fits"] and records[2]["fits"] and records[0]["options"] == {"fit_batch": True}
    assert records[1]["fits"] is None and "died (SIGSEGV)" in records[1]["error"]


def test_errors_for_people(monkeypatch):
    from jaxmed.compile import report, targets
    from jaxmed.errors import JaxmedError

    with pytest.raises(JaxmedError, match=r"unknown target 'v5e-8'; known targets: .*v5litepod-8.*h100x8"):
        report.compile_all(config_file("configs/demo.py"), ["v5e-8"])
    config = config_file("configs/medmnist_resnet.py")
    config.data.root = "elsewhere.npz"
    with pytest.raises(JaxmedError, match="--num-classes"):
        report.compile_all(config, ["v5litepod-8"])
    if not GPU_COMPILER:  # as on a machine without the aot-gpu extra (CI): maybe no jax_plugins package at all
        with pytest.raises(JaxmedError, match=r"jaxmed\[aot-gpu\]"):
            targets.devices(targets.target("h100"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "jax_plugins.xla_cuda12" else real_find_spec(name, *a))
    with pytest.raises(JaxmedError, match=r"jaxmed\[aot-gpu\]"):
        targets.devices(targets.target("h100"))


def test_the_cli_says_what_is_wrong_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "jaxmed.aot", "--config", str(ROOT / "configs/demo.py"),
                           "--target", "tpu-v9"], capture_output=True, text=True, env=env(), timeout=300)
    assert done.returncode == 2
    error = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert error and "unknown target 'tpu-v9'" in error[0] and "v5litepod-8" in error[0]
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(not GPU_COMPILER, reason="the CUDA plugin is not installed (aot-gpu extra: make test-aot)")
def test_h100_step_uses_cudnn_attention_in_bf16():
    [train, _] = compile_records(small_vit(hidden=128), "h100")
    assert "error" not in train, train
    assert train["attention_kernel"] == "cudnn" and train["host_callbacks"] == 0 and train["fits"]
    assert train["hbm_traffic_bytes"] is None and train["flops_per_step"] > 0


def test_a_triton_tiling_failure_is_compiled_again_without_triton_gemm():
    """Without autotuning XLA's Triton GEMM may find no tile for a dot (GUIDE §7): that program is compiled again
    with cuBLAS dots and its record says so. (A stand-in lowered step; the real one needs the GPU compiler.)"""
    import types

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxmed.compile import programs, report, targets

    mesh = jax.sharding.Mesh(jax.devices("cpu")[:1], ("data",))
    images = jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    real = jax.jit(lambda x: x @ x).lower(images)
    tries = []

    class TritonFailsFirst:
        def compile(self, compiler_options=None):
            tries.append(compiler_options)
            if compiler_options is None:
                raise RuntimeError("INTERNAL: Couldn't find output tile sizes for dot.1\nmore lines")
            return real.compile()

        def compiler_ir(self, dialect):
            return real.compiler_ir(dialect)

    program = programs.Program("train/train", types.SimpleNamespace(lower=lambda *args: TritonFailsFirst()),
                               ({}, {"image": images}), 8)
    record = report.compile_program(program, targets.target("h100"), "vit", "bfloat16")
    assert tries == [None, {"xla_gpu_enable_triton_gemm": False}]
    assert record["compiler_options"] == {"xla_gpu_enable_triton_gemm": False}
    assert record["retried_because"].startswith("INTERNAL: Couldn't find output tile sizes")
    assert record["flops_per_step"] > 0 and record["hbm_traffic_bytes"] is None
