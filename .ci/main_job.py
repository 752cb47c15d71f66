#!/usr/bin/env python3
"""Fresh-machine check of the README's main job (run by .ci/run after the tests).

Reads the README's "Run it" line (venv && pip install && demo-data && eval), then in a temporary folder:

1. creates a NEW venv and runs the README's install step in it, verbatim (``pip install -e ".[offline]"``
   from the repo root, nothing else), so a dependency that only the ``test`` extra brings in shows up;
2. runs the README's ``demo-data`` step for the ID split plus a few shifted synthetic splits;
3. runs the README's ``eval`` step with the same flags, only ``--tasks`` narrowed to those splits and a
   short estimator fit / bootstrap, fully offline (HF_HUB_OFFLINE=1, empty caches);
4. checks with the new venv's python that the emi_report_*.{json,csv,md,png} files exist and that every
   task's EMI is a finite number.

Stdlib only; exits non-zero with a "main-job check FAILED: ..." line on any problem.
Set LMMS_EMI_KEEP_MAIN_JOB=1 to keep the temporary folder (venv, data, results) for inspection.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# ID split first, then one visual, one text and one joint shift (3 OOD tasks: enough for a correlation).
SPLITS = (
    "llava_bench_coco",
    "llava_bench_coco_frost_5",
    "llava_bench_coco_sr_7",
    "llava_bench_coco_defocus_blur_3_KeyboardAug_3",
)
TASK_PREFIX = "lbshift_syn_"
ESTIMATOR_STEPS = "200"
BOOTSTRAP = "50"
TIMEOUTS = {"venv": 300, "install": 30 * 60, "demo-data": 10 * 60, "eval": 20 * 60, "check": 120}

CHECK = r"""
import glob, json, math, os, sys

out, expected = sys.argv[1], sys.argv[2].split(",")
problems = []
if not glob.glob(os.path.join(out, "**", "*_results.json"), recursive=True):
    problems.append(f"no lmms-eval *_results.json under {out}")
reports = sorted(glob.glob(os.path.join(out, "**", "*emi_report_*.json"), recursive=True))
if not reports:
    problems.append(f"no *emi_report_*.json under {out}")
seen = set()
for path in reports:
    stem = path[: -len(".json")]
    for ext in (".csv", ".md", ".png"):
        if not os.path.isfile(stem + ext) or os.path.getsize(stem + ext) == 0:
            problems.append(f"missing or empty {stem + ext}")
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    tasks = report.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        problems.append(f"{path}: no 'tasks' list")
        continue
    for t in tasks:
        name, emi = t.get("task"), t.get("emi")
        seen.add(name)
        ok = isinstance(emi, (int, float)) and not isinstance(emi, bool) and math.isfinite(emi)
        print(f"  {os.path.basename(path)}: {name}: emi = {emi!r}")
        if not ok:
            problems.append(f"{path}: task {name!r} has emi = {emi!r}, not a finite number")
missing = [t for t in expected if t not in seen]
if missing:
    problems.append(f"tasks without an EMI in any report: {', '.join(missing)}")
if problems:
    print("\n".join("  problem: " + p for p in problems))
    sys.exit(1)
print(f"  {len(reports)} report(s), {len(seen)} task(s), all EMI finite")
"""


class CheckFailed(Exception):
    pass


def readme_steps() -> list[list[str]]:
    """The README's main-job line, split into its four steps (argv lists with the README's .venv paths)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("python3 -m venv .venv && ")]
    runs = [ln for ln in lines if " demo-data " in ln and " eval " in ln]
    if len(runs) != 1:
        raise CheckFailed(
            "cannot find exactly one README line 'python3 -m venv .venv && ... demo-data ... eval ...' "
            "(did the README's run line change? update .ci/main_job.py)"
        )
    steps = [shlex.split(part) for part in runs[0].split(" && ")]
    shape = [
        ["python3", "-m", "venv", ".venv"],
        [".venv/bin/pip", "install"],
        [".venv/bin/lmms-emi", "demo-data"],
        [".venv/bin/lmms-emi", "eval"],
    ]
    if len(steps) != 4 or any(s[: len(want)] != want for s, want in zip(steps, shape, strict=True)):
        raise CheckFailed(f"README run line has an unexpected shape: {runs[0]!r}; update .ci/main_job.py")
    return steps


def with_venv(argv: list[str], venv: Path) -> list[str]:
    if not argv[0].startswith(".venv/"):
        return argv
    return [str(venv / argv[0][len(".venv/") :]), *argv[1:]]


