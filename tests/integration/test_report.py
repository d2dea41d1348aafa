"""The run report (`detflow report`) from the tiny real run, opened in headless Chromium: the numbers shown equal the
run's files, no console message, no network request, a failed gate still renders; and `dvc plots show` draws
offline with the repository's template. Chromium tests skip themselves where the Debian `chromium` is absent."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium (Debian package `chromium`; "
                                    ".ci/run installs it)")
# Chromium's own services (updates, clock, accounts, spelling) call home whatever the page does; the page is judged
# on every other request it makes.
BROWSER_HOSTS = re.compile(r"^https?://([a-z0-9-]+\.)*(google\.com|googleapis\.com|gvt1\.com)/")


def open_in_chromium(page: Path, tmp: Path, screenshot: Path | None = None, height: int = 9000) -> dict[str, Any]:
    """Load ``page`` (every host name unresolvable); the DOM after load, console messages, the URLs the page asked
    the network for (from Chromium's net log) and the wall time."""
    net = tmp / f"net-{time.monotonic_ns()}.json"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           "--disable-background-networking", "--host-resolver-rules=MAP * ~NOTFOUND", "--enable-logging=stderr",
           "--v=0", f"--log-net-log={net}", "--virtual-time-budget=5000", f"--window-size=1280,{height}"]
    cmd += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    t0 = time.perf_counter()
    done = subprocess.run([*cmd, page.resolve().as_uri()], capture_output=True, text=True, timeout=120, cwd=tmp)
    seconds = time.perf_counter() - t0
    assert done.returncode == 0, done.stderr[-2000:]
    urls = set(re.findall(r'"url":"([^"]+)"', net.read_text(errors="replace"))) if net.is_file() else set()
    return {"dom": done.stdout, "seconds": seconds,
            "console": [line for line in done.stderr.splitlines() if ":CONSOLE" in line],
            "requests": sorted(u for u in urls if not u.startswith(("file:", "data:")) and not BROWSER_HOSTS.match(u))}


class Elements(HTMLParser):
    """Elements with an id or data-* attribute, and every src/href, from a DOM dump."""

    def __init__(self) -> None:
        super().__init__()
        self.tagged: list[tuple[str, dict[str, str]]] = []
        self.links: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.add(tag)
        self.links += [a[k] for k in ("src", "href") if k in a]
        if "id" in a or any(k.startswith("data-") for k in a):
            self.tagged.append((tag, a))

    def by_id(self, ident: str) -> dict[str, str]:
        return next(a for _, a in self.tagged if a.get("id") == ident)

    def where(self, **match: str) -> list[dict[str, str]]:
        return [a for _, a in self.tagged if all(a.get(k.replace("_", "-")) == v for k, v in match.items())]


def parse(html: str) -> Elements:
    p = Elements()
    p.feed(html)
    return p


def render(root: Path, reports: Path, models: Path, out: Path, source: Path | None) -> Any:
    from pipeline.config import load_params
    from pipeline.report import ReportInputs, write_report

    inputs = ReportInputs(reports=reports, data=root / "prepared", models=models, lock=REPO / "dvc.lock",
                          bench=root / "no-bench.json", source=source)
    return write_report(inputs, load_params(None, []), out)


