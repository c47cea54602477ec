"""The report of a finished run: numbers from metrics.json, a self-contained HTML page that renders."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from distill.tasks import parse_recipe
from distill.tasks import report as write_report
from distill.tasks.classifier import run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture
def finished_run(tmp_path, tiny_recipe):
    run(parse_recipe(tiny_recipe), tmp_path / "run")
    return tmp_path / "run"


def test_report_states_measured_numbers_for_every_model(finished_run):
    metrics = json.loads((finished_run / "metrics.json").read_text())
    models = metrics["models"]
    assert list(models) == ["teacher", "baseline", "student", "student_int8"]
    markdown = (finished_run / "REPORT.md").read_text()
    page = (finished_run / "report.html").read_text()
    for name in ("student, distilled", "student, distilled, int8", "student, hard labels only"):
        assert f"| {name} |" in markdown and f"<td>{name}</td>" in page
    t, s = models["teacher"], models["student"]
    ratio = f"{t['parameters'] / s['parameters']:.1f}× smaller"
    assert ratio in markdown and ratio in page
    assert f"{s['test_errors']} test errors" in markdown
    # Self-contained: every image is embedded, nothing is fetched.
    assert 'src="data:image/png;base64,' in page and not re.search(r"(src|href)=\"(https?:|//|[^d\"][^:]*\.png)", page)
    assert page.count("<img ") == 2


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make test installs it when run as root)")
def test_report_html_renders_in_headless_chromium(finished_run, tmp_path):
    page = (finished_run / "report.html").read_text()
    # A probe appended to a copy: after load it records whether every image decoded.
    probe = (
        "<script>window.addEventListener('load',()=>{document.body.dataset.images="
        "[...document.images].map(i=>i.complete&&i.naturalWidth>0).join(',')})</script>"
    )
    checked = tmp_path / "checked.html"
    checked.write_text(page.replace("</body>", probe + "</body>"))
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=5000", "--dump-dom", checked.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    images = re.search(r'data-images="([^"]*)"', done.stdout)
    assert images and images.group(1) == "true,true", done.stdout[:500]
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == []


def test_report_rewrites_from_metrics(finished_run):
    (finished_run / "report.html").unlink()
    write_report(finished_run)
    assert (finished_run / "report.html").stat().st_size > 10_000
