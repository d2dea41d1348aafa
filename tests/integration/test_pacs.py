"""`detflow pacs run` against a real Orthanc (Debian `orthanc` + `orthanc-dicomweb`) started on a free loopback port
by each test and stopped by its PID: QIDO-RS, WADO-RS, the engine, the SR writer, STOW-RS and the ledger, end to end;
the reports read back from Orthanc and checked by dciodvfy and dsrdump; kills at random points; bad inputs.

CI installs orthanc, orthanc-dicomweb, dcmtk and dicom3tools (.ci/run); the tests skip, saying so, only where they
are absent."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from helpers import REPO
from helpers.dicom import SECRET_ID, SECRET_NAME, air, copy_series, corrupt_copy, pdf_study, pixel_model

from pipeline.config import PhantomParams
from pipeline.data.phantom import generate_phantom
from pipeline.dicom.sr import read_regions, read_summary
from pipeline.pacs.orthanc import LocalOrthanc, free_port, missing_tools

BIN = Path(sys.executable).parent
MISSING = missing_tools() + [t for t in ("dciodvfy", "dsrdump") if shutil.which(t) is None]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"not installed: {', '.join(MISSING)} (apt-get install "
                                "orthanc orthanc-dicomweb dcmtk dicom3tools; .ci/run does)")
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def orthanc(tmp_path: Path) -> Any:
    with LocalOrthanc(tmp_path / "orthanc") as pacs:
        yield pacs


@pytest.fixture(scope="module")
def models(exported: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny trained export (TINY_EXPORT) and a pixel-following graph under its card (tests/helpers/dicom.py)."""
    card = json.loads(exported["card"].read_text())
    return {"trained": exported["onnx"], "pixel": pixel_model(tmp_path_factory.mktemp("pixel-model"), card)}