@pytest.fixture(scope="module")
def report(exported: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("report") / "report.html"
    t0 = time.perf_counter()
    result = render(exported["root"], exported["reports"], exported["root"] / "models", out, exported["phantom"])
    return {"path": out, "result": result, "seconds": time.perf_counter() - t0, "html": out.read_text()}


def test_report_is_one_self_contained_page(report: dict[str, Any]) -> None:
    html, result = report["html"], report["result"]
    page = parse(html)
    assert result.size_bytes == len(html.encode()) < 3_000_000, result.size_bytes
    assert not {"script", "link", "iframe", "object"} & page.tags  # nothing to fetch, nothing to run
    assert page.links and all(u.startswith(("data:image/", "#")) for u in page.links), page.links
    assert "<svg" in html and html.count("data:image/jpeg;base64,") >= 1
    ids = {a.get("id") for _, a in page.tagged}
    assert {"verdict", "data", "transfer", "evaluation", "generalisation", "deployment", "provenance"} <= ids
    assert page.by_id("no-external")  # no external evaluation in the tiny run: the section says so


def test_the_report_shows_the_evaluators_statistics(exported: dict[str, Path], report: dict[str, Any]) -> None:
    """evaluate owns every statistic: reports/eval/statistics.json holds the per-class intervals and the FROC band
    from the same patient resamples as metrics.json's intervals, and the page shows those numbers."""
    from pipeline.evaluate.metrics import MAX_CASES

    metrics = json.loads((exported["reports"] / "metrics.json").read_text())
    stats = json.loads((exported["reports"] / "eval" / "statistics.json").read_text())
    boot = stats["bootstrap"]
    assert boot["map50"] == metrics["ci95"]["map50"] and boot["cpm"] == metrics["ci95"]["cpm"]
    assert boot["n_resamples"] == metrics["ci95"]["resamples"] and stats["classes"] == ["nodule"]
    assert all(lo <= hi for lo, hi in zip(boot["froc_low"], boot["froc_high"], strict=True))
    (lo, hi), = boot["per_class_ap50"]  # one class: its AP50 interval is the mAP50 interval
    assert [lo, hi] == metrics["ci95"]["map50"]
    cases = stats["cases"]
    assert len(cases["fn"]) <= MAX_CASES and len(cases["fp"]) <= MAX_CASES
    assert all(c["file"].startswith("images/") and len(c["box"]) == 4 for c in cases["fn"] + cases["fp"])
    assert [c["score"] for c in cases["fp"]] == sorted((c["score"] for c in cases["fp"]), reverse=True)
    html = report["html"]
    assert f"[{lo:.3f}, {hi:.3f}]" in html  # the per-class interval, as statistics.json has it


@needs_chromium
def test_chromium_shows_the_run_numbers_without_network(report: dict[str, Any], exported: dict[str, Path],
                                                        tmp_path: Path) -> None:
    seen = open_in_chromium(report["path"], tmp_path)
    assert seen["console"] == [] and seen["requests"] == []
    dom = parse(seen["dom"])
    metrics = json.loads((exported["reports"] / "metrics.json").read_text())
    gate = json.loads((exported["reports"] / "gate.json").read_text())
    assert json.loads(dom.by_id("metric-map50")["data-value"]) == metrics["map50"]
    assert json.loads(dom.by_id("metric-cpm")["data-value"]) == metrics["froc"]["cpm"]
    assert json.loads(dom.by_id("gate-verdict")["data-passed"]) is gate["passed"] is True
    for check in gate["checks"]:
        (row,) = dom.where(data_check=check["name"])
        assert json.loads(row["data-value"]) == check["value"]
        assert json.loads(row["data-threshold"]) == check["threshold"]
        assert json.loads(row["data-passed"]) is check["passed"]
    with (exported["prepared"] / "manifest.csv").open() as f:
        rows = list(csv.DictReader(f))
    for split in ("train", "val", "test"):
        mine = [r for r in rows if r["split"] == split]
        want = {"images": len(mine), "boxes": sum(int(r["n_boxes"]) for r in mine),
                "patients": len({r["patient"] for r in mine})}
        shown = {a["data-count"]: int(a["data-value"]) for a in _cells_of(dom, split)}
        assert shown == want, (split, shown, want)
    for name, row in metrics["per_class"].items():
        (cell,) = dom.where(data_class=name)
        assert json.loads(cell["data-ap50"]) == row["ap50"]


def _cells_of(dom: Elements, split: str) -> list[dict[str, str]]:
    """The count cells that follow the row of ``split`` (in document order, up to the next row)."""
    out, inside = [], False
    for _, a in dom.tagged:
        if "data-split" in a:
            inside = a["data-split"] == split
        elif inside and "data-count" in a:
            out.append(a)
    return out


@needs_chromium
def test_screenshot_of_the_whole_page(report: dict[str, Any], tmp_path: Path) -> None:
    """A full-page screenshot that draws the page (and an empty page's, the peer bench/report_open.py times)."""
    shot = tmp_path / "report.png"
    seen = open_in_chromium(report["path"], tmp_path, screenshot=shot)
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    base = open_in_chromium(blank, tmp_path, screenshot=tmp_path / "blank.png")
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1280, 9000) and len(im.convert("L").getcolors(1 << 16) or []) > 50  # drawn, not blank
    # the opening time against an empty page is a ratio in bench/report_open.py, not a bound here
    print(f"report {report['result'].size_bytes / 1e6:.2f} MB, built in {report['seconds']:.2f} s; chromium "
          f"{seen['seconds']:.2f} s (empty page {base['seconds']:.2f} s); screenshot {shot}")


@needs_chromium
def test_failed_gate_still_renders_with_the_failed_checks(exported: dict[str, Path], tmp_path: Path) -> None:
    """After a failed gate there is no card and no parity report; the page says FAIL and lists the failed checks."""
    from pipeline.config import load_params
    from pipeline.evaluate.gate import evaluate_gate

    reports = tmp_path / "reports"
    shutil.copytree(exported["reports"], reports)
    (reports / "parity.json").unlink(missing_ok=True)
    metrics = json.loads((reports / "metrics.json").read_text())
    strict = load_params(None, ["gate.min_map50=0.99", "gate.min_cpm=0.99", "gate.min_sensitivity_at_1fp=0"]).gate
    gate = evaluate_gate(metrics, strict, None)
    (reports / "gate.json").write_text(json.dumps(gate))
    result = render(exported["root"], reports, tmp_path / "models", tmp_path / "report.html", None)
    assert result.passed is False and result.failed_checks == ["min_map50", "min_cpm"]
    seen = open_in_chromium(tmp_path / "report.html", tmp_path)
    assert seen["console"] == [] and seen["requests"] == []
    dom = parse(seen["dom"])
    assert json.loads(dom.by_id("gate-verdict")["data-passed"]) is False
    assert [a["data-check"] for a in dom.where(data_passed="false") if "data-check" in a] == ["min_map50", "min_cpm"]
    assert "Failed checks: min_map50, min_cpm" in seen["dom"]
    assert "the gate failed, so nothing was exported" in seen["dom"]


