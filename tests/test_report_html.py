"""report.html, comparison.html and the cross-validation summary.html: one self-contained file each, checked in
headless Chromium (it renders, every figure decodes and displays, every tagged number is report.json's)."""

import base64
import csv
import html.parser
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from helpers_configs import train_tiny_run
from jaxmed.evaluate import calibration, figures, metrics
from jaxmed.evaluate import html as report_html
from jaxmed.evaluate.report import read_predictions

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no `chromium` on PATH (Debian package chromium; "
                                                             "`make test` installs it)")
# The network is closed: without these Chromium keeps retrying its background connections.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars")
DATA_URI = re.compile(r"data:image/png;base64,[A-Za-z0-9+/=]+")
# Added to the test's own copy of the page only (the report has no script): after load, each image's decoded width,
# and a mark on any image the browser could not decode.
PROBE = ("<script>window.addEventListener('load', () => { for (const image of document.images) "
         "image.setAttribute('data-natural-width', image.naturalWidth); });</script>")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """The tiny ViT trained 8 steps, with an operating point for `meningioma` (as tests/test_evaluate.py)."""
    return train_tiny_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def page(run_dir):
    """report.html of eval/test, written by the call evaluate_run makes; calibration faked if the run has none."""
    out = run_dir / "eval/test"
    report = json.loads((out / "report.json").read_text())
    if "calibration" not in report:
        _, labels, probabilities, _ = read_predictions(out / "predictions.csv")
        sharpened = probabilities ** 2 / (probabilities ** 2).sum(1, keepdims=True)
        report["calibration"] = {"temperature": 0.5, "fitted_on": "val",
                                 "before": calibration.calibration_metrics(labels, probabilities),
                                 "after": calibration.calibration_metrics(labels, sharpened)}
    if not (out / "reliability_diagram.png").exists():
        _, labels, probabilities, _ = read_predictions(out / "predictions.csv")
        calibration.reliability_diagram(labels, probabilities, out / "reliability_diagram.png")
    config = json.loads((run_dir / "config.json").read_text())
    path = report_html.write_report_html(out, report, config=config)
    assert path == out / "report.html"
    return path, report


def test_report_is_one_self_contained_file_with_every_section(page):
    path, report = page
    text = path.read_text()
    parsed = _parse(text)
    assert "<script" not in text.lower()
    for attribute in parsed.links:
        assert attribute.startswith("data:image/png;base64,"), attribute[:80]
    without_images = DATA_URI.sub("", text)
    assert "http" not in without_images and "//" not in without_images
    pngs = sorted(p.name for p in path.parent.glob("*.png"))
    assert {"confusion_matrix.png", "roc_curves.png", "reliability_diagram.png", "predictions_grid.png"} <= set(pngs)
    assert len(parsed.images) == len(pngs)  # every figure of the directory, each once
    for heading in ("Headline metrics", "Per class", "Confusion matrix", "ROC and precision-recall curves",
                    "Calibration", "Operating point", "Training curves", "Misclassified images", "Explanations",
                    "Configuration"):
        assert f">{heading}</h2>" in text, heading
    rows = list(csv.DictReader((path.parent / "predictions.csv").open()))
    wrong = [row for row in rows if row["label"] != row["prediction"]]
    assert text.count('<tr class="mistake">') == min(len(wrong), report_html.MISCLASSIFIED_ROWS)
    for row in wrong[:report_html.MISCLASSIFIED_ROWS]:
        assert f"<td>{row['id']}</td>" in text
    assert "&quot;positive_class&quot;: &quot;meningioma&quot;" in text  # the config, escaped in a <pre>
    for key in ("accuracy", "ci95.accuracy.0", "ci95.accuracy.1", "per_class.glioma.recall", "confusion_matrix.0.0",
                "roc_auc.macro", "calibration.temperature", "calibration.after.ece_15", "operating_point.threshold",
                "operating_point.test.sensitivity", "operating_point.val.flagged"):
        assert key in parsed.numbers, key


