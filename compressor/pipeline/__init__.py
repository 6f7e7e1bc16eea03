"""Recipes and batches: a pipeline of stages over one model (`compress run`), and many models
through many recipes, locally or on Ray (`compress batch`).

* `recipe`: a recipe's YAML, validated into the stages' own configs, with line numbers;
* `stages`: the registry, stage name -> (config class, runner on folders), and the recipe schema;
* `job`: one model through one recipe in its folder; hashes, markers, resume;
* `manifest`: a batch manifest, validated into jobs (models x recipes, or a list);
* `executors`: running jobs in process, in a process pool or as Ray tasks;
* `batch`: planning and running a manifest's jobs, and the summary;
* `events`: progress events, text or JSON lines.
"""

from .batch import BatchSummary, job_for_recipe, load_manifest, plan_batch, run_batch
from .events import LOG_FORMATS, EventLog
from .job import Job, JobPlan, JobResult, plan_job, run_job
from .recipe import Recipe, StageSpec, load_recipe
from .stages import STAGES, Stage, StageRun, get_stage, register

__all__ = [
    "LOG_FORMATS",
    "STAGES",
    "BatchSummary",
    "EventLog",
    "Job",
    "JobPlan",
    "JobResult",
    "Recipe",
    "Stage",
    "StageRun",
    "StageSpec",
    "get_stage",
    "job_for_recipe",
    "load_manifest",
    "load_recipe",
    "plan_batch",
    "plan_job",
    "register",
    "run_batch",
    "run_job",
]
