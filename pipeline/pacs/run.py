"""``detflow pacs run``: select, infer, write, store, for every series of a PACS that the model can read.

The path reads like MONAI Deploy's operators, one step per function, each with what it takes and gives:

1. **select** (:meth:`PacsRunner.find_series`): QIDO-RS studies (one ``--study``, ``--since`` a date, or all; a
   ``--modality`` filter), then their series;
2. per series (:meth:`PacsRunner.process_series`), in this order, each with a reason when it stops:
   a non-image series (SR, PR, KO, DOC, ... or no instance of an image storage class) is skipped ``non_image``;
   a series of a modality the model was not trained on (the card's ``training_data.modalities``) is skipped
   ``untrained_modality`` unless ``force``; a series the ledger lists as finished is skipped ``done``; a series
   whose report the PACS already holds (same deterministic SR UID) is recorded and skipped ``found_in_pacs``;
3. **infer**: one streamed WADO-RS request per series delivers its instances one at a time (a series is never held
   in memory, only its headers; an instance the stream did not deliver is retrieved alone), the one decoder and the
   engine run on each in the engine's worker threads;
4. **write**: one SR per series (:mod:`pipeline.dicom.sr`); a series with an instance that could not be read gets
   none and is ``failed`` (its instances' problems are in the ledger): an SR that said "absent" about unread images
   would be a false negative;
5. **store**: STOW-RS, then the ledger row. A kill between the two leaves a stored report without a row: the next
   run finds it by its UID (step 2) before storing anything, so the PACS never holds two.

Network trouble (:class:`~pipeline.pacs.client.PacsUnavailable`) and refused credentials stop the run with one
line; everything else about one series is recorded and the run goes on.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import date
from typing import Any

from tqdm import tqdm

from pipeline.data.imaging import ImageLoadError, decode_dataset
from pipeline.dicom.sr import (
    ModelIdentity,
    SourceImage,
    SrError,
    build_series_report,
    header_of,
    pseudonym,
    sr_uids,
)
from pipeline.errors import DetflowError
from pipeline.pacs.client import InstanceGone, Pacs, PacsAuthError, PacsError, PacsUnavailable, tag_value
from pipeline.pacs.ledger import Finished, Ledger

log = logging.getLogger(__name__)

#: Series modalities that never hold images a detector can read (DICOM PS3.3 C.7.3.1.1.1).
NON_IMAGE_MODALITIES = frozenset({"SR", "PR", "KO", "DOC", "REG", "SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD",
                                  "FID", "AU", "ECG", "HD", "EPS", "RWV", "PLAN", "BDUS", "OT_DOC"})

SKIP_REASONS = {
    "non_image": "holds no image an image detector can read (reports, presentation states, documents, ...)",
    "untrained_modality": "a modality the model was not trained on (--force to run it anyway)",
    "done": "finished by an earlier run (the ledger)",
    "found_in_pacs": "the PACS already holds this model's report (a run killed after storing it)",
    "detflow_report": "a detflow report series",
}


def parse_since(value: str) -> str:
    """``--since``: YYYY-MM-DD or YYYYMMDD -> the QIDO-RS date YYYYMMDD; ValueError otherwise."""
    digits = value.replace("-", "")
    if not re.fullmatch(r"\d{8}", digits):
        raise ValueError(f"--since {value!r} is not a date (YYYY-MM-DD)")
    try:
        date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        raise ValueError(f"--since {value!r} is not a valid date") from None
    return digits


def is_image_storage(sop_class_uid: str | None) -> bool:
    """An instance of an image storage SOP class (CT/MR/CR/DX/US/secondary capture/enhanced ... Image Storage)."""
    from pydicom.uid import UID

    if not sop_class_uid:
        return False
    name = UID(sop_class_uid).name
    return "Image Storage" in name and "Presentation" not in name


@dataclass(frozen=True)
class SeriesRef:
    """One series QIDO-RS found."""

    study: str
    series: str
    modality: str
    n_instances: int | None = None

    @property
    def label(self) -> str:
        """How messages name it: pseudonyms, never UIDs."""
        return f"study {pseudonym(self.study)} series {pseudonym(self.series)} ({self.modality or '?'})"


@dataclass
class SeriesOutcome:
    """What happened to one series: ``processed`` (a report stored), ``skipped`` (with a reason from
    :data:`SKIP_REASONS`) or ``failed`` (a reason and a detail)."""

    ref: SeriesRef
    status: str
    reason: str
    n_instances: int = 0
    n_images: int = 0
    n_detections: int = 0
    detail: str = ""
    sr_instance_uid: str | None = None

    def line(self) -> str:
        what = {"processed": f"{self.n_images} images, {self.n_detections} detections, report stored",
                "skipped": f"skipped: {self.reason}", "failed": f"FAILED: {self.reason}"}[self.status]
        return f"{self.ref.label}: {what}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class RunSummary:
    """Every series' outcome and the totals, for the CLI line, the Prefect artifact and the ledger."""

    outcomes: list[SeriesOutcome] = field(default_factory=list)
    n_studies: int = 0
    seconds: float = 0.0
    model_version: str = ""

    def of(self, status: str) -> list[SeriesOutcome]:
        return [o for o in self.outcomes if o.status == status]

    @property
    def n_images(self) -> int:
        return sum(o.n_images for o in self.of("processed"))

    @property
    def studies_without_images(self) -> int:
        """Studies whose every series was skipped as non-image (e.g. only reports or documents)."""
        by_study: dict[str, set[str]] = {}
        for o in self.outcomes:
            by_study.setdefault(o.ref.study, set()).add("non_image" if o.reason in ("non_image", "detflow_report")
                                                        else "image")
        return sum(1 for kinds in by_study.values() if kinds == {"non_image"})

    def counts(self) -> dict[str, Any]:
        skipped = Counter(o.reason for o in self.of("skipped"))
        failed = Counter(o.reason for o in self.of("failed"))
        return {"studies": self.n_studies, "studies_without_images": self.studies_without_images,
                "series_processed": len(self.of("processed")), "series_skipped": dict(sorted(skipped.items())),
                "series_failed": dict(sorted(failed.items())), "images": self.n_images,
                "detections": sum(o.n_detections for o in self.of("processed")), "seconds": round(self.seconds, 2)}

    def line(self) -> str:
        c = self.counts()
        skipped = ", ".join(f"{n} {k}" for k, n in c["series_skipped"].items()) or "none"
        failed = ", ".join(f"{n} {k}" for k, n in c["series_failed"].items()) or "none"
        rate = f", {self.n_images / self.seconds:.1f} images/s" if self.seconds > 0 and self.n_images else ""
        return (f"pacs: {c['studies']} studies ({c['studies_without_images']} without images), "
                f"{c['series_processed']} series processed ({c['images']} images, {c['detections']} detections"
                f"{rate}); skipped: {skipped}; failed: {failed}")

    def nothing_to_do(self) -> bool:
        """True when no series was or had been reported and at least one was skipped for what it holds: the
        selection names nothing this model can read (a run with nothing new to do is not this)."""
        useful = [o for o in self.outcomes if o.status == "processed" or o.reason in ("done", "found_in_pacs")]
        return not useful and not self.of("failed") and any(
            o.reason in ("non_image", "untrained_modality") for o in self.outcomes)

    def to_dict(self) -> dict[str, Any]:
        return {**self.counts(), "model_version": self.model_version,
                "series": [{**asdict(o), "ref": None, "study": pseudonym(o.ref.study),
                            "series": pseudonym(o.ref.series), "modality": o.ref.modality} for o in self.outcomes]}