def narrowed_eval(argv: list[str], tasks: list[str]) -> list[str]:
    """The README's eval argv with --tasks replaced and a short estimator fit / bootstrap appended."""
    out, i, replaced = [], 0, False
    while i < len(argv):
        if argv[i] == "--tasks":
            out += ["--tasks", ",".join(tasks)]
            i, replaced = i + 2, True
            continue
        if argv[i].startswith("--tasks="):
            out.append("--tasks=" + ",".join(tasks))
            i, replaced = i + 1, True
            continue
        out.append(argv[i])
        i += 1
    if not replaced:
        raise CheckFailed("README eval step has no --tasks; update .ci/main_job.py")
    return [*out, "--estimator_steps", ESTIMATOR_STEPS, "--bootstrap", BOOTSTRAP]


def flag_value(argv: list[str], flag: str) -> str:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    raise CheckFailed(f"README eval step has no {flag}; update .ci/main_job.py")


def run(
    name: str,
    argv: list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    log: Path | None = None,
    shown: str | None = None,
) -> float:
    """Run one step (output to the console, or to ``log`` with its tail shown on failure); seconds taken."""
    shown = shown or shlex.join(argv)
    print(f"\n[main-job] {name}: {shown}  (in {cwd})", flush=True)
    t0 = time.monotonic()
    try:
        if log is None:
            proc = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, timeout=TIMEOUTS[name])
        else:
            with log.open("w") as f:
                proc = subprocess.run(
                    argv,
                    cwd=cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    timeout=TIMEOUTS[name],
                )
    except subprocess.TimeoutExpired:
        proc = None
    dt = time.monotonic() - t0
    if proc is None or proc.returncode != 0:
        if log is not None and log.exists():
            tail = log.read_text(errors="replace").splitlines()[-60:]
            print(f"[main-job] last lines of {log}:\n" + "\n".join(tail), flush=True)
        why = f"timed out after {TIMEOUTS[name]} s" if proc is None else f"exit code {proc.returncode}"
        raise CheckFailed(f"step '{name}' failed ({why}): {shown}")
    print(f"[main-job] {name}: ok in {dt:.0f} s", flush=True)
    return dt


def tree_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for fn in files:
            p = os.path.join(root, fn)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return total


def main() -> int:
    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="lmms-emi-main-job-"))
    keep = os.environ.get("LMMS_EMI_KEEP_MAIN_JOB", "") not in ("", "0")
    timings: dict[str, float] = {}
    try:
        steps = readme_steps()
        venv = work / "venv"
        tasks = [TASK_PREFIX + s for s in SPLITS]

        # Installs get the caller's environment minus anything pointing at another venv or source tree.
        drop = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")
        base_env = {k: v for k, v in os.environ.items() if k not in drop}
        base_env["PATH"] = os.pathsep.join(
            p for p in base_env.get("PATH", "").split(os.pathsep) if not re.search(r"[/\\]\.venv[/\\]", p)
        )
        # The job itself runs like on a fresh machine: no hub, empty caches.
        job_env = {
            **base_env,
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_HOME": str(work / "hf"),
            "LMMS_EMI_EMBEDDING_CACHE": str(work / "emi-cache"),
            "XDG_CACHE_HOME": str(work / "cache"),
            "MPLCONFIGDIR": str(work / "mpl"),
            "PYTHONNOUSERSITE": "1",
        }
        run_dir = work / "job"
        run_dir.mkdir()

        timings["venv"] = run("venv", ["python3", "-m", "venv", str(venv)], cwd=REPO, env=base_env)
        timings["install"] = run(
            "install", with_venv(steps[1], venv), cwd=REPO, env=base_env, log=work / "pip-install.log"
        )
        size = tree_size(venv)
        print(f"[main-job] venv size: {size / 2**30:.2f} GiB", flush=True)
        timings["demo-data"] = run(
            "demo-data", [*with_venv(steps[2], venv), "--scenarios", *SPLITS], cwd=run_dir, env=job_env
        )
        eval_argv = narrowed_eval(with_venv(steps[3], venv), tasks)
        timings["eval"] = run("eval", eval_argv, cwd=run_dir, env=job_env)
        out = run_dir / flag_value(eval_argv, "--output_path")
        timings["check"] = run(
            "check",
            [str(venv / "bin" / "python"), "-c", CHECK, str(out), ",".join(tasks)],
            cwd=run_dir,
            env=job_env,
            shown=f"{venv / 'bin' / 'python'} -c <report check> {out} {','.join(tasks)}",
        )
    except CheckFailed as exc:
        print(f"\nmain-job check FAILED: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if keep:
            print(f"[main-job] kept {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
        wall = time.monotonic() - t_start
        parts = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
        print(f"[main-job] wall time {wall:.0f} s incl. cleanup ({parts})", flush=True)
    print("main-job check passed: the README's install line is enough for the README's main job", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
