"""YOLO under Ultralytics' own DDP (`train.device: "0,1"`): what detflow can check without two GPUs.

Ultralytics' DDP writes a temporary script plus a cloudpickled state (trainer class, args, model, callbacks) and
runs ``torch.distributed.run`` on it; each rank rebuilds the trainer from that state (ultralytics/utils/dist.py).
This test does exactly that rebuild, with Ultralytics' own ``generate_ddp_file`` and the rank's ``RANK``
environment, in fresh processes, and checks which detflow callbacks each rank ends up with: rank 0 has each of them
once (DVCLive metrics, the progress bar, the freeze schedule), rank 1 only those that change its model (the freeze
schedule, the frozen-EMA pin), so metrics and progress arrive once and nothing is written twice. Only the device is
swapped for the CPU: which callbacks a rank gets does not depend on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

PARENT = """
import json, sys
from pathlib import Path
from pipeline.families.yolo.trainer import trainer_class
from pipeline.ultralytics_env import import_ultralytics
import_ultralytics()
from ultralytics.utils.dist import generate_ddp_file
trainer = trainer_class()(overrides=json.loads(sys.argv[1]))
print(Path(generate_ddp_file(trainer)).with_suffix(".pt"))
"""

RANK = """
import json, sys
from pipeline.ultralytics_env import import_ultralytics
import_ultralytics()
from ultralytics.utils import DEFAULT_CFG_DICT
from ultralytics.utils.patches import torch_load
state = torch_load(sys.argv[1], map_location="cpu")  # what the DDP script does, line for line
cfg = DEFAULT_CFG_DICT.copy()
cfg.update(save_dir="")
trainer = state["trainer"](cfg=cfg, overrides=dict(state["args"], device="cpu"), _callbacks=state["callbacks"])
ours = "pipeline.families.yolo.trainer"
print(json.dumps({event: [f.__name__ for f in fns if getattr(f, "__module__", None) == ours]
                  for event, fns in trainer.callbacks.items()}))
"""


def _run(code: str, arg: str, env: dict[str, str]) -> str:
    proc = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_ultralytics_ddp_ranks_get_detflow_callbacks_once(exported: dict[str, Path], tmp_path: Path) -> None:
    from pipeline.config import load_params
    from pipeline.families.yolo.train import yolo_group_prefixes

    params = load_params(None, ["train.imgsz=64", "train.epochs=2", "train.pretrained=none"])
    run_dir = tmp_path / "work" / "yolo-ddp"
    run_dir.mkdir(parents=True)
    spec = {"run_dir": str(run_dir), "strategy": "progressive", "unfreeze_at": [1, 2], "backbone_lr_mult": 1.0,
            "group_prefixes": yolo_group_prefixes("yolov5n"), "pretrained": {"source": "none", "sha256": None},
            "pretrained_state": None, "transferred_params": [], "params": params.model_dump(mode="json"),
            "progress": True}
    (run_dir / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update({"DETFLOW_TRAIN_SPEC": str(run_dir / "spec.json"), "DETFLOW_WORKDIR": str(tmp_path / "state"),
                "YOLO_CONFIG_DIR": str(tmp_path / "ultralytics")})
    args: dict[str, Any] = {"model": "yolov5n.yaml", "data": str(exported["prepared"] / "dataset.yaml"), "epochs": 2,
                            "imgsz": 64, "batch": 4, "device": "cpu", "workers": 0, "project": str(run_dir.parent),
                            "name": run_dir.name, "exist_ok": True, "plots": False, "verbose": False}
    state = _run(PARENT, json.dumps(args), env)
    assert state.endswith(".pt") and Path(state).is_file()

    ranks = {r: json.loads(_run(RANK, state, {**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2"}))
             for r in (0, 1)}
    main = {e: fns for e, fns in ranks[0].items() if fns}
    assert main == {"on_train_start": ["_set_cpu_threads", "_start_budget", "_open_bar"],
                    "on_model_save": ["_record_budget"],
                    "on_train_epoch_start": ["_apply_freeze_schedule", "_epoch_started"],
                    "on_train_batch_end": ["_pin_frozen_ema"],
                    "on_fit_epoch_end": ["_log_epoch", "_advance_bar"],
                    "on_train_end": ["_close_live", "_close_bar"]}
    assert {e: fns for e, fns in ranks[1].items() if fns} == {
        "on_train_start": ["_set_cpu_threads"], "on_train_epoch_start": ["_apply_freeze_schedule"],
        "on_train_batch_end": ["_pin_frozen_ema"]}
