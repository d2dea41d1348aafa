"""The canonical record every reader produces, and the validation issue record."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

# fixed: changed and kept; box_dropped: one box left out; image_quarantined: one image file left out (with its
# boxes); ignored: a file in the dataset folder that is neither an image nor an annotation the stage uses.
Action = Literal["fixed", "box_dropped", "image_quarantined", "ignored"]


@dataclass
class Sample:
    """One image with its boxes, whatever format it came from.

    ``boxes`` are pixel ``x_min, y_min, x_max, y_max`` (float, shape ``(N, 4)``); ``labels`` are class names
    as written in the source. ``patient`` is the raw identifier (pseudonymised before it is written anywhere);
    ``None`` means "unknown", and the image becomes its own patient.
    """

    image: Path
    source: str  # dicom_csv | voc | coco | yolo
    patient: str | None = None
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), dtype=np.float64))
    labels: list[str] = field(default_factory=list)
    official_split: str | None = None  # train | val | test when the dataset ships its own split
    size_hint: tuple[int, int] | None = None  # (width, height) the annotation claims, if any
    # The annotation unit the boxes came from (an XML file, a label file, a COCO image id, a CSV): one unit that
    # ends up describing two different images is ambiguous (see pipeline.data.dedupe).
    annotation: str = ""
    # Frame the boxes were drawn in when the format says so: "stored" pixels or "upright" (EXIF applied);
    # None lets prepare decide from size_hint, then the stored frame (see README, EXIF orientation).
    label_frame: str | None = None

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        if len(self.labels) != len(self.boxes):
            raise ValueError(f"{self.image}: {len(self.boxes)} boxes but {len(self.labels)} labels")


@dataclass(frozen=True)
class Problem:
    """One validation finding. Nothing is dropped or changed without one of these.

    ``boxes`` is how many annotated boxes this finding leaves out (a dropped box: 1; a quarantined image: all of
    its boxes; a missing image: the boxes that named it), so the report's totals reconcile. ``image`` is the
    image file a quarantine refers to (not written to the report: it may carry a patient identifier).
    """

    file: str
    kind: str
    detail: str
    action: Action
    boxes: int = -1  # -1: the default for the action (1 for box_dropped, else 0)
    image: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.boxes < 0:
            object.__setattr__(self, "boxes", 1 if self.action == "box_dropped" else 0)

    def with_text(self, file: str, detail: str) -> Problem:
        return replace(self, file=file, detail=detail)

    def to_dict(self) -> dict[str, str | int]:
        return {"file": self.file, "kind": self.kind, "detail": self.detail, "action": self.action,
                "boxes": self.boxes}


# Every kind the data stage records, with what it means; the report carries this legend.
PROBLEM_KINDS: dict[str, str] = {
    "corrupt_image": "image bytes cannot be decoded (truncated or damaged JPEG/PNG)",
    "not_an_image": "file content is not a supported image, whatever its extension says",
    "corrupt_dicom": "DICOM file is truncated or malformed",
    "dicom_no_pixel_data": "DICOM file has no Pixel Data element",
    "dicom_multiframe": "multi-frame DICOM (cine / volume in one file) is not supported",
    "dicom_unsupported_compression": "DICOM pixel data uses a compressed transfer syntax with no decoder installed",
    "missing_image": "an annotation refers to an image file that does not exist",
    "malformed_annotation": "an annotation entry cannot be parsed (e.g. VOC <object> without <bndbox>)",
    "unknown_class": "box label is not one of the dataset classes",
    "degenerate_box": "box has zero or negative width or height",
    "box_outside_image": "box extends beyond the image (clipped within tolerance, else dropped)",
    "duplicate_box": "same class and IoU >= prepare.duplicate_iou with an earlier box",
    "near_duplicate_box": "same class and near_duplicate_iou <= IoU < duplicate_iou with an earlier box",
    "rgba_converted": "RGBA/palette-with-alpha image converted to RGB",
    "grayscale_converted": "single-channel image converted to RGB",
    "size_mismatch": "annotation states a different image size than the file has",
    "image_too_large": "image has more pixels than allowed (decompression-bomb guard)",
    "missing_annotation": "image has no annotation file (VOC) and is left out",
    "not_in_official_split": "image is not listed in any of the dataset's official split files",
    "exif_orientation": "JPEG/PNG/TIFF with an EXIF Orientation: stored upright, boxes turned with the pixels if "
                        "they were drawn on the stored pixels",
    "duplicate_image": "one image file carries more than one annotation record (kept once when they agree, "
                       "quarantined when they conflict), or one annotation record names several different images",
    "duplicate_content": "byte-identical image files under different names: kept, all in one split",
    "unlisted_image": "image file on disk that no annotation lists (COCO) and is left out",
    "unsupported_file": "file in the dataset folder that the format's reader does not use",
    "non_utf8_text": "annotation text file is not UTF-8; decoded as Windows-1252",
    "unreadable_dataset": "a dataset folder's annotations cannot be read at all; its images are left out",
    "unreadable_entry": "an entry that cannot be read as a file (a folder named like one, a dangling link, a FIFO, "
                        "no permission): recorded and skipped, the run goes on",
    "hidden_file": "a hidden file or folder (.DS_Store, .git): skipped, not descended into",
    "outside_dataset": "an image named or linked from outside the dataset folder (../, an absolute path, a link "
                       "leaving it): not read unless data.allow_outside_root is true",
    "renamed": "written under another name so the training tool loads it (hidden, characters, length, a name "
               "taken)",
    "implausible_value": "a number in a file header that is not finite or out of range after the arithmetic it "
                         "feeds (e.g. PixelSpacing 1e200): ignored, the image kept without it",
}
