"""What a study found: best.json (and the best trial's report), the refine of the best trials
as full fine-tunes, and the study's status for `tune --status`."""

from __future__ import annotations

import json
import math
from pathlib import Path

from imgclf import jobs
from imgclf.contract import BEST_FILE
from imgclf.errors import UserError
from imgclf.job_outputs import JobOutputs
from imgclf.tuning.monitor import trial_table
from imgclf.tuning.space import TuningSpace, trial_hyperparameters
from imgclf.tuning.study import STUDY_NAME, default_storage, study_storage
from imgclf.util import write_json

REFINED_FILE = "refined.json"


def write_best(study, space: TuningSpace, out_dir: Path) -> dict:
    try:
        best = study.best_trial
    except ValueError:
        raise UserError(f"no trial completed; see {out_dir}/trial-*/train.log") from None
    doc = {
        "hyperparameters": trial_hyperparameters(space, best.params),
        "objective": {"metric": space.metric, "type": space.direction, "value": best.value},
        "trial": best.number,
        "job_dir": best.user_attrs.get("job_dir"),
    }
    write_json(out_dir / BEST_FILE, doc)
    if doc["job_dir"]:
        _write_report(Path(doc["job_dir"]))
    return doc


def _write_report(job_dir: Path) -> None:
    """The trials ran without their reports: the best one gets its report now."""
    from imgclf import report

    path = report.write_report_or_warn(job_dir, print)
    if path is not None:
        print(f"best trial's report: {path}")


def refine(
    space: TuningSpace,
    *,
    data_dir: Path,
    out_dir: Path,
    count: int,
    init_model: Path | None = None,
) -> dict:
    """The `count` best trials again as full fine-tunes (features_cache off, the rest as the
    trial had it), one after another; best.json then names the best full fine-tune. Used after
    a study on cached features: cheap trials rank, the full runs decide. Runs already finished
    are not repeated on resume. `init_model`: the model every trial started from."""
    import optuna

    study = optuna.load_study(
        study_name=STUDY_NAME, storage=study_storage(default_storage(out_dir))
    )
    sign = 1.0 if space.direction == "minimize" else -1.0
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    done.sort(key=lambda t: sign * t.value)
    results = []
    for trial in done[:count]:
        hps = trial_hyperparameters(space, trial.params)
        hps["features_cache"] = "false"
        hps.pop("features_dir", None)
        name = f"refine-{trial.number:03d}"
        outputs = JobOutputs.of(out_dir / "jobs" / name)
        history_file = outputs.layout.history_file
        if not history_file.exists():
            job = jobs.prepare_job(
                out_dir, name, data_dir=data_dir, hyperparameters=hps, init_model=init_model
            )
            print(f"refining trial {trial.number} as a full fine-tune ({job.layout.base})")
            code = jobs.run_job(job, jobs.train_command(), jobs.job_environment(job), echo=False)
            if code != 0 or not history_file.exists():
                reason = jobs.read_failure(job) or f"exit {code}, see {job.log_file}"
                print(f"refine of trial {trial.number} failed: {reason.strip()[:500]}")
                continue
        history = outputs.history()
        values = [row[space.metric] for row in history if math.isfinite(row[space.metric])]
        if not values:
            continue
        value = min(values, key=lambda v: sign * v)
        results.append(
            {
                "trial": trial.number,
                "cached_value": trial.value,
                "value": value,
                "hyperparameters": hps,
                "job_dir": str(out_dir / "jobs" / name),
            }
        )
    if not results:
        raise UserError(f"no refine run finished; see {out_dir}/jobs/refine-*/train.log")
    write_json(out_dir / REFINED_FILE, results)
    best = min(results, key=lambda r: sign * r["value"])
    doc = {
        "hyperparameters": best["hyperparameters"],
        "objective": {"metric": space.metric, "type": space.direction, "value": best["value"]},
        "trial": best["trial"],
        "job_dir": best["job_dir"],
        "refined_from_cached_features": True,
    }
    write_json(out_dir / BEST_FILE, doc)
    return doc


def load_status(out_dir: Path, storage: str | None = None) -> tuple[dict, list[list[str]]]:
    import optuna

    meta_file = out_dir / "space.json"
    if not meta_file.exists():
        raise UserError(f"{out_dir} is not a tuning dir (no space.json)")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{meta_file} cannot be read ({exc}); the tuning dir is damaged") from None
    if not isinstance(meta, dict) or not {"metric", "direction"} <= meta.keys():
        raise UserError(f"{meta_file} lacks the metric and direction; the tuning dir is damaged")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(
        study_name=STUDY_NAME, storage=study_storage(storage or default_storage(out_dir))
    )
    return meta, trial_table(study, meta["metric"], meta["direction"])
