"""Runs bad inputs through ``neuroprune validate`` and the real ``train`` set-up in ONE process (see
tests/test_errors.py), as one rank, so a launch pays the imports once.

Usage: ``python tests/refusal_worker.py PLAN.json`` from the directory the plan's relative paths start in.
The plan is a list of ``{"name", "commands": ["validate"|"train"|"snapshot", ...], "config", "deepspeed",
"overrides", "env"}``; each command's exit status and stderr go to ``<plan>.results.json`` ("snapshot"
records a digest of every file under ``config``, a directory).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import traceback
from pathlib import Path

from worker_harness import start_plan_worker

from neuroprune_ds.distributed import barrier_and_exit


def main(plan_path: str) -> None:
    plan = start_plan_worker(plan_path)
    from neuroprune_ds import cli, train

    results = {}
    for case in plan:
        arguments = [case["config"], "--deepspeed", case["deepspeed"], *case.get("overrides", [])]
        outcome = {}
        for command in case["commands"]:
            saved_env = {key: os.environ.get(key) for key in case.get("env", {})}
            os.environ.update(case.get("env", {}))
            stderr = io.StringIO()
            if command == "snapshot":  # the bytes of every file under the config path, to compare later
                outcome[command] = {"code": 0, "files": _digests(Path(case["config"]))}
                continue
            with contextlib.redirect_stderr(stderr):
                try:
                    if command == "validate":
                        code = cli.main(["validate", *arguments])
                    else:
                        code = train.run_training(train.parse_args(["--config", *arguments]))
                except Exception:  # noqa: BLE001 - recorded for the test to show
                    code = "exception"
                    traceback.print_exc()
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key)
                else:
                    os.environ[key] = value
            outcome[command] = {"code": code, "stderr": stderr.getvalue()}
        results[case["name"]] = outcome
        print(f"refusal_worker: {case['name']}: " + ", ".join(f"{c} {o['code']}" for c, o in outcome.items()),
              flush=True)
    Path(f"{plan_path}.results.json").write_text(json.dumps(results))
    barrier_and_exit(0)


def _digests(directory: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


if __name__ == "__main__":
    main(sys.argv[1])
