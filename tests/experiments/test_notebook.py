"""The Colab notebook: its setup cell (default suite) and a run as committed on CPU (slow).

The kernel is this interpreter (sys.executable): a kernelspec for it is installed into a
temporary directory that JUPYTER_PATH points at, so no manual `ipykernel install` is needed.
Parameters are injected papermill-style: a cell tagged "injected-parameters" right after the cell
tagged "parameters".
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOK = os.path.join(ROOT, "experiments", "notebooks", "lola_tpu_colab.ipynb")
KERNEL = "lola-jax-test"


def _load():
  import nbformat

  return nbformat.read(NOTEBOOK, as_version=4)


def inject_parameters(nb, **params):
  """Papermill's convention: a new cell after the one tagged "parameters" overrides its values."""
  from nbformat.v4 import new_code_cell

  index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
  cell = new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()))
  cell.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(index + 1, cell)
  return nb


def test_committed_notebook_is_clean_and_parameterised():
  nb = _load()
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.get("outputs") and c.get("execution_count") is None for c in code), (
    "commit the notebook with outputs cleared (experiments/notebooks/build_notebook.py)"
  )
  params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1 and 'PRESET = "auto"' in params[0].source
  setup = code[1].source  # the first cell after the parameters installs and checks the backend
  assert 'find_spec("lola_jax")' in setup and "jax.devices()" in setup


def _setup_script():
  """The parameters cell and the setup cell as one script."""
  code = [c.source for c in _load().cells if c.cell_type == "code"]
  return code[0] + "\n" + code[1]


def _run_setup(tmp_path, *python_flags, **env_changes):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env.update(env_changes)
  return subprocess.run(
    [sys.executable, *python_flags, "-c", _setup_script()],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )


def test_setup_falls_back_to_cpu_when_the_default_backend_fails(tmp_path):
  # JAX_PLATFORMS=tpu on a machine without a TPU: the backend cannot start, as on a TPU runtime
  # whose libtpu does not match. The cell must notice before importing JAX and run on CPU.
  proc = _run_setup(tmp_path, JAX_PLATFORMS="tpu", PYTHONPATH=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "could not start its default backend" in proc.stdout, proc.stdout
  assert "falling back to CPU" in proc.stdout
  assert "backend 'cpu', 4 device(s)" in proc.stdout
  assert "PRESET 'auto' -> 'tiny' on backend 'cpu'" in proc.stdout


def test_setup_explains_the_placeholder_repo_url(tmp_path):
  # -S: no site-packages, so lola_jax is not importable, and no copy of the repository is in
  # the working directory: the cell must stop with a message naming the placeholder and the
  # alternatives, before any pip or git call.
  proc = _run_setup(tmp_path, "-S", "-I")
  assert proc.returncode != 0
  assert "RuntimeError" in proc.stderr and "REPO_URL is still the placeholder" in proc.stderr
  assert "lola-jax.zip" in proc.stderr
  assert "$ " not in proc.stdout  # nothing was run


def test_setup_pins_the_install_to_the_repositorys_requirements():
  script = _setup_script()
  assert 'pinned_version(requirements, "jax")' in script
  assert "jax[tpu]>=" not in script and "-U" not in script.split()


def _text(outputs):
  parts = []
  for out in outputs:
    if out.output_type == "stream":
      parts.append(out.text)
    elif out.output_type in ("execute_result", "display_data"):
      parts.append(out.data.get("text/plain", "") + out.data.get("text/markdown", ""))
  return "".join(parts)


@pytest.mark.slow
def test_notebook_runs_tiny_preset_on_cpu(tmp_path, monkeypatch):
  from ipykernel.kernelspec import install
  from nbclient import NotebookClient

  prefix = tmp_path / "jupyter"
  install(kernel_name=KERNEL, prefix=str(prefix))  # argv: this sys.executable
  monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
  # CPU only, a fresh XLA device count (the notebook asks for 4 simulated devices).
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))

  # As committed (PRESET = "auto"), only the output directory and the device count set.
  nb = inject_parameters(_load(), WORKDIR=str(tmp_path / "runs"), CPU_DEVICES=4)
  client = NotebookClient(
    nb,
    kernel_name=KERNEL,
    timeout=900,
    resources={"metadata": {"path": str(tmp_path)}},
  )
  try:
    client.execute()  # raises CellExecutionError on the first failing cell
  finally:
    import nbformat

    nbformat.write(nb, str(tmp_path / "executed.ipynb"))  # for a look after a failure

  errors = [
    o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
  ]
  assert not errors
  text = "\n".join(_text(c.outputs) for c in nb.cells if c.cell_type == "code")
  assert "lola_jax is already importable" in text
  assert "backend 'cpu', 4 device(s)" in text
  assert "This notebook expects a Colab TPU runtime" in text
  assert "PRESET 'auto' -> 'tiny' on backend 'cpu'" in text
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 1} over 4 device(s)" in text
  assert "Pass-key exact-match accuracy" in text
  assert (
    "| teacher (full KV) |" in text and "| hybrid C64 |" in text and "| lola C64 cache 64 |" in text
  )
  assert "max |lola_prefill - lola_reference|" in text
  assert "| T | cache | prefill ms |" in text
  images = sum(
    "image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs
  )
  assert images >= 5  # diagram, loss curve, two recall figures, memory plot
  runs = tmp_path / "runs"
  for name in ("results.json", "report.md", "bench.json", "figures/accuracy_vs_context.png"):
    assert (runs / name).stat().st_size > 0, name
  assert (runs / "teacher" / "metrics.jsonl").exists() and (
    runs / "hybrid" / "checkpoints"
  ).is_dir()
