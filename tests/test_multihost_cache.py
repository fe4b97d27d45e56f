"""Several local processes joined by jax.distributed (gloo) build one shared cache: each image is decoded once in
total, and the cache is byte for byte the one a single process builds."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jaxmed.data import load_dataset
from tests.test_data_cache import VIT, data_config, make_folder
from tests.test_multihost import ROOT, _env, _free_port

pytestmark = pytest.mark.multihost

DRIVER = textwrap.dedent("""
    import os, sys
    from jaxmed.distributed import maybe_initialize_distributed, setup_logging
    from jaxmed.data import decode, load_dataset, default_config
    from jaxmed.data.preprocess import Preprocessor
    setup_logging()
    maybe_initialize_distributed()
    clean = decode.clean
    def counted(image, **kwargs):  # one line per decoded image, in this process's file
        with open(os.path.join(sys.argv[2], f"decoded-{os.environ['JAX_PROCESS_ID']}.txt"), "a") as handle:
            handle.write("1\\n")
        return clean(image, **kwargs)
    decode.clean = counted
    config = default_config()
    config.update(format="imagefolder", root=sys.argv[1], cache_dir=sys.argv[3], decode_threads=2, cache_size=40,
                  val_fraction=0.25, grayscale=True)
    dataset = load_dataset(config, Preprocessor(processor_type="ViTImageProcessor",
                                                size={"height": 16, "width": 16}))
    print("DIRECTORY", dataset.directory.name)
""")


def files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


@pytest.mark.parametrize("processes", [2, 4])
def test_processes_share_the_decode_and_build_the_single_process_cache(tmp_path, processes):
    root = make_folder(tmp_path / "data", per_class=5)  # 20 images
    single = load_dataset(data_config(tmp_path, root, grayscale=True, val_fraction=0.25), VIT).directory
    port, counts = _free_port(), tmp_path / "counts"
    counts.mkdir()
    shared = tmp_path / "shared_cache"
    jobs = [subprocess.Popen([sys.executable, "-c", DRIVER, str(root), str(counts), str(shared)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=_env(1, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                      JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(index)))
            for index in range(processes)]
    outputs = [job.communicate(timeout=300) for job in jobs]
    for job, (out, err) in zip(jobs, outputs):
        assert job.returncode == 0, err[-3000:]
        assert f"DIRECTORY {single.name}" in out
    decoded = [len((counts / f"decoded-{index}.txt").read_text().split()) for index in range(processes)]
    assert sum(decoded) == 20 and all(count > 0 for count in decoded), decoded  # each image once, all helped
    built = files(shared / single.name)
    assert built.keys() == files(single).keys() and built == files(single)
    assert json.loads(built["meta.json"])["splits"]["train"]["ids"][0].startswith(str(root))