@dataclass
class Plan:
    """A series that passed the checks: its image instances and the UIDs its report will have. Collects each
    instance's outcome as the engine delivers them."""

    index: int  # position in the run, so outcomes keep the series order
    ref: SeriesRef
    sops: list[str]
    sr_instance: str
    sr_series: str
    images: list[SourceImage] = field(default_factory=list)
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (SOP Instance UID, kind, detail)

    @property
    def complete(self) -> bool:
        return len(self.images) + len(self.problems) == len(self.sops)


@dataclass
class _Instance:
    """One instance to retrieve; the worker that decodes it fills in its header."""

    plan: Plan
    sop: str
    header: Any = None
    dataset: Any = None  # as the series stream delivered it; None: the worker retrieves the instance alone


class PacsRunner:
    """The detector, the PACS and the ledger of one ``detflow pacs run`` (or one Prefect flow run)."""

    def __init__(self, pacs: Pacs, detector: Any, ledger: Ledger, *, force: bool = False, workers: int = 1,
                 batch: int = 1, progress: bool = False, max_pixels: int | None = None) -> None:
        self.pacs, self.detector, self.ledger = pacs, detector, ledger
        self.force, self.workers, self.batch, self.progress = force, workers, batch, progress
        self.max_pixels = max_pixels
        self.model = ModelIdentity.from_card(detector.card, detector.conf)
        training = detector.card.get("training_data") or {}
        self.trained = {str(m).upper() for m in training.get("modalities") or []}
        self._card_knows_modality = "modalities" in training  # cards exported before the field: unknown
        self.run_id = ledger.start_run(pacs.url, self.model.sha256)
        self._own_series = ledger.sr_series(pacs.url)

    # ------------------------------------------------------------------ select

    def check_modality(self, modality: str | None) -> None:
        """``--modality`` must be one the model was trained on, unless ``force``."""
        if modality and not self.force and modality.upper() not in self.trained:
            raise DetflowError(f"--modality {modality} is not a modality the model was trained on "
                               f"({self._trained_text()}); add --force to run it anyway")

    def _trained_text(self) -> str:
        if self.trained:
            return ", ".join(sorted(self.trained))
        if not self._card_knows_modality:
            return "unknown: the card predates training_data.modalities; re-export the model"
        return "none: the card says it was trained on non-DICOM images"

    def find_series(self, study: str | None = None, since: str | None = None,
                    modality: str | None = None) -> tuple[list[SeriesRef], int]:
        """(every series of the selected studies, in PACS order, optionally of one modality; number of studies)."""
        self.check_modality(modality)
        studies = self.pacs.studies(study=study, since=since, modality=modality)
        if study and not studies:
            raise DetflowError(f"the PACS at {self.pacs.server} holds no study with that Study Instance UID "
                               f"(study {pseudonym(study)})")
        refs: list[SeriesRef] = []
        # a UID listed twice (a PACS that files one Study Instance UID under two patients) is processed once
        study_uids = list(dict.fromkeys(u for s in studies if (u := tag_value(s, "StudyInstanceUID"))))
        seen: set[str] = set()
        for study_uid in study_uids:
            for se in self.pacs.series(study_uid):
                series_uid = tag_value(se, "SeriesInstanceUID")
                mod = str(tag_value(se, "Modality") or "").upper()
                if not series_uid or series_uid in seen or (modality and mod != modality.upper()):
                    continue
                seen.add(series_uid)
                n = tag_value(se, "NumberOfSeriesRelatedInstances")
                refs.append(SeriesRef(study_uid, series_uid, mod, int(n) if n is not None else None))
        return refs, len(study_uids)

    # ------------------------------------------------------------------ one series

    def _skip(self, ref: SeriesRef, reason: str, detail: str = "", n: int = 0) -> SeriesOutcome:
        return SeriesOutcome(ref, "skipped", reason, n_instances=n, detail=detail)

    def _fail(self, ref: SeriesRef, reason: str, detail: str, n: int = 0, images: int = 0) -> SeriesOutcome:
        self.ledger.record_problem(self.run_id, self.pacs.url, reason, detail, ref.study, ref.series)
        return SeriesOutcome(ref, "failed", reason, n_instances=n, n_images=images, detail=detail)

    def process_series(self, ref: SeriesRef, index: int = 0) -> SeriesOutcome:
        """Select, infer, write and store one series (see the module docstring): what a Prefect task runs. Network
        trouble and refused credentials raise (:class:`~pipeline.pacs.client.PacsUnavailable`, ``PacsAuthError``)."""
        plan = self.plan(ref, index)
        if isinstance(plan, SeriesOutcome):
            return plan
        for r in self.detector.predict_stream(self._items([plan]), batch=self.batch, workers=self.workers,
                                              decode=self._load):
            self._collect(r)
        done = self._conclude(plan)
        return done if isinstance(done, SeriesOutcome) else self.report(done)

    def plan(self, ref: SeriesRef, index: int = 0) -> SeriesOutcome | Plan:
        """Step 2: the checks that may skip the series (no pixel is retrieved for a skipped one). Returns the
        outcome when the series stops here, else its :class:`Plan`."""
        if ref.series in self._own_series:
            return self._skip(ref, "detflow_report")
        if ref.modality in NON_IMAGE_MODALITIES:
            return self._skip(ref, "non_image", f"modality {ref.modality}")
        if not self.force and ref.modality not in self.trained:
            return self._skip(ref, "untrained_modality", f"trained on {self._trained_text()}")
        if self.ledger.finished(self.pacs.url, ref.series, self.model.sha256) is not None:
            return self._skip(ref, "done")
        listed = self.pacs.instances(ref.study, ref.series)
        images = [str(tag_value(i, "SOPInstanceUID")) for i in listed
                  if tag_value(i, "SOPInstanceUID") and is_image_storage(tag_value(i, "SOPClassUID"))]
        if not images:
            return self._skip(ref, "non_image", f"{len(listed)} instance(s), none of an image storage class",
                              n=len(listed))
        uids = sr_uids(self.model.sha256, self.model.conf, ref.series, images)
        if self.pacs.has_instance(ref.study, uids.instance):
            self._finished(ref, uids.instance, uids.series, "found", len(images), -1)
            return self._skip(ref, "found_in_pacs", n=len(images))
        return Plan(index, ref, images, uids.instance, uids.series)

    def _conclude(self, plan: Plan) -> SeriesOutcome | Plan:
        """After the last instance: a series with an unreadable instance fails (no report), else it is ready."""
        if not plan.problems:
            return plan
        ref = plan.ref
        for sop, kind, detail in plan.problems:
            self.ledger.record_problem(self.run_id, self.pacs.url, kind, detail, ref.study, ref.series, sop)
        kinds = Counter(kind for _, kind, _ in plan.problems)
        return self._fail(ref, "unreadable_instance", f"{len(plan.problems)} of {len(plan.sops)} instance(s) could "
                          f"not be read ({', '.join(f'{n} {k}' for k, n in kinds.items())}); no report stored",
                          n=len(plan.sops), images=len(plan.images))

    def report(self, plan: Plan) -> SeriesOutcome:
        """Steps 4-5: the SR, STOW-RS, then the ledger row (in this order: see the module docstring)."""
        ref, n = plan.ref, len(plan.sops)
        try:
            report = build_series_report(plan.images, self.model)
        except SrError as e:
            return self._fail(ref, "not_reportable", str(e), n=n, images=len(plan.images))
        try:
            self.pacs.store(ref.study, report.dataset)
        except (PacsUnavailable, PacsAuthError):
            raise  # the run cannot go on
        except PacsError as e:
            return self._fail(ref, "store_refused", str(e), n=n, images=len(plan.images))
        self._finished(ref, plan.sr_instance, plan.sr_series, "stored", n, report.n_detections)
        plan.images = []  # the headers are not needed any more
        return SeriesOutcome(ref, "processed", "stored", n_instances=n, n_images=n,
                             n_detections=report.n_detections, sr_instance_uid=plan.sr_instance)

    def _finished(self, ref: SeriesRef, sr_uid: str, sr_series: str, how: str, n: int, detections: int) -> None:
        self.ledger.record_finished(self.pacs.url, ref.series, self.model.sha256,
                                    Finished(ref.study, sr_uid, sr_series, how, n, detections), self.run_id)
        self._own_series.add(sr_series)

    def _items(self, plans: Iterable[Plan]) -> Iterator[_Instance]:
        """One item per listed image instance of each plan: those one streamed WADO-RS request of the series
        delivers (one request per series, not per instance), then, one by one in the workers, any listed instance
        the stream did not deliver (a part that did not parse, a series retrieve the PACS refused, an instance it
        no longer holds), so each instance's own problem is recorded as before."""
        for plan in plans:
            wanted = set(plan.sops)
            try:
                for ds in self.pacs.iter_series(plan.ref.study, plan.ref.series):
                    sop = str(ds.get("SOPInstanceUID") or "")
                    if sop in wanted:  # not an image instance QIDO listed (or already delivered): not ours
                        wanted.discard(sop)
                        yield _Instance(plan, sop, dataset=ds)
            except (PacsUnavailable, PacsAuthError):
                raise  # the run cannot go on
            except PacsError as e:
                log.debug("series stream of %s stopped (%s); the rest one by one", plan.ref.label, e)
            for sop in plan.sops:
                if sop in wanted:
                    yield _Instance(plan, sop)

    def _load(self, item: _Instance) -> Any:
        """Decode an instance the series stream delivered, or WADO-RS it alone first (in an engine worker thread);
        the instance's own problems are ImageLoadErrors (recorded, the series fails), the PACS's (unreachable,
        refused) stop the run."""
        ref = item.plan.ref
        ds, item.dataset = item.dataset, None  # the stream's copy is decoded once, then dropped
        try:
            if ds is None:
                ds = self.pacs.retrieve(ref.study, ref.series, item.sop)
        except InstanceGone:
            raise ImageLoadError("instance_gone", "listed by QIDO-RS but not retrievable (deleted?)") from None
        except (PacsUnavailable, PacsAuthError):
            raise  # the run cannot go on
        except PacsError as e:
            raise ImageLoadError("retrieve_failed", str(e)) from None
        except Exception as e:  # noqa: BLE001 - pydicom on a damaged instance: the instance's fault
            raise ImageLoadError("corrupt_dicom", f"cannot parse the retrieved instance ({type(e).__name__})"
                                 ) from None
        try:
            item.header = header_of(ds)
        except SrError as e:
            raise ImageLoadError("not_reportable", str(e)) from None
        return decode_dataset(ds, self.detector.dicom_window(), self.max_pixels).rgb

    @staticmethod
    def _collect(r: Any) -> Plan:
        """One engine result into its series' plan (the pixels are dropped here)."""
        item: _Instance = r.source
        if r.error is not None:
            item.plan.problems.append((item.sop, getattr(r.error, "kind", "unreadable"),
                                       getattr(r.error, "detail", None) or type(r.error).__name__))
        else:
            item.plan.images.append(SourceImage.of(item.header, r.detections))
        r.rgb = None
        return item.plan

    # ------------------------------------------------------------------ the whole run

    def run(self, refs: list[SeriesRef], n_studies: int) -> RunSummary:
        """Every series, outcomes in series order, a progress bar over series.

        One stream feeds the engine's workers across series boundaries (a series' last instances and the next
        one's first are retrieved and detected together: no pool drained per series), and each finished series'
        report is written and stored in a second thread while detection goes on (at most one report in flight;
        memory holds the headers of the series in flight, never their pixels). The checks of each series run as
        the stream reaches it. The ledger's run row records the totals.
        """
        summary = RunSummary(n_studies=n_studies, model_version=self.model.version)
        start = time.perf_counter()
        status = "failed"
        slots: list[SeriesOutcome | Future[SeriesOutcome] | None] = [None] * len(refs)
        try:
            with tqdm(total=len(refs), desc="pacs", unit="series", disable=not self.progress) as bar, \
                    ThreadPoolExecutor(max_workers=1, thread_name_prefix="detflow-sr") as writer:
                pending: list[Future[SeriesOutcome]] = []

                def plans() -> Iterator[Plan]:
                    for i, ref in enumerate(refs):
                        step = self.plan(ref, i)
                        if isinstance(step, SeriesOutcome):
                            slots[i] = step
                            bar.update(1)
                        else:
                            yield step

                def finish(plan: Plan) -> None:
                    done = self._conclude(plan)
                    if isinstance(done, SeriesOutcome):
                        slots[plan.index] = done
                    else:
                        while pending:  # one report in flight; its exception (the PACS gone) stops the run
                            pending.pop().result()
                        slots[plan.index] = future = writer.submit(self.report, done)
                        pending.append(future)
                    bar.update(1)

                for r in self.detector.predict_stream(self._items(plans()), batch=self.batch,
                                                      workers=self.workers, decode=self._load):
                    plan = self._collect(r)
                    if plan.complete:
                        finish(plan)
                for future in pending:
                    future.result()
            summary.outcomes = [s.result() if isinstance(s, Future) else s for s in slots if s is not None]
            for o in summary.outcomes:
                log.info("%s", o.line())  # pseudonyms only
            status = "ok" if not summary.of("failed") else "partial"
        finally:
            summary.seconds = time.perf_counter() - start
            self.ledger.finish_run(self.run_id, status, json.dumps(summary.counts()))
        return summary


def iter_lines(summary: RunSummary, limit: int = 20) -> Iterator[str]:
    """The per-series lines worth printing, at most ``limit``: failures first, then skips that are not routine
    (the ledger and the Prefect artifact list every series)."""
    lines = [o.line() for o in summary.of("failed")] + [
        o.line() for o in summary.of("skipped") if o.reason in ("non_image", "untrained_modality", "found_in_pacs")]
    yield from lines[:limit]
    if len(lines) > limit:
        yield f"... and {len(lines) - limit} more"