@needs_chromium
def test_report_renders_in_headless_chromium(page, tmp_path):
    path, _ = page
    screenshot = tmp_path / "report_screenshot.png"
    _chromium(tmp_path, f"--screenshot={screenshot}", "--window-size=1200,3000", path.as_uri())
    image = Image.open(screenshot).convert("RGB")
    assert image.size == (1200, 3000)
    colours = image.getcolors(maxcolors=1 << 20)
    assert len(colours) > 500, "a blank or text-only page"  # the embedded figures bring thousands


@needs_chromium
def test_chromium_dom_has_decodable_figures_and_report_json_numbers(page, tmp_path):
    path, report = page
    probe = tmp_path / "probe.html"
    text = path.read_text().replace("<img ", "<img onerror=\"this.setAttribute('data-broken', '1')\" ")
    probe.write_text(text.replace("</body>", PROBE + "</body>"))
    dom = _chromium(tmp_path, "--run-all-compositor-stages-before-draw", "--virtual-time-budget=5000",
                    "--dump-dom", probe.as_uri())
    parsed = _parse(dom)
    assert len(parsed.images) == len(_parse(path.read_text()).images)
    for attributes in parsed.images:
        assert "data-broken" not in attributes, attributes.get("alt")
        data = base64.b64decode(attributes["src"].removeprefix("data:image/png;base64,"), validate=True)
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "PNG"
            image.verify()
            width = image.size[0]
        assert int(attributes["data-natural-width"]) == width > 0, attributes.get("alt")
    assert len(parsed.numbers) > 50
    for key, shown in parsed.tagged:
        assert shown == _expected(report, key), key


def test_comparison_page_holds_the_runs_the_pairs_and_the_figures(tmp_path):
    names = ["glioma", "pituitary"]
    run = lambda accuracy: {  # noqa: E731
        "name": f"run-{accuracy}", "workdir": "/runs/a",
        "metrics": {"accuracy": {"value": accuracy, "ci95": [accuracy - 0.05, accuracy + 0.04]},
                    "roc_auc_macro": {"value": None, "ci95": None},
                    "recall": {name: {"value": 0.5, "ci95": [0.25, 0.75], "support": 8} for name in names}},
        "training": {"parameters": 1234, "train_seconds": 12.5, "images_per_second": 80.25}}
    comparison = {"split": "test", "num_examples": 16, "class_names": names, "runs": [run(0.8125), run(0.6875)],
                  "pairs": [{"a": "run-0.8125", "b": "run-0.6875", "num_examples": 16,
                             "mcnemar": {"pvalue": 0.2188, "b": 4, "c": 2},
                             "paired_bootstrap": {"accuracy": {"difference": 0.125, "ci95": [-0.0625, 0.3125]}},
                             "delong": {"pvalue": 0.0314}, "verdict": "run-0.8125 vs run-0.6875: no evidence <here>",
                             "delong_skipped": None}]}
    _png(tmp_path / "differences.png")
    path = report_html.write_comparison_html(tmp_path, comparison)
    assert path == tmp_path / "comparison.html"
    text, parsed = _check_page(path, comparison, (
        "runs.0.metrics.accuracy.value", "runs.1.metrics.accuracy.ci95.1", "runs.0.metrics.roc_auc_macro.value",
        "runs.1.metrics.recall.pituitary.ci95.0", "runs.0.training.parameters", "pairs.0.mcnemar.pvalue",
        "pairs.0.paired_bootstrap.accuracy.difference", "pairs.0.delong.pvalue"))
    assert [image["alt"] for image in parsed.images] == ["Paired differences with 95% intervals"]
    assert "no evidence &lt;here&gt;" in text and "<here>" not in text
    assert parsed.numbers["runs.0.metrics.roc_auc_macro.value"] == "n/a"


