"""Play.ipynb runs top to bottom on the results of a tiny run: every cell, audio players, and
the explanation WAVs of the most confident mistakes."""
import json
import sys
from pathlib import Path

import nbclient
import nbformat
import pandas as pd
import soundfile as sf
from jupyter_client.kernelspec import KernelSpecManager

import main
from conftest import tiny_args

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "Play.ipynb"
RUN = "resnet18_coarse"


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def _pin_kernel(tmp_path, monkeypatch):
    """A 'python3' kernel spec that starts this interpreter, found first through JUPYTER_PATH,
    so that no user-level spec can send the notebook to another environment."""
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    assert Path(KernelSpecManager().get_kernel_spec("python3").resource_dir) == spec


def _outputs(nb):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def test_notebook_runs_on_a_tiny_run(tmp_path, esc50, monkeypatch):
    assert main.main(tiny_args(tmp_path, esc50, "--epochs", "2")) == 0
    fold_dir = tmp_path / "results" / RUN / "fold5"
    for var, value in {"ESC50_RUN": RUN, "ESC50_FOLD": "5", "ESC50_RESULTS": tmp_path / "results",
                       "ESC50_FIGURES": tmp_path / "figures", "ESC50_DATA": esc50.parent}.items():
        monkeypatch.setenv(var, str(value))  # the kernel inherits the environment
    _pin_kernel(tmp_path, monkeypatch)

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()  # raises on a cell error

    outputs = _outputs(nb)
    assert not [o for o in outputs if o.output_type == "error"]
    html = [o.get("data", {}).get("text/html", "") for o in outputs]
    assert sum("<audio" in h for h in html) >= 4  # the sampled test clips at least
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 5  # curves, matrix, figures, per class

    tables = [o.data["text/plain"] for o in outputs if o.output_type == "execute_result"]
    agree = [t for t in tables if "fresh_prediction" in t]  # saved vs. Predictor.predict_file
    assert len(agree) == 1 and "True" in agree[0] and "False" not in agree[0]

    preds = pd.read_csv(fold_dir / "predictions.csv")
    wrong = preds[preds["true"] != preds["predicted"]]
    wavs = sorted((fold_dir / "explanations").glob("*_explanation.wav"))
    if wrong.empty:
        text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
        assert "No mistakes on test fold 5" in text
        assert not wavs
    else:
        assert len(wavs) == min(5, len(wrong))
        assert {w.name.replace("_explanation.wav", ".wav") for w in wavs} <= set(wrong["filename"])
        info = sf.info(str(wavs[0]))
        assert info.samplerate == 8000 and info.frames > 0
        assert sum("<audio" in h for h in html) >= 4 + 2 * len(wavs)  # each mistake: clip and explanation