@pytest.fixture(scope="module")
def data(small_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """The phantom test series (6 CT series), 2 site-B series (0.5 mm pixels: the spacing-aware letterbox), an
    air-only copy of a series (no findings), an MR copy, a series with a corrupt instance, a document-only study."""
    root = tmp_path_factory.mktemp("pacs-data")
    site_b = root / "site_b"
    generate_phantom(PhantomParams(patients=2, slices=2, seed=11, pixel_spacing=0.5, empty_fraction=0.0), site_b,
                     progress=False)
    series = sorted((small_phantom / "dicom").iterdir())
    first = sorted(series[0].glob("*.dcm"))
    broken = copy_series(sorted(series[1].glob("*.dcm")), root / "broken", "broken")
    return {
        "phantom": sorted((small_phantom / "dicom").rglob("*.dcm")),
        "site_b": sorted((site_b / "dicom").rglob("*.dcm")),
        "air": copy_series(first, root / "air", "air", pixels=air),
        "mr": copy_series(first, root / "mr", "mr", modality="MR", sop_class=MR_IMAGE_STORAGE),
        "broken": [*broken, corrupt_copy(broken[0], root / "broken" / "099.dcm", "broken")],
        "secret": copy_series(first[:2], root / "secret", "secret", patient=(SECRET_NAME, SECRET_ID)),
        "pdf": [pdf_study(root / "pdf" / "doc.dcm", "pdf")],
    }


def detflow(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DETFLOW_PACS_")}
    return subprocess.run([str(BIN / "detflow"), *args], capture_output=True, text=True, timeout=timeout,
                          env={**base, "DETFLOW_NO_PROGRESS": "1", **(env or {})})


def pacs_run(pacs: LocalOrthanc, model: Path, work: Path, *extra: str, env: dict[str, str] | None = None,
             url: str | None = None) -> subprocess.CompletedProcess:
    return detflow("pacs", "run", "--url", url or pacs.dicomweb, "--model", str(model), "--work", str(work), *extra,
                   env=env)


def study_of(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def reports(pacs: LocalOrthanc) -> list[pydicom.Dataset]:
    """Every SR Orthanc holds, read back over DICOMweb (QIDO-RS + WADO-RS)."""
    from pipeline.pacs.client import Credentials, Pacs, tag_value

    client = Pacs(pacs.dicomweb, Credentials(user=next(iter(pacs.users), None),
                                             password=next(iter(pacs.users.values()), None)))
    out = []
    for study in client.studies():
        study_uid = tag_value(study, "StudyInstanceUID")
        for se in client.series(study_uid):
            if tag_value(se, "Modality") == "SR":
                for inst in client.instances(study_uid, tag_value(se, "SeriesInstanceUID")):
                    out.append(client.retrieve(study_uid, tag_value(se, "SeriesInstanceUID"),
                                               tag_value(inst, "SOPInstanceUID")))
    return out


def source_series(sr: pydicom.Dataset) -> str:
    (ref,) = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    return str(ref.SeriesInstanceUID)


def engine_boxes(model: Path, files: list[Path]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """SOP Instance UID -> (boxes, scores) of the in-process engine on the files from disk."""
    from pipeline.infer.engine import OnnxDetector

    detector = OnnxDetector(model, providers="CPUExecutionProvider")
    out = {}
    for f in files:
        d = detector.predict([detector.decode(f).rgb])[0]
        out[str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)] = (d.boxes, d.scores)
    return out


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    r = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (r.stdout + r.stderr).splitlines()
    return [x for x in lines if x.startswith("Error")], [x for x in lines if x.startswith("Warning")]


# ---------------------------------------------------------------------------------------------- acceptance 1


@pytest.mark.slow
def test_round_trip_reports_validate_and_hold_the_engines_boxes(orthanc: LocalOrthanc, models: dict[str, Path],
                                                                data: dict[str, list[Path]], tmp_path: Path) -> None:
    files = data["phantom"] + data["site_b"] + data["air"]
    orthanc.upload(files)
    for name in ("pixel", "trained"):
        r = pacs_run(orthanc, models[name], tmp_path / "work")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "9 series processed (32 images" in r.stdout, r.stdout  # 6 + 2 site B + 1 air; 24 + 4 + 4 images
    all_reports = reports(orthanc)
    assert len(all_reports) == 18  # one per series and model
    checked_empty = checked_findings = 0
    for name, model in models.items():
        sha = json.loads(model.with_name("model_card.json").read_text())["sha256"]
        mine = [sr for sr in all_reports if f"model sha256 {sha}" in json.dumps(sr.to_json_dict())]
        assert len(mine) == 9 and len({source_series(sr) for sr in mine}) == 9
        expected = engine_boxes(model, files)
        for sr in mine:
            path = tmp_path / f"{name}-{sr.SOPInstanceUID}.dcm"
            sr.save_as(path, enforce_file_format=True)
            errors, warnings = dciodvfy(path)
            assert errors == [] and warnings == [], errors + warnings  # 0 errors, 0 warnings (SCT codes only)
            dump = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60)
            assert dump.returncode == 0 and "Imaging Measurement Report" in dump.stdout
            regions = read_regions(sr)
            evidence = {str(i.ReferencedSOPInstanceUID) for s in sr.CurrentRequestedProcedureEvidenceSequence
                        for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
            want = sum(len(expected[sop][1]) for sop in evidence)
            assert len(regions) == want
            for reg in regions:
                boxes, scores = expected[reg.sop_instance_uid]
                i = int(np.argmin(np.abs(scores - reg.score) + np.abs(boxes - reg.box).max(axis=1)))
                assert np.abs(boxes[i] - np.asarray(reg.box)).max() < 1e-3  # source pixel coordinates
                assert abs(scores[i] - reg.score) < 1e-6 and reg.finding == ("27925004", "SCT", "Nodule")
            summary = read_summary(sr)
            assert summary == {"Nodule": "Present" if want else "Absent"}
            checked_findings += bool(want)
            checked_empty += not want
    assert checked_empty == 1 and checked_findings == 17  # the air series under the pixel model has no finding
    # site B (0.5 mm) went through the spacing-aware letterbox, and the reports hold those boxes: a spacing-blind
    # engine boxes the same pixels elsewhere
    from pipeline.infer.engine import OnnxDetector
    from pipeline.infer.processing import InputScaling

    blind = OnnxDetector(models["pixel"], providers="CPUExecutionProvider")
    blind.scaling = InputScaling()
    aware = engine_boxes(models["pixel"], data["site_b"][:1])
    b = blind.predict([blind.decode(data["site_b"][0]).rgb])[0].boxes
    assert len(b) != len(next(iter(aware.values()))[0]) or np.abs(b - next(iter(aware.values()))[0]).max() > 1
    before = orthanc.count_instances()
    again = pacs_run(orthanc, models["pixel"], tmp_path / "work")
    assert again.returncode == 0 and "0 series processed" in again.stdout and "9 done" in again.stdout, again.stdout
    assert orthanc.count_instances() == before  # a second run stores nothing new


def test_kill_between_store_and_ledger_files_no_second_report(orthanc: LocalOrthanc, models: dict[str, Path],
                                                              data: dict[str, list[Path]], tmp_path: Path) -> None:
    """The window a SIGKILL can hit: the PACS holds the report, the ledger has no row (deleted here). The rerun
    finds the report by its deterministic UID and stores nothing."""
    orthanc.upload(data["air"] + data["site_b"])
    assert pacs_run(orthanc, models["pixel"], tmp_path / "work").returncode == 0
    before = orthanc.count_instances()
    for f in (tmp_path / "work").glob("ledger.sqlite*"):
        f.unlink()
    r = pacs_run(orthanc, models["pixel"], tmp_path / "work")
    assert r.returncode == 0 and "3 found_in_pacs" in r.stdout, r.stdout + r.stderr
    assert orthanc.count_instances() == before
    with sqlite3.connect(tmp_path / "work" / "ledger.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM series WHERE how = 'found'").fetchone()[0] == 3


# ---------------------------------------------------------------------------------------------- acceptance 2


@pytest.mark.slow
def test_sigkill_at_three_random_points_then_one_report_per_series(orthanc: LocalOrthanc, models: dict[str, Path],
                                                                   data: dict[str, list[Path]],
                                                                   tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("DETFLOW_TEST_SEED", "23")))
    extra = root_phantom(tmp_path / "more", patients=10)
    files = data["phantom"] + data["site_b"] + extra
    orthanc.upload(files)
    n_series = len({pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID for f in files})
    work = tmp_path / "work"
    args = [str(BIN / "detflow"), "pacs", "run", "--url", orthanc.dicomweb, "--model", str(models["trained"]),
            "--work", str(work), "--quiet"]
    ledger = work / "ledger.sqlite"

    def finished() -> int:
        try:
            with sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=1) as db:
                return int(db.execute("SELECT COUNT(*) FROM series").fetchone()[0])
        except sqlite3.Error:
            return 0

    def stored() -> int:
        return len(orthanc.instances("SR"))

    # 1: a random moment early on; 2: after a random number of finished series; 3: the moment Orthanc holds a
    # report the ledger does not list yet (the STOW-then-ledger window), or the closest poll to it
    kills = []
    for point in range(3):
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                env={**os.environ, "DETFLOW_NO_PROGRESS": "1"})
        base_done, base_stored = finished(), stored()
        deadline = time.monotonic() + 300
        if point == 0:  # a random moment soon after the run has opened its ledger (a fixed sleep outlived quick runs)
            while proc.poll() is None and not ledger.exists() and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.3))
        else:
            target = base_done + (rng.randint(1, 3) if point == 1 else 0)
            while proc.poll() is None and time.monotonic() < deadline:
                if (point == 1 and finished() >= target) or (point == 2 and stored() > max(base_stored, finished())):
                    break
                time.sleep(0.005)
            if point == 1:
                time.sleep(rng.uniform(0.0, 0.3))
        assert proc.poll() is None, f"run {point} finished before its kill point: {proc.communicate()}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills.append((finished(), stored()))
    print(f"series {n_series}; (finished in the ledger, reports in Orthanc) after each kill: {kills}")
    assert kills[-1][0] < n_series  # the last kill still left work to do
    r = subprocess.run(args, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "DETFLOW_NO_PROGRESS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    per_series = Counter(source_series(sr) for sr in reports(orthanc))
    assert len(per_series) == n_series and set(per_series.values()) == {1}, (kills, per_series)
    with sqlite3.connect(ledger) as db:
        assert db.execute("SELECT COUNT(*) FROM series").fetchone()[0] == n_series


def root_phantom(folder: Path, patients: int) -> list[Path]:
    generate_phantom(PhantomParams(patients=patients, slices=2, seed=29, size=128), folder, progress=False)
    return sorted((folder / "dicom").rglob("*.dcm"))


# ---------------------------------------------------------------------------------------------- acceptance 3


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and "Traceback" not in r.stderr, r.stdout + r.stderr
    return errors[0]


def test_pacs_down_is_retried_then_fails_with_one_line(models: dict[str, Path], tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    start = time.monotonic()
    r = detflow("pacs", "run", "--url", f"http://127.0.0.1:{port}/dicom-web", "--model", str(models["pixel"]),
                "--work", str(tmp_path / "work"), "--retries", "2")
    waited = time.monotonic() - start
    line = _one_error_line(r)
    assert f"cannot reach the PACS at http://127.0.0.1:{port}" in line and "connection refused" in line
    assert "(3 attempts over" in line and waited >= 1.0  # urllib3 back-off 0 s, then 1 s
    assert r.stderr.count("\n") == 1  # nothing else on stderr


def test_refused_credentials_fail_with_one_line_and_good_ones_work(models: dict[str, Path],
                                                                  data: dict[str, list[Path]],
                                                                  tmp_path: Path) -> None:
    with LocalOrthanc(tmp_path / "auth", users={"detflow": "s3cret"}) as pacs:
        pacs.upload(data["air"])
        for env in ({}, {"DETFLOW_PACS_USER": "detflow", "DETFLOW_PACS_PASSWORD": "wrong"},
                    {"DETFLOW_PACS_TOKEN": "not-a-token-orthanc-knows"}):
            line = _one_error_line(pacs_run(pacs, models["pixel"], tmp_path / "work", env=env))
            assert "refused the credentials" in line and "HTTP 401" in line and "s3cret" not in line
        assert pacs.instances("SR") == []
        ok = pacs_run(pacs, models["pixel"], tmp_path / "work",
                      env={"DETFLOW_PACS_USER": "detflow", "DETFLOW_PACS_PASSWORD": "s3cret"})
        assert ok.returncode == 0 and "1 series processed" in ok.stdout, ok.stdout + ok.stderr
        both = pacs_run(pacs, models["pixel"], tmp_path / "work",
                        env={"DETFLOW_PACS_USER": "detflow", "DETFLOW_PACS_PASSWORD": "s3cret",
                             "DETFLOW_PACS_TOKEN": "x"})
        assert "choose bearer or basic" in _one_error_line(both)
    with_creds = detflow("pacs", "run", "--url", "http://u:p@127.0.0.1:1/dicom-web", "--model", str(models["pixel"]))
    assert "must not hold credentials" in _one_error_line(with_creds)


def test_corrupt_instance_fails_its_series_only(orthanc: LocalOrthanc, models: dict[str, Path],
                                                data: dict[str, list[Path]], tmp_path: Path) -> None:
    """A study with a good series and a series holding a corrupt instance: the good one gets its report, the other
    none (its 4 good slices were read, but a report must cover the series), recorded in the ledger; rc 1."""
    good = copy_series(data["phantom"][:2], tmp_path / "good", "good-in-broken-study")
    study = study_of(data["broken"])
    patient = pydicom.dcmread(data["broken"][0], stop_before_pixels=True)
    for f in good:  # into the broken series' study (same patient: Orthanc keys a study by patient and UID)
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.PatientID, ds.PatientName = study, patient.PatientID, patient.PatientName
        ds.save_as(f, enforce_file_format=True)
    orthanc.upload(data["broken"] + good)
    r = pacs_run(orthanc, models["pixel"], tmp_path / "work", "--study", study)
    line = _one_error_line(r)
    assert "1 series failed" in line and "the next run retries them" in line, r.stdout + r.stderr
    assert "1 series processed" in r.stdout and "failed: 1 unreadable_instance" in r.stdout, r.stdout
    assert "1 of 5 instance(s) could not be read (1 corrupt_dicom); no report stored" in r.stderr
    (sr,) = reports(orthanc)  # nothing half-stored: only the good series' report
    assert source_series(sr) == str(pydicom.dcmread(good[0]).SeriesInstanceUID)
    with sqlite3.connect(tmp_path / "work" / "ledger.sqlite") as db:
        kinds = [k for (k,) in db.execute("SELECT kind FROM problems WHERE sop_uid IS NOT NULL")]
    assert kinds == ["corrupt_dicom"]
    again = pacs_run(orthanc, models["pixel"], tmp_path / "work", "--study", study)
    assert "1 series failed" in _one_error_line(again) and "1 done" in again.stdout  # retried, still broken


def test_series_stream_falls_back_to_one_instance_at_a_time(orthanc: LocalOrthanc, models: dict[str, Path],
                                                            data: dict[str, list[Path]], tmp_path: Path) -> None:
    """Each series comes in one streamed WADO-RS request; when that stream stops early (a part that does not parse)
    the instances it did not deliver are retrieved one by one and the reports are the same; an instance deleted
    after QIDO-RS listed it is recorded as instance_gone and fails its series only."""
    from pipeline.infer.engine import OnnxDetector
    from pipeline.pacs.client import Credentials, Pacs, PacsError, tag_value
    from pipeline.pacs.ledger import Ledger
    from pipeline.pacs.run import PacsRunner

    orthanc.upload(data["phantom"])
    n_files = len(data["phantom"])

    class Observed(Pacs):
        """The real client over the real Orthanc; counts single retrieves, can cut a stream or delete an instance
        between listing and retrieving, as a second user of the PACS would."""

        def __init__(self, stop_after: int | None = None, delete_listed: bool = False) -> None:
            super().__init__(orthanc.dicomweb, Credentials())
            self.stop_after, self.delete_listed, self.alone, self.deleted = stop_after, delete_listed, 0, []

        def instances(self, study: str, series: str) -> list[dict[str, Any]]:
            listed = super().instances(study, series)
            if self.delete_listed and not self.deleted:
                sop = tag_value(listed[-1], "SOPInstanceUID")
                (gone,) = [i for i in orthanc.instances() if i["MainDicomTags"]["SOPInstanceUID"] == sop]
                orthanc._request("DELETE", f"/instances/{gone['ID']}")
                self.deleted.append(series)
            return listed

        def iter_series(self, study: str, series: str) -> Any:
            for i, ds in enumerate(super().iter_series(study, series)):
                if i == self.stop_after:
                    raise PacsError("a part that does not parse")
                yield ds

        def retrieve(self, study: str, series: str, sop: str) -> Any:
            self.alone += 1
            return super().retrieve(study, series, sop)

    detector = OnnxDetector(models["pixel"], providers="CPUExecutionProvider")

    def run(pacs: Observed, work: Path) -> tuple[Any, set[tuple[str, tuple[float, ...]]]]:
        with Ledger(work) as ledger:
            runner = PacsRunner(pacs, detector, ledger, workers=2, force=True)
            summary = runner.run(*runner.find_series())
        regions = {(r.sop_instance_uid, tuple(round(v, 3) for v in r.box)) for sr in reports(orthanc)
                   for r in read_regions(sr)}
        for sr in orthanc.instances("SR"):
            orthanc._request("DELETE", f"/instances/{sr['ID']}")
        return summary, regions

    streamed = Observed()
    a, regions_a = run(streamed, tmp_path / "a")
    assert streamed.alone == 0 and not a.of("failed") and a.n_images == n_files  # one request per series
    assert regions_a, "the pixel model finds the phantom's lesions"
    cut = Observed(stop_after=1)
    b, regions_b = run(cut, tmp_path / "b")
    n_series = len(a.of("processed"))
    assert cut.alone == n_files - n_series and b.n_images == n_files and not b.of("failed")
    assert regions_b == regions_a
    deleting = Observed(delete_listed=True)
    c, _ = run(deleting, tmp_path / "c")
    (failed,) = c.of("failed")
    assert failed.ref.series == deleting.deleted[0] and "1 instance_gone" in failed.detail
    assert len(c.of("processed")) == n_series - 1


def test_document_only_study_is_skipped_and_counted(orthanc: LocalOrthanc, models: dict[str, Path],
                                                    data: dict[str, list[Path]], tmp_path: Path) -> None:
    orthanc.upload(data["pdf"] + data["air"])
    alone = pacs_run(orthanc, models["pixel"], tmp_path / "work", "--study", study_of(data["pdf"]))
    assert "nothing to analyse" in _one_error_line(alone)
    assert "1 studies (1 without images)" in alone.stdout and "skipped: 1 non_image" in alone.stdout
    missing = pacs_run(orthanc, models["pixel"], tmp_path / "work", "--study", "1.2.3.4.5")
    assert "holds no study with that Study Instance UID" in _one_error_line(missing)
    everything = pacs_run(orthanc, models["pixel"], tmp_path / "work")
    assert everything.returncode == 0, everything.stderr
    assert "2 studies (1 without images), 1 series processed" in everything.stdout
    assert len(reports(orthanc)) == 1


def test_untrained_modality_is_skipped_unless_forced(orthanc: LocalOrthanc, models: dict[str, Path],
                                                     data: dict[str, list[Path]], tmp_path: Path) -> None:
    orthanc.upload(data["mr"])
    study = study_of(data["mr"])
    skipped = pacs_run(orthanc, models["pixel"], tmp_path / "work", "--study", study)
    assert "nothing to analyse" in _one_error_line(skipped)
    assert "skipped: 1 untrained_modality" in skipped.stdout and "trained on CT" in skipped.stderr
    asked = pacs_run(orthanc, models["pixel"], tmp_path / "work", "--modality", "MR")
    assert "--modality MR is not a modality the model was trained on (CT); add --force" in _one_error_line(asked)
    assert orthanc.instances("SR") == []
    forced = pacs_run(orthanc, models["pixel"], tmp_path / "work", "--study", study, "--force")
    assert forced.returncode == 0 and "1 series processed" in forced.stdout, forced.stdout + forced.stderr
    (sr,) = reports(orthanc)
    assert "MRI unspecified body region" in json.dumps(sr.to_json_dict())


def test_bad_options_fail_before_any_work(models: dict[str, Path], tmp_path: Path) -> None:
    for args, expected in ((["--study", "1.2", "--since", "2024-01-01"], "not both"),
                           (["--since", "2024-13-01"], "not a valid date"), (["--since", "yesterday"], "not a date")):
        r = detflow("pacs", "run", "--url", "http://127.0.0.1:1/dicom-web", "--model", str(models["pixel"]), *args)
        assert r.returncode == 2 and expected in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = detflow("pacs", "run", "--url", "ftp://pacs/dicom-web", "--model", str(models["pixel"]))
    assert "is not an http(s) URL" in _one_error_line(r)


def test_no_patient_data_in_logs(orthanc: LocalOrthanc, models: dict[str, Path], data: dict[str, list[Path]],
                                 tmp_path: Path) -> None:
    orthanc.upload(data["secret"] + data["pdf"])
    ds = pydicom.dcmread(data["secret"][0], stop_before_pixels=True)
    r = pacs_run(orthanc, models["pixel"], tmp_path / "work", env={"DETFLOW_LOG": "DEBUG"})
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    for secret in (SECRET_NAME, SECRET_ID, "SECRET", str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                   str(ds.SOPInstanceUID)):
        assert secret not in out, secret


# ---------------------------------------------------------------------------------------------- Prefect


def test_network_only_retry_condition() -> None:
    from prefect.states import Failed

    from flows.pacs import network_only
    from pipeline.pacs.client import PacsAuthError, PacsUnavailable

    assert network_only(None, None, Failed(data=PacsUnavailable("down")))
    assert not network_only(None, None, Failed(data=PacsAuthError("401")))
    assert not network_only(None, None, Failed(data=ValueError("corrupt")))


@pytest.mark.slow
def test_pacs_inference_flow_runs_the_same_code_and_publishes_an_artifact(orthanc: LocalOrthanc,
                                                                          models: dict[str, Path],
                                                                          data: dict[str, list[Path]],
                                                                          tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    from flows.pacs import pacs_inference

    orthanc.upload(data["air"] + data["mr"] + data["pdf"] + data["site_b"])
    with prefect_test_harness(server_startup_timeout=180):
        result = pacs_inference(url=orthanc.dicomweb, model=str(models["pixel"]), work=str(tmp_path / "work"))
        with get_client(sync_client=True) as client:
            artifacts = client.read_artifacts()
    assert result["series_processed"] == 3 and result["series_skipped"] == {"non_image": 1,
                                                                           "untrained_modality": 1}
    assert result["studies_without_images"] == 1
    md = next(a.data for a in artifacts if a.key == "pacs-inference")
    assert md.count("| processed |") == 3 and md.count("| skipped |") == 2 and "untrained_modality" in md
    assert len(reports(orthanc)) == 3
    # the CLI on the same work folder: everything done by the flow is skipped (one ledger, one code path)
    r = pacs_run(orthanc, models["pixel"], tmp_path / "work")
    assert r.returncode == 0 and "3 done" in r.stdout, r.stdout


def test_credentials_and_tls_settings_reach_the_http_session(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from pipeline.pacs.client import Credentials, Pacs, PacsError

    bearer = Pacs("https://pacs.example.org/dicom-web", Credentials(token="t0k3n"))._client()._session
    assert bearer.headers["Authorization"] == "Bearer t0k3n" and bearer.verify is True and bearer.auth is None
    basic = Pacs("https://pacs.example.org/dicom-web", Credentials(user="u", password="p"))._client()._session
    assert basic.auth == ("u", "p") and "Authorization" not in basic.headers
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    assert Pacs("https://pacs.example.org/dicom-web", Credentials(), ca_bundle=str(ca))._client()._session.verify \
        == str(ca)
    with caplog.at_level("WARNING"):
        off = Pacs("https://pacs.example.org/dicom-web", Credentials(), verify=False)._client()._session
        Pacs("http://pacs.example.org/dicom-web", Credentials(token="t"))
    assert off.verify is False and "verification is OFF" in caplog.text and "over plain http" in caplog.text
    env = {"DETFLOW_PACS_TOKEN": "a", "DETFLOW_PACS_USER": "b", "DETFLOW_PACS_PASSWORD": "c"}
    with pytest.raises(PacsError, match="choose bearer or basic"):
        Credentials.from_env(env)
    with pytest.raises(PacsError, match="without DETFLOW_PACS_PASSWORD"):
        Credentials.from_env({"DETFLOW_PACS_USER": "b"})
    with pytest.raises(PacsError, match="CA bundle .* not found"):
        Pacs("https://pacs.example.org/dicom-web", Credentials(), ca_bundle=str(tmp_path / "missing.pem"))


def test_prefect_yaml_deploys_the_pacs_flow_on_an_interval() -> None:
    import yaml

    from flows.pacs import pacs_inference

    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (dep,) = [d for d in doc["deployments"] if d["name"] == "pacs-inference"]
    assert dep["entrypoint"] == "flows/pacs.py:pacs_inference" and pacs_inference.name == "pacs-inference"
    assert dep["schedules"][0]["interval"] == 900 and dep["work_pool"]["name"] == "cpu"
    assert set(dep["parameters"]) <= set(pacs_inference.parameters.properties)
