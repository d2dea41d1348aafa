"""Each arm of a study is a DVC experiment: queued with ``dvc exp run --queue -n NAME -S key=value ...`` and run by
DVC's own queue (``dvc queue start --jobs N``, detached workers that each run one experiment at a time in a
temporary copy of the repository), so ``dvc exp show`` lists every arm with its params and metrics and ``dvc plots
diff`` compares them.

State lives in DVC, nothing of ours: an arm is *done* when ``dvc exp show --json`` lists a successful experiment of
its name on the current commit (the name carries a hash of the arm's whole params, so the same name means the same
params); *queued* / *running* arms are left to the queue; a *failed* arm, or a *running* one whose process is gone
(the machine or the workers were killed), is removed from the queue and queued again. So a killed study resumes by
running ``detflow study run`` again; an arm killed mid-training continues from its last epoch, because every worker
shares the checkout's ``.detflow/train`` run state (``DETFLOW_WORKDIR``) and the trainers resume a run of the same
fingerprint.

Everything goes through the ``dvc`` command line of this interpreter's environment (its JSON and exit codes), not
DVC's internal Python API.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import DetflowError
from pipeline.study.plan import Arm

POLL_S = 5.0  # pause before asking DVC again after a failed read
# Seconds between two looks at the queue while arms train: each `dvc exp show --json` costs about a CPU second
# (measured on BCCD at load 18: 5.5 s wall, 1.3 CPU s, growing with the number of experiments), time taken from the
# arms; an arm trains for minutes, so a look every 15 s costs ~3 % of one core.
WAIT_POLL_S = 15.0
# Seconds a read-only dvc command may take before it is killed and tried again. pygit2 1.21's BlobIO, through which
# DVC reads every file of a commit, can miss a wakeup and wait forever under heavy CPU load (seen on the 2-core
# machine: `dvc exp show` blocked in `_BlobIO.readinto` with its writer thread gone); a retry reads again.
READ_TIMEOUT_S = 240.0
READ_RETRIES = 2
SHOW_ATTEMPTS = 6  # a failed `dvc exp show` (an experiment's temporary copy half-written) is tried this often
MAX_REQUEUES = 2  # per arm and `wait`: an arm whose process vanished is queued again this often before giving up


class StudyError(DetflowError):
    """A DVC command of the study failed (the message carries its output's tail)."""


def dvc_env(repo: Path) -> dict[str, str]:
    """The environment of every ``dvc`` call and so of DVC's workers and the stages they run: this interpreter's
    ``bin`` first (DVC's workers start ``dvc`` from PATH), the experiment's own code first (``PYTHONPATH=.``: a
    stage runs in the experiment's temporary copy, whose pipeline/ is what its dvc.lock hashes), run state in the
    checkout (``DETFLOW_WORKDIR``: a killed arm resumes its training), no analytics, no progress bars."""
    from pipeline.ultralytics_env import state_root

    env = os.environ.copy()
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = "." + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("DETFLOW_WORKDIR", str((repo / state_root()).resolve()) if not state_root().is_absolute()
                   else str(state_root()))
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("DETFLOW_NO_PROGRESS", "1")
    return env


def dvc(repo: Path, *args: str, check: bool = True, timeout: float | None = None,
        retries: int = 0) -> subprocess.CompletedProcess:
    """Run ``dvc ARGS`` in ``repo``; a non-zero exit raises :class:`StudyError` with the output's tail. With
    ``timeout``, a command that does not finish in time is killed and run again up to ``retries`` times."""
    for attempt in range(retries + 1):
        try:
            proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=dvc_env(repo),
                                  capture_output=True, text=True, timeout=timeout)
            break
        except subprocess.TimeoutExpired:
            if attempt == retries:
                raise StudyError(f"`dvc {' '.join(args[:3])}` did not finish within {timeout:.0f} s ({retries + 1} "
                                 "tries); run the study command again") from None
    if check and proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise StudyError(f"`dvc {' '.join(args[:3])} ...` failed (exit {proc.returncode}):\n{tail}")
    return proc


def check_repo(repo: Path) -> str:
    """DVC experiments are git commits: the checkout needs git, a commit and DVC. Returns the baseline commit."""
    if not (repo / ".dvc").is_dir():
        raise DetflowError(f"{repo.resolve()} is not a DVC repository (no .dvc/); run the study in a detflow checkout")
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DetflowError("detflow study runs each arm as a DVC experiment, which needs a git repository with at "
                           "least one commit here (git init && git add -A && git commit -m baseline)")
    return proc.stdout.strip()


@dataclass
class ExpState:
    """One experiment as ``dvc exp show --json`` lists it."""

    name: str
    state: str  # success | queued | running | failed
    rev: str | None = None
    pid: int | None = None
    log: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    deps: dict[str, Any] = field(default_factory=dict)


