"""A stage that uses another's result, composed here, above both: ``share --groups K`` plans with
the analysis stage when no ``analysis.json`` is given. The stages themselves stay siblings.
"""

from __future__ import annotations

from ..contract import StageRun
from ..layer_groups import Grouping
from ..models import LoadedModel
from ..record import StageRecord
from ..sharing.config import ShareConfig


def analysis_grouping(loaded: LoadedModel, config: ShareConfig) -> Grouping:
    """The grouping `compressor.analysis.analyze` recommends for ``config.groups`` by
    ``config.plan_metric``, on the share's own text options. The model is back on the CPU after
    (the analysis ran on ``config.device``; the surgery works on the CPU)."""
    from ..analysis import AnalyzeConfig, analyze

    weight_metric = config.plan_metric.endswith("weight")
    analysis_config = AnalyzeConfig(
        groups=config.groups, metric=config.plan_metric, weights=weight_metric, activations=not weight_metric,
        data=config.data, text_column=config.text_column, encoding=config.encoding,
        max_samples=config.max_samples, max_length=config.max_length, batch_size=config.batch_size,
        device=config.device,
    )
    _, record = analyze(loaded, analysis_config)
    loaded.model.cpu()
    return Grouping.from_dict(record.metrics["grouping"])


def share(loaded: LoadedModel, config: ShareConfig):
    """`compressor.sharing.share`, analyzing first for ``groups`` without an ``analysis`` file.

    Returns:
        ``(model, record)``, as the sharing stage's.
    """
    from ..sharing.stage import check_selection
    from ..sharing.stage import share as share_stage

    if config.groups is None or config.analysis is not None:
        return share_stage(loaded, config)
    check_selection(loaded, config)  # a bad selection fails before the analysis
    return share_stage(loaded, config, grouping=analysis_grouping(loaded, config))


def run_share(run: StageRun) -> StageRecord:
    """The share stage's runner, planning ``--groups K`` with the analysis stage."""
    from ..sharing.runner import run_share as share_folder

    return share_folder(run.model, run.config, run.output, overwrite=run.overwrite,
                        trust_remote_code=run.trust_remote_code, plan_with=analysis_grouping,
                        dtype=run.dtype)
