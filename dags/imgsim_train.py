"""imgsim_train: train the embedding on the references' labels. Wiring only; logic is in ``imgsim``."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import AssetOrTimeSchedule, Param, dag, get_current_context, task
from airflow.timetables.trigger import CronTriggerTimetable

from imgsim.assets import EMBEDDER, LSH_MODEL
from imgsim.config import Settings
from imgsim.params import setting_param

DEFAULTS = Settings.from_env()

DOC = """
# imgsim_train

Trains the embedding on the labelled references of the catalog and publishes it as an
embedder version (`models/embedder/<version>/`: weights, ONNX export, spec, curve, held-out
metrics). The next `imgsim_index` run embeds every reference with it, learns the projection
again and rebuilds the index; queries embed with the embedder of the version they search.

Runs on `IMGSIM_TRAIN_SCHEDULE` (weekly: retrains when the labelled references changed at all)
and after each published index version (retrains when they grew or changed by more than
`IMGSIM_TRAIN_REFRESH`, 10%, or gained a class); the Param `force` trains regardless.

| task | what it does |
| --- | --- |
| `plan` | decides whether to train, and says why (skips the rest otherwise); too few labelled photos: skip, saying so |
| `train` | held-out split of the labelled references (10% per class, seeded); on a CPU the frozen stages' outputs are cached once and the top stages + a 512-d head trained (normalised softmax), on a GPU every layer with crop/flip augmentation; a line per epoch; published only if its held-out hit@1 beats the frozen backbone + LDA; emits `imgsim_embedder` |
"""


@dag(
    dag_id="imgsim_train",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(DEFAULTS.train_schedule, timezone="UTC"),
        assets=[LSH_MODEL],
    ),
    start_date=datetime.fromisoformat(DEFAULTS.index_start_date),
    catchup=False,
    max_active_runs=1,
    # a transient failure (a worker lost) is retried once; permanent ones fail at once
    default_args={"retries": 1, "retry_delay": timedelta(minutes=1)},
    tags=["imgsim", "train"],
    doc_md=DOC,
    params={
        "force": Param(
            False,
            type="boolean",
            title="Train now",
            description="train even if the labels did not change",
        ),
        "epochs": setting_param(DEFAULTS, "train_epochs"),
        "mode": setting_param(DEFAULTS, "train_mode"),
    },
)
def imgsim_train() -> None:
    @task.short_circuit
    def plan(params: dict[str, Any], dag_run: Any = None) -> dict[str, Any]:
        from imgsim.training.train import training_plan, trigger_of

        decided = training_plan(
            Settings.from_env(), force=params["force"], trigger=trigger_of(dag_run)
        )
        print(f"train: {decided['train']} ({decided['reason']})")
        return decided if decided["train"] else {}

    @task(outlets=[EMBEDDER])
    def train(decided: dict[str, Any], params: dict[str, Any], run_id: str) -> dict[str, Any]:
        from imgsim.training.train import run_task

        result = run_task(Settings.from_env(), params["epochs"], params["mode"], run_id)
        if result["version"]:
            get_current_context()["outlet_events"][EMBEDDER].extra = {"version": result["version"]}
        return result

    train(plan())


imgsim_train()