def experiments(repo: Path, attempts: int = SHOW_ATTEMPTS, pause_s: float = POLL_S) -> tuple[str | None,
                                                                                      dict[str, ExpState]]:
    """The baseline commit and its experiments by name (the latest entry wins when a name appears twice).

    ``dvc exp show`` fails now and then while a worker sets up or cleans an experiment's temporary copy (seen on
    BCCD: "failed to show experiments - directory '.dvc/tmp/exps/tmpXXXX/.dvc' does not exist" while that copy
    was being written); a failed show is tried again after ``pause_s``, ``attempts`` times in all."""
    for attempt in range(1, attempts + 1):
        try:
            out = dvc(repo, "exp", "show", "--json", timeout=READ_TIMEOUT_S, retries=READ_RETRIES).stdout
            break
        except StudyError as e:
            if attempt == attempts or "did not finish" in str(e):
                raise
            time.sleep(pause_s)
    try:
        doc = json.loads(out or "[]")
    except json.JSONDecodeError as e:
        raise StudyError(f"`dvc exp show --json` printed no JSON ({e}): {out[:300]}") from None
    baseline, found = None, {}
    for entry in doc:
        if entry.get("rev") == "workspace":
            continue
        baseline = entry.get("rev")
        for exp in entry.get("experiments") or []:
            executor = exp.get("executor") or {}
            rev = (exp.get("revs") or [{}])[0]
            name = exp.get("name") or rev.get("name")
            if not name:
                continue
            data = rev.get("data") or {}
            local = executor.get("local") or {}
            state = executor.get("state") or ("success" if data.get("metrics") else "unknown")
            found[name] = ExpState(
                name=name, state=state, rev=rev.get("rev"), pid=local.get("pid"), log=local.get("log"),
                params=((data.get("params") or {}).get("params.yaml") or {}).get("data") or {},
                metrics={path: (m or {}).get("data") or {} for path, m in (data.get("metrics") or {}).items()},
                deps={path: (d or {}).get("hash") for path, d in (data.get("deps") or {}).items()})
    return baseline, found


def _alive(pid: int | None) -> bool:
    from pipeline.fileio import _pid_alive

    return bool(pid) and _pid_alive(int(pid))  # type: ignore[arg-type]


def _gone(st: ExpState) -> bool:
    """A "running" arm whose recorded process no longer exists (no pid yet: it is just starting, not gone)."""
    return st.state == "running" and st.pid is not None and not _alive(st.pid)


def _hydra_item(item: str, tree: dict[str, Any]) -> str:
    """``key=value`` as a ``-S`` override: ``+key=value`` for a key the checkout's params.yaml does not have yet
    (Hydra appends only with ``+``)."""
    key = item.split("=", 1)[0].strip()
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return "+" + item
        node = node[part]
    return item


@dataclass
class QueuePlan:
    """What ``run`` found and did: arms already done, left to the queue, (re)queued."""

    done: list[str]
    waiting: list[str]
    queued: list[str]
    requeued: list[str]


def queue_arm(repo: Path, arm: Arm, targets: Sequence[str], previous: ExpState | None = None) -> None:
    """``dvc exp run --queue TARGETS -n NAME -S ...``; a previous failed or orphaned entry of the name is removed
    first (DVC marks a "running" entry whose process is gone as failed when asked to kill it)."""
    if previous is not None:
        if previous.state == "running":
            dvc(repo, "queue", "kill", "--force", arm.name, check=False, timeout=READ_TIMEOUT_S)
        dvc(repo, "queue", "remove", arm.name, check=False, timeout=READ_TIMEOUT_S)
    params_yaml = repo / "params.yaml"
    tree = yaml.safe_load(params_yaml.read_text(encoding="utf-8")) if params_yaml.is_file() else {}
    args = ["exp", "run", "--queue", *targets, "-n", arm.name]
    for item in arm.overrides:
        args += ["-S", _hydra_item(item, tree)]
    dvc(repo, *args, timeout=2 * READ_TIMEOUT_S)  # not retried: queueing twice would train twice


def enqueue(repo: Path, arms: Sequence[Arm], targets: Sequence[str]) -> QueuePlan:
    """Queue every arm that is not done, queued or running; clean out failed and orphaned entries first."""
    _, states = experiments(repo)
    plan = QueuePlan([], [], [], [])
    for arm in arms:
        st = states.get(arm.name)
        if st is not None and st.state == "success":
            plan.done.append(arm.name)
            continue
        if st is not None and st.state == "queued":
            plan.waiting.append(arm.name)
            continue
        if st is not None and st.state == "running" and not _gone(st):
            plan.waiting.append(arm.name)
            continue
        queue_arm(repo, arm, targets, st)  # failed, or "running" with its process gone: removed, queued again
        (plan.queued if st is None else plan.requeued).append(arm.name)
    return plan


