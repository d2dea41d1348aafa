"""One canonical record per image file, and identical images kept together.

Rules (README, "Duplicates"):

* The image's identity is the sha256 of the bytes prepare writes for it: the file itself when it is kept as is
  (an RGB JPEG/PNG), else the PNG of its decoded pixels, so a DICOM whose header alone differs, or a copy
  re-saved losslessly, is the same image. Records of one image (the same file annotated twice: two VOC
  XMLs, two COCO entries, or byte-identical files) are compared: when their boxes, labels and patient agree the
  image is kept once (``duplicate_image``, fixed, the repeated boxes counted as dropped); when they conflict the
  image is quarantined (``duplicate_image``): nobody can tell which annotation is right.
* One annotation unit (a label file, a COCO image id) that names several *different* images (``a.png`` and
  ``a.jpg`` with one ``labels/a.txt``; two COCO images sharing an id) is ambiguous: those images are quarantined.
* Identical images under different names whose annotations agree are all kept (``duplicate_content``) and
  returned as groups: the split puts each group in one split (patient split: their patients are merged first;
  official split: the earliest of train, val, test any copy is listed in).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.data.records import Problem, Sample

BOX_TOLERANCE_PX = 1.0  # two annotations agree when every box matches within this (YOLO rounding)


@dataclass
class Canonical:
    samples: list[Sample]  # one per kept image file
    problems: list[Problem] = field(default_factory=list)
    groups: list[list[Path]] = field(default_factory=list)  # identical kept images (2 or more each)
    sha256: dict[Path, str] = field(default_factory=dict)


def _agree(a: Sample, b: Sample) -> bool:
    """Same boxes and labels; for two records of one file also the same patient and official split (copies of
    an image under other names may belong to other patients: their patients are merged for the split)."""
    if a.image == b.image and (a.patient != b.patient or a.official_split != b.official_split):
        return False
    if sorted(a.labels) != sorted(b.labels) or len(a.boxes) != len(b.boxes):
        return False
    if not len(a.boxes):
        return True
    order_a = sorted(range(len(a.boxes)), key=lambda i: (a.labels[i], *np.round(a.boxes[i], 1)))
    order_b = sorted(range(len(b.boxes)), key=lambda i: (b.labels[i], *np.round(b.boxes[i], 1)))
    return bool(np.abs(a.boxes[order_a] - b.boxes[order_b]).max() <= BOX_TOLERANCE_PX)


def canonicalise(samples: list[Sample], rel: dict[Path, str], sha: dict[Path, str]) -> Canonical:
    """Apply the module's rules; ``rel`` names each image for the report, ``sha`` is its identity."""
    out = Canonical(samples=[], sha256=sha)
    contents_of_unit: dict[str, set[str]] = defaultdict(set)
    for s in samples:
        if s.annotation:
            contents_of_unit[s.annotation].add(sha[s.image])
    by_content: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_content[sha[s.image]].append(s)
    for digest, members in by_content.items():
        files = list(dict.fromkeys(s.image for s in members))
        ambiguous = sorted({s.annotation for s in members if len(contents_of_unit.get(s.annotation, ())) > 1})
        first = members[0]
        conflict = [s for s in members[1:] if not _agree(first, s)]
        if ambiguous or conflict:
            if ambiguous:
                why = (f"{', '.join(ambiguous)} names more than one different image; its boxes cannot be attributed")
            else:
                why = ("annotated more than once with different boxes, labels, patient or split ("
                       + "; ".join(f"{s.annotation or rel[s.image]}: {len(s.boxes)} boxes" for s in members) + ")")
            for f in files:
                n = sum(len(s.boxes) for s in members if s.image == f)
                out.problems.append(Problem(rel[f], "duplicate_image", why + "; quarantined", "image_quarantined",
                                            boxes=n, image=f))
            continue
        kept: dict[Path, Sample] = {}
        for s in members:
            if s.image not in kept:
                kept[s.image] = s
                continue
            out.problems.append(Problem(rel[s.image], "duplicate_image",
                                        f"annotated again, identically, by {s.annotation or 'another record'} "
                                        f"(first: {kept[s.image].annotation or 'record'}); kept once, the repeated "
                                        f"{len(s.boxes)} boxes not counted twice", "fixed", boxes=len(s.boxes)))
        out.samples += kept.values()
        if len(kept) > 1:
            names = [rel[f] for f in kept]
            out.groups.append(list(kept))
            for f in list(kept)[1:]:
                out.problems.append(Problem(rel[f], "duplicate_content",
                                            f"same image as {names[0]} (sha256 {digest[:12]} of the pixels as "
                                            "written); both kept, in one split", "fixed"))
    return out
