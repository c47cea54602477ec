"""The report of a finished run: numbers from metrics.json, a self-contained HTML page that a browser renders
cleanly at desktop and phone widths."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from conftest import tiny_digits_recipe
from test_cli import assert_one_line_error, distill

from distill.evaluate import calibration, disagreements
from distill.report.plots import smooth
from distill.report.sections import card_tiles, flatten
from distill.tasks import parse_recipe
from distill.tasks import report as write_report
from distill.tasks.classifier import run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium (make test installs it when run as root)"
)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):  # one run serves every test here
    out = tmp_path_factory.mktemp("report") / "run"
    run(parse_recipe(tiny_digits_recipe()), out)
    return out


def test_report_states_measured_numbers_for_every_model(finished_run):
    metrics = json.loads((finished_run / "metrics.json").read_text())
    models = metrics["models"]
    assert list(models) == ["teacher", "baseline", "student", "student_int8"]
    markdown = (finished_run / "REPORT.md").read_text()
    page = (finished_run / "report.html").read_text()
    for name in ("student, distilled", "student, distilled, int8", "student, hard labels only"):
        assert f"| {name} |" in markdown and f"<td class=left>{name}</td>" in page
    t, s = models["teacher"], models["student"]
    ratio = f"{t['parameters'] / s['parameters']:.1f}× smaller"
    assert ratio in markdown and ratio in page
    assert f"{s['test_errors']} test errors" in markdown
    # Self-contained: figures inline as SVG, thumbnails as data: URIs, nothing fetched.
    assert page.count("<svg") == 3  # size/speed/quality, curves, calibration
    assert not re.search(r"(src|href)=\"(https?:|//)", page)
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'<img[^>]* src="([^"]*)"', page))


def test_report_shows_settings_machine_exports_and_disagreements(finished_run):
    metrics = json.loads((finished_run / "metrics.json").read_text())
    page = (finished_run / "report.html").read_text()
    # The settings as tables, not a JSON string.
    assert "<td class=left>temperature</td><td>3.0</td>" in page and '{"temperature"' not in page
    assert "<td class=left>student.train.lr</td>" in page
    for key in ("torch", "transformers", "command", "python"):
        assert f"<td class=left>{key}</td>" in page
    # The int8 export the run made: linked, with its size and its check.
    record = json.loads((finished_run / "exports" / "int8.json").read_text())
    assert 'href="exports/int8/' in page and f"top-1 agreement {record['top1_agreement']:.2%}" in page
    where = metrics["disagreements"]
    assert f"differs from the teacher's on {where['count']:,} of {where['of']:,}" in html.unescape(page)
    assert page.count("<img ") == len(where["examples"])  # one thumbnail per example shown
    assert set(metrics["calibration"]) == {"teacher", "baseline", "student", "student_int8"}
    assert "ECE" in page and "Where the student disagrees with the teacher" in page


PROBE = """<script>
window.addEventListener('load', () => {
  const width = document.documentElement.getBoundingClientRect().width;
  const scrolls = el => el.closest('.scroll');
  const overflow = [...document.body.querySelectorAll('*')].filter(el => {
    if (scrolls(el) && !el.classList.contains('scroll')) return false;  // a wide table scrolls inside its box
    const r = el.getBoundingClientRect();
    return r.width > 0 && (r.right > width + 1 || r.left < -1);
  }).map(el => el.tagName + '.' + el.className.baseVal + el.className);
  const overlaps = [];
  document.querySelectorAll('svg').forEach(svg => {
    const labels = [...svg.querySelectorAll('text')].filter(t => t.textContent.trim())
      .map(t => [t.textContent.trim(), t.getBoundingClientRect()]);
    labels.forEach(([a, p], i) => labels.slice(i + 1).forEach(([b, q]) => {
      const x = Math.min(p.right, q.right) - Math.max(p.left, q.left);
      const y = Math.min(p.bottom, q.bottom) - Math.max(p.top, q.top);
      if (x > 1 && y > 1) overlaps.push(a + ' / ' + b);
    }));
  });
  const images = [...document.images].map(i => i.complete && i.naturalWidth > 0);
  const out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = JSON.stringify({width, page: document.body.scrollWidth, overflow, overlaps, images,
                                    svgs: document.querySelectorAll('svg').length});
  document.body.appendChild(out);
});
</script>"""


def chromium(*args: str) -> subprocess.CompletedProcess:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", *args]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@needs_chromium
@pytest.mark.parametrize("width", [1280, 390])  # desktop, phone
def test_report_html_renders_cleanly_in_headless_chromium(finished_run, tmp_path, width):
    # Headless Chromium keeps windows at least 500 px wide: the page itself is held to the phone's width.
    held = f"<style>html{{width:{width}px}}</style></head>"
    page = (finished_run / "report.html").read_text().replace("</head>", held)
    checked = finished_run / f"checked-{width}.html"  # beside the report: its relative links resolve
    checked.write_text(page.replace("</body>", PROBE + "</body>"))
    done = chromium(f"--window-size={max(width, 500)},900", "--dump-dom", checked.as_uri())
    probe = json.loads(html.unescape(re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.S).group(1)))
    assert probe["svgs"] == 3 and probe["images"] and all(probe["images"]), probe  # every image decoded
    assert probe["page"] <= probe["width"] and probe["overflow"] == [], probe  # nothing wider than the page
    assert probe["overlaps"] == [], probe  # no two plot labels on top of each other
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == []
    shot = tmp_path / f"report-{width}.png"
    shown = finished_run / f"shown-{width}.html"
    shown.write_text(page)
    chromium(f"--window-size={max(width, 500)},2400", f"--screenshot={shot}", shown.as_uri())
    assert shot.stat().st_size > 20_000  # a page, not a blank


def test_report_rewrites_from_metrics(finished_run):
    (finished_run / "report.html").unlink()
    write_report(finished_run)
    assert (finished_run / "report.html").stat().st_size > 10_000


def test_calibration_matches_a_float64_reference():
    generator = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(500, 4, generator=generator) * 2, torch.randint(0, 4, (500,), generator=generator)
    got = calibration(logits, labels, bins=10)
    p = np.exp(logits.double().numpy())
    p /= p.sum(1, keepdims=True)
    confidence, correct = p.max(1), (p.argmax(1) == labels.numpy())
    ece = 0.0
    for b in range(10):
        inside = (confidence >= b / 10) & (confidence < (b + 1) / 10) if b < 9 else confidence >= 0.9
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    assert got["ece"] == pytest.approx(ece, abs=1e-6)
    assert sum(n for _, _, n in got["bins"]) == 500


def test_disagreements_count_pairs_and_rank_examples():
    teacher = torch.tensor([[5.0, 0, 0], [5, 0, 0], [0, 5, 0], [0, 0, 5], [5, 0, 0]])
    student = torch.tensor([[0.0, 5, 0], [0, 1, 0], [0, 5, 0], [5, 0, 0], [5, 0, 0]])
    got = disagreements(teacher, student, torch.tensor([0, 0, 1, 2, 0]), top=2)
    assert got["count"] == 3 and got["of"] == 5
    assert got["pairs"][0] == [0, 1, 2] and [2, 0, 1] in got["pairs"]
    assert [e["index"] for e in got["examples"]][0] in (0, 3)  # the most different pairs first; 1 is milder
    assert 1 not in [e["index"] for e in got["examples"]]


def test_card_tiles_and_smoothing():
    from distill.report import Quality

    models = {
        "teacher": {"parameters": 1000, "latency_ms_batch1": 2.0, "test_accuracy": 0.9, "test_errors": 10},
        "baseline": {"parameters": 100, "latency_ms_batch1": 0.5, "test_accuracy": 0.8, "test_errors": 20},
        "student": {"parameters": 100, "latency_ms_batch1": 0.5, "test_accuracy": 0.88, "test_errors": 12},
    }
    tiles = dict(card_tiles(models, Quality("test_errors", "test errors")))
    assert "10.0× smaller" in tiles and "4.0× faster" in tiles and "97.8%" in tiles and "40% better" in tiles
    assert smooth([3.0, 3.0, 3.0]) == pytest.approx([3.0, 3.0, 3.0])  # bias-corrected: no pull toward zero
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == [["a.b", "1"], ["a.c", "1, 2"], ["d", "—"]]


def test_compare_puts_runs_side_by_side(finished_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(finished_run, other)
    recipe = (other / "recipe.yaml").read_text()
    (other / "recipe.yaml").write_text(recipe.replace("temperature: 3.0", "temperature: 5.0"))
    result = distill("compare", finished_run, other, "--out", tmp_path / "cmp")
    assert result.returncode == 0, result.stderr
    page = (tmp_path / "cmp" / "compare.html").read_text()
    markdown = (tmp_path / "cmp" / "COMPARE.md").read_text()
    errors = json.loads((other / "metrics.json").read_text())["models"]["student"]["test_errors"]
    assert markdown.count("| student, distilled |") == 2 and f"| {errors} |" in markdown
    assert "Settings that differ" in markdown and "| distill.temperature |" in markdown
    assert "<svg" in page and (tmp_path / "cmp" / "compare.png").exists()
    missing = distill("compare", finished_run, tmp_path / "nothing")
    assert_one_line_error(missing, "has no metrics.json")


def test_markdown_shows_data_as_text_not_html(finished_run, tmp_path):
    """Class names, text snippets, prompts and generations come from the data: REPORT.md escapes them as report.html
    does, and a | in a cell does not split it."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    classes = ["<b>zero</b>", "one|two", "R&D", "<img src=x onerror=alert(1)>", *map(str, range(4, 10))]
    where = metrics["disagreements"]
    where["classes"], where["pairs"] = classes, [[0, 1, 5], [2, 3, 4]]
    where["examples"] = [{"index": 0, "label": 3, "distance": 0.5, "text": "<script>alert(1)</script> & more",
                          "teacher": [[0, 0.9]], "student": [[1, 0.8]]}]  # fmt: skip
    generated = {"greedy": "<em>", "sampled": "x"}
    metrics["generations"] = [{"prompt": "<i>once</i>", "reference": "a | b <u>", "student": generated}]
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    write_report(run_dir)
    markdown = (run_dir / "REPORT.md").read_text()
    page = (run_dir / "report.html").read_text()
    for raw in ("<b>", "<img", "<script", "<i>", "<u>", "<em>"):
        assert raw not in markdown
    for raw in ("<b>zero", "<img", "<script", "<i>once", "<u>", "<em>"):
        assert raw not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in markdown and "R&amp;D" in markdown
    pairs = [line for line in markdown.splitlines() if "&lt;b&gt;zero&lt;/b&gt;" in line and line.startswith("|")]
    assert pairs == ["| &lt;b&gt;zero&lt;/b&gt; | one\\|two | 5 |"]  # three cells, the | kept inside one
    assert "| reference | a \\| b &lt;u&gt; |" in markdown


def test_compare_draws_run_names_with_dollar_signs_as_written(finished_run, tmp_path):
    from distill.tasks import compare_runs

    names = ["cost$5-$10", "lr$\\foo$"]  # mathtext would set the first in italics and fail to parse the second
    for name in names:
        shutil.copytree(finished_run, tmp_path / name)
    compare_runs([tmp_path / name for name in names], tmp_path / "cmp")
    svg = html.unescape((tmp_path / "cmp" / "compare.html").read_text())
    markdown = (tmp_path / "cmp" / "COMPARE.md").read_text()
    for name in names:
        assert f"{name}: student, distilled" in svg and f"| {name} |" in markdown