def test_cv_page_holds_per_fold_metrics_and_the_pooled_report(tmp_path):
    names = ["glioma", "meningioma", "pituitary"]
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 10)
    probabilities = rng.dirichlet(np.ones(3), size=30)
    pooled = metrics.classification_metrics(labels, probabilities, names, bootstrap=50)
    pooled["calibration"] = calibration.calibration_metrics(labels, probabilities)
    summary = {"folds": 3, "images_per_fold": [10, 10, 10], "pooled": pooled,
               "metrics": {"accuracy": {"mean": 0.5, "sd": 0.1, "values": [0.4, 0.5, 0.6]},
                           "temperature": {"mean": None, "sd": None, "values": [None, None, None]},
                           "recall/glioma": {"mean": 0.3333, "sd": 0.0577, "values": [0.3, 0.3, 0.4]}}}
    figures.confusion_matrix(np.asarray(pooled["confusion_matrix"]), names, tmp_path / "confusion_matrix.png")
    _png(tmp_path / "reliability_diagram.png")
    path = report_html.write_cv_html(tmp_path, summary)
    assert path == tmp_path / "summary.html"
    text, parsed = _check_page(path, summary, (
        "metrics.accuracy.values.2", "metrics.recall/glioma.sd", "metrics.temperature.mean", "pooled.accuracy",
        "pooled.ci95.accuracy.0", "pooled.per_class.meningioma.f1", "pooled.confusion_matrix.2.1",
        "pooled.calibration.ece_15"))
    assert len(parsed.images) == 2
    assert "3-fold cross-validation" in text and ">Calibration</h3>" in text


def test_missing_optional_sections_are_left_out(tmp_path):
    report = {"num_examples": 4, "class_names": ["a", "b"], "accuracy": 0.75, "cohen_kappa": None}
    text = report_html.write_report_html(tmp_path, report).read_text()
    assert _parse(text).numbers == {"accuracy": "0.7500", "cohen_kappa": "n/a"}
    for heading in ("Calibration", "Operating point", "Per class", "Misclassified images", "Configuration"):
        assert f">{heading}</h2>" not in text, heading


# ---------------------------------------------------------------------------------------------------------- helpers


def _chromium(profile_dir, *arguments) -> str:
    """Run headless Chromium once with its own profile; returns stdout (the DOM for --dump-dom)."""
    result = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile_dir / 'profile'}", *arguments],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


class _Page(html.parser.HTMLParser):
    """The images, the src/href attributes and the data-key numbers of an HTML page.

    `tagged` lists every (key, text), since a number may be shown twice (macro F1 in the headline and per class);
    `numbers` maps each key to its text.
    """

    def __init__(self):
        super().__init__()
        self.images, self.links, self.tagged, self._open = [], [], [], None

    @property
    def numbers(self) -> dict:
        return dict(self.tagged)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "img":
            self.images.append(attributes)
        self.links += [value for name, value in attrs if name in ("src", "href")]
        if "data-key" in attributes:
            self._open = [attributes["data-key"], ""]
            self.tagged.append(self._open)

    def handle_data(self, data):
        if self._open:
            self._open[1] += data

    def handle_endtag(self, tag):
        self._open = None


def _check_page(path, tree, keys) -> tuple[str, _Page]:
    """(text, parsed) of a written page whose images are all embedded, whose every tagged number shows `tree`'s
    value, and which tags each of `keys`."""
    text = path.read_text()
    parsed = _parse(text)
    assert all(link.startswith("data:image/png;base64,") for link in parsed.links)
    for key, shown in parsed.tagged:
        assert shown == _expected(tree, key), key
    for key in keys:
        assert key in parsed.numbers, key
    return text, parsed


def _parse(text: str) -> _Page:
    parser = _Page()
    parser.feed(text)
    return parser


def _expected(tree, dotted: str) -> str:
    """The value at a data-key path, formatted as report.md formats it."""
    for key in dotted.split("."):
        tree = tree[int(key)] if isinstance(tree, list) else tree[key]
    if tree is None:
        return "n/a"
    return f"{tree:.4f}" if isinstance(tree, float) else str(tree)


def _png(path) -> None:
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(path)
