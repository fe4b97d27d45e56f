# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM = false

.PHONY: demo test test-aot bench install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned, so nothing later resolves an unpinned (CUDA) build.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[torch,dev]"
	touch $@

# The tfds extra (TensorFlow, ~0.5 GB) only for the tests that prepare a TFDS dataset; stress (torchio) for the
# stress test's MRI artefacts; wandb, mlflow (skinny) and nibabel for the tracker and NIfTI tests.
$(VENV)/.installed-tfds: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[torch,dev,tfds,dicom,stress,wandb,mlflow,nifti]"
	touch $@

# Headless Chromium, in which tests/test_report_html.py renders report.html (Debian package; nothing to do when
# `chromium` is already on PATH). apt-get needs root: sudo unless make runs as root.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
$(VENV)/.installed-chromium: $(VENV)/.installed
	command -v chromium >/dev/null || ($(SUDO) apt-get update && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium)
	touch $@

# libtpu's compiler for jaxmed.aot's TPU targets (~700 MB installed): tests/test_aot.py compiles for TPUs.
$(VENV)/.installed-aot-tpu: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[torch,dev,aot-tpu]"
	touch $@
test: $(VENV)/.installed-aot-tpu

# The CUDA plugin's deviceless compiler for jaxmed.aot's GPU targets (~2.4 GB installed, mostly cuDNN and cuBLAS):
# too slow to download for every `make test`, so its tests skip without it and `make test-aot` runs them.
$(VENV)/.installed-aot-gpu: $(VENV)/.installed-aot-tpu
	$(PY) -m pip install --quiet -e ".[torch,dev,aot-tpu,aot-gpu]"
	touch $@

install: $(VENV)/.installed

# The main job on built-in synthetic MRI phantoms: trains, evaluates, writes runs/demo/eval/test/report.html.
# Exactly the README's command (with the venv's python), in your environment: no simulated devices are added, so
# it gives the README's numbers (the best checkpoint, and so the test predictions, depend on the device count).
demo: install
	$(PY) -m jaxmed.main --config configs/demo.py --workdir runs/demo

# 8 simulated devices for the tests: the sharded code paths run even on a laptop CPU.
test: export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
test: install $(VENV)/.installed-tfds $(VENV)/.installed-chromium
	$(PY) -m pytest -n 2 --timeout=900 tests

# jaxmed.aot's TPU and GPU compiles (the GPU ones need the aot-gpu extra, which `make test` does not install).
test-aot: install $(VENV)/.installed-aot-gpu
	$(PY) -m pytest -n 2 --timeout=900 tests/test_aot.py

bench: install
	XLA_FLAGS= $(PY) bench/forward.py

clean:
	rm -rf $(VENV) runs