@needs_chromium
def test_the_browser_check_sees_console_messages_and_requests(tmp_path: Path) -> None:
    """The detector itself: a page that logs and fetches is caught (so an empty list above means something)."""
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><body><img src="http://example.com/x.png">'
                    '<script>console.error("boom")</script></body></html>')
    seen = open_in_chromium(page, tmp_path)
    assert any('"boom"' in line for line in seen["console"])
    assert "http://example.com/x.png" in seen["requests"]


def test_cli_writes_the_report_and_the_model_copy(exported: dict[str, Path], tmp_path: Path) -> None:
    from pipeline.cli import run

    root = exported["root"]
    out, copy = tmp_path / "r" / "report.html", tmp_path / "m" / "report.html"
    rc = run(["report", "--reports", str(exported["reports"]), "--data", str(exported["prepared"]), "--models",
              str(root / "models"), "--out", str(out), "--model-copy", str(copy), "--lock", str(REPO / "dvc.lock"),
              "--source", str(exported["phantom"])])
    assert rc == 0 and out.read_bytes() == copy.read_bytes() and b"gate-verdict" in out.read_bytes()
    assert run(["report", "--out", str(tmp_path)]) == 1  # a folder where the file goes: one clear line


def test_dvc_template_is_current() -> None:
    pytest.importorskip("vl_convert", reason="needs vl-convert-python (the train extra)")
    from pipeline.report.dvc_template import TEMPLATE, main

    assert main(["--check", "--out", str(REPO / TEMPLATE)]) == 0
    assert "plots/offline.html" in (REPO / ".dvc" / "config").read_text()


@needs_chromium
def test_dvc_plots_show_draws_offline(exported: dict[str, Path], tmp_path: Path) -> None:
    """`dvc plots show` in a repository configured like this one writes a page whose plots draw with no network."""
    repo = tmp_path / "repo"
    repo.mkdir()
    env_run = {"cwd": repo, "check": True, "capture_output": True, "text": True, "timeout": 120}
    subprocess.run(["git", "init", "-q"], **env_run)
    subprocess.run(["dvc", "init", "-q"], **env_run)
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(REPO / ".dvc" / "plots", repo / ".dvc" / "plots")
    subprocess.run(["dvc", "config", "plots.html_template", "plots/offline.html"], **env_run)
    shutil.copytree(exported["reports"], repo / "reports")
    subprocess.run(["dvc", "plots", "show", "-o", "plots_out"], **env_run)
    page = repo / "plots_out" / "index.html"
    assert "cdn.jsdelivr" not in page.read_text()
    seen = open_in_chromium(page, tmp_path, height=1400)
    assert seen["requests"] == []
    errors = [line for line in seen["console"] if "Error" in line or "error" in line]
    assert errors == []
    n_plots = len(re.findall(r'<div id = "', page.read_text()))
    assert seen["dom"].count('class="marks"') >= n_plots - 1 > 0  # every Vega plot drew its canvas
    open_in_chromium(page, tmp_path, screenshot=tmp_path / "dvc_plots.png", height=1400)


def test_site_adaptation_curve_of_an_external_set(exported: dict[str, Path], tmp_path: Path) -> None:
    """bench/site_adaptation.py's result beside an external set's metrics: the section shows every K and recipe
    with the file's numbers, and the curve."""
    reports = tmp_path / "reports"
    shutil.copytree(exported["reports"], reports)
    site = reports / "external" / "lab2"
    site.mkdir(parents=True)
    (site / "metrics.json").write_text(json.dumps({"map50": 0.7, "ci95": {"map50": [0.6, 0.8]}, "n_images": 30,
                                                   "per_class": {"nodule": {"ap50": 0.7}}}))
    rows = [{"k": None, "recipe": "source model, unadapted", "map50": 0.70, "ci95": [0.6, 0.8]},
            {"k": 0, "recipe": "label-free", "map50": 0.75, "ci95": [0.65, 0.85],
             "adaptation": {"method": "object_scale", "input_scale": 0.6154, "changed": True}}]
    rows += [{"k": k, "recipe": r, "map50": 0.75 + k / 100 + (0.01 if r == "fine_tune" else 0),
              "ci95": [0.7, 0.95]} for r in ("feature_extraction", "fine_tune") for k in (5, 10, 20)]
    (site / "site_adaptation.json").write_text(json.dumps({"rows": rows, "n_scored": 30, "n_labelled": 50,
                                                           "shots": [5, 10, 20]}))
    out = tmp_path / "report.html"
    render(exported["root"], reports, exported["root"] / "models", out, None)
    html = out.read_text()
    table = parse(html).where(data_external="lab2")
    shown = [(json.loads(a["data-k"]), a["data-recipe"], json.loads(a["data-value"]))
             for _, a in parse(html).tagged if "data-recipe" in a]
    assert table and shown == [(r["k"], r["recipe"], r["map50"]) for r in rows]
    assert "mAP50 on the 30 labelled images of the site that no fine-tuning used (of 50)" in html
    assert "Few-shot curve" in html and "input scale 0.615" in html