def start_workers(repo: Path, jobs: int) -> bool:
    """``dvc queue start --jobs N`` (idempotent: running workers are kept); False when it did not return in time,
    which :func:`wait` survives (it starts the workers again when arms wait and nothing runs).

    Its output goes to a file, never to a pipe: DVC spawns each worker through a forked helper process that keeps
    the command's stdout and stderr open and lives as long as the worker, so a caller reading pipes to their end
    waits until the worker has run the whole queue (measured: 21 s with pipes against 5 s with a file for an empty
    queue, whose worker idles 10 s; for a study, as long as all its arms train)."""
    import tempfile

    with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as out:
        try:
            proc = subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "--jobs", str(jobs)], cwd=repo,
                                  env=dvc_env(repo), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=READ_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return False
        out.seek(0)
        if proc.returncode != 0:
            tail = "\n".join(out.read().strip().splitlines()[-15:])
            raise StudyError(f"`dvc queue start --jobs {jobs}` failed (exit {proc.returncode}):\n{tail}")
    return True


def stop_idle_workers(repo: Path) -> list[int]:
    """Stop this checkout's DVC queue workers (by the pids DVC's process manager recorded) when none runs an arm:
    a worker stuck after its experiment ended would hold its slot and the queue would never move on."""
    import signal

    stopped = []
    for pidfile in sorted((repo / ".dvc" / "tmp" / "exps" / "celery").glob("dvc-exp-worker-*.pid")):
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            continue
        try:  # only a DVC queue worker: a pid file left by a dead worker may name a process that reused its pid
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if _alive(pid) and "exp queue-worker" in cmdline:
            os.kill(pid, signal.SIGTERM)
            stopped.append(pid)
    return stopped


def wait(repo: Path, arms: Sequence[Arm], jobs: int, targets: Sequence[str] = ("evaluate",), progress: bool = True,
         poll_s: float = WAIT_POLL_S, on_poll: Callable[[dict[str, ExpState]], None] | None = None
         ) -> dict[str, ExpState]:
    """Block until every arm succeeded or failed. Restarts the workers when arms wait and none runs (DVC's workers
    stop after a few idle seconds), stopping stuck ones first; an arm DVC lists as running whose process is gone
    is queued again (:data:`MAX_REQUEUES` times). Returns the final states by arm name."""
    from tqdm import tqdm

    names = [a.name for a in arms]
    bar = tqdm(total=len(names), desc="study", unit="arm", disable=not progress, dynamic_ncols=True)
    idle_polls, requeued = 0, dict.fromkeys(names, 0)
    by_name = {a.name: a for a in arms}
    try:
        while True:
            _, states = experiments(repo)
            mine = {n: states[n] for n in names if n in states}
            finished = [n for n in names if n in mine and mine[n].state in ("success", "failed")]
            bar.update(len(finished) - bar.n)
            running = [n for n in names if n in mine and mine[n].state == "running"]
            bar.set_postfix_str(f"running: {', '.join(running) or '-'}")
            bar.refresh()
            if on_poll is not None:
                on_poll(mine)
            if len(finished) == len(names):
                return mine
            lost = [n for n in names if n not in mine]
            if lost:
                raise StudyError(f"arms {', '.join(lost)} are neither queued nor done (removed from DVC's queue "
                                 "meanwhile?); run `detflow study run` again to queue them")
            for n in [n for n in running if _gone(mine[n])]:
                if requeued[n] >= MAX_REQUEUES:
                    raise StudyError(f"arm {n} is marked running but its process is gone, {requeued[n]} times; "
                                     "run `detflow study run` again: it queues the arm anew")
                time.sleep(poll_s)  # DVC may be collecting a just-finished arm: look once more before acting
                again = experiments(repo)[1].get(n)
                if again is not None and _gone(again):
                    bar.write(f"arm {n}: its process is gone (killed?); queued again")
                    queue_arm(repo, by_name[n], targets, again)
                    requeued[n] += 1
            idle_polls = idle_polls + 1 if not running and any(mine[n].state == "queued" for n in names) else 0
            if idle_polls == 2:  # arms wait and nothing runs: the workers stopped (idle timeout) or were killed
                start_workers(repo, jobs)
            elif idle_polls >= 6:  # still nothing: a worker is stuck; stop it and start afresh
                stopped = stop_idle_workers(repo)
                bar.write(f"the queue did not move for {idle_polls} polls: stopped workers {stopped}, starting anew")
                time.sleep(poll_s)
                start_workers(repo, jobs)
                idle_polls = 0
            time.sleep(poll_s)
    finally:
        bar.close()
