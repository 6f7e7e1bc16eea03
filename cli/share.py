"""`compress share`: merge layers into shared groups, with optional per-layer LoRA deltas."""

from __future__ import annotations

import json

import click

from cli.main import cli, echo_rows, emit_result
from compressor.analysis.config import METRICS
from compressor.sharing.config import INITS, LORA_INITS


@cli.command()
@click.argument("model", required=False)
@click.option("--groups", type=int, default=None, help="Number of groups; the plan is the best contiguous one (see `compress analyze`).")
@click.option("--plan", default=None, help='Groups as "0-1,2-3,4-5", or a JSON file (a list of groups, or an analysis.json).')
@click.option("-o", "--output", required=True, type=click.Path(), help="Folder for the compressed checkpoint.")
@click.option("--share", "share_", default="attention,ffn", show_default=True, help="Sublayers to share: attention, ffn, or roles (query, ffn_in, ...).")
@click.option("--init", type=click.Choice(INITS), default="aligned-mean", show_default=True, help="How the shared weight starts.")
@click.option("--lora-rank", type=int, default=0, show_default=True, help="Rank of each layer's delta on every shared linear (0: none).")
@click.option("--lora-init", type=click.Choice(LORA_INITS), default="svd", show_default=True, help="svd: delta from the SVD of the residual; zero: plain LoRA.")
@click.option("--lora-alpha", type=float, default=None, help="Delta scaling numerator (scaling = alpha / rank; default rank).")
@click.option("--plan-metric", type=click.Choice(METRICS), default="cka", show_default=True, help="Similarity that picks the plan with --groups.")
@click.option("--fidelity/--no-fidelity", default=True, show_default=True, help="Compare with the original on calibration text.")
@click.option("--data", type=click.Path(), default=None, help="Calibration text (.txt, .csv, .tsv, .jsonl; default: built-in sentences).")
@click.option("--text-column", default=None, help="Column (csv/tsv) or key (jsonl) holding the text.")
@click.option("--encoding", default="utf-8", show_default=True)
@click.option("--max-samples", type=int, default=64, show_default=True, help="Texts for the plan and the fidelity check.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "json_path", type=click.Path(), default=None, help="Also write the record as JSON here ('-' prints it instead of the summary).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the checkpoint's own Python code to run.")
def share(model, groups, plan, output, share_, init, lora_rank, lora_init, lora_alpha, plan_metric, fidelity, data,
          text_column, encoding, max_samples, device, json_path, overwrite, trust_remote_code):
    """Merge MODEL's layers into shared groups and write a compressed checkpoint to OUTPUT.

    Layers of a group use one set of weights for the shared sublayers; each keeps its own
    norms and biases, and with --lora-rank its own low-rank delta. The checkpoint stores every
    shared tensor once; every compress command takes it as MODEL.
    """
    from compressor.io import check_distinct, check_writable
    from compressor.sharing import ShareConfig

    config = ShareConfig(
        groups=groups, plan=plan, share=share_, init=init, lora_rank=lora_rank, lora_init=lora_init,
        lora_alpha=lora_alpha, plan_metric=plan_metric, fidelity=fidelity, data=data, text_column=text_column,
        encoding=encoding, max_samples=max_samples, device=device,
    )
    check_distinct(output, json_path)
    check_writable(output, overwrite=overwrite, folder=True)
    if json_path and json_path != "-":
        check_writable(json_path, overwrite=overwrite)

    from compressor.models import load_model
    from compressor.sharing import save_checkpoint
    from compressor.sharing import share as run_share
    from compressor.sharing.render import share_reports, share_summary_rows

    loaded = load_model(model, trust_remote_code=trust_remote_code)
    loaded, record = run_share(loaded, config)
    save_checkpoint(loaded, output, overwrite=overwrite, extra_files=share_reports(record, loaded.name))
    result = json.dumps(record.to_dict(), indent=2)
    if emit_result(result, json_path):
        return
    echo_rows(share_summary_rows(record))
    if record.metrics.get("note"):
        click.echo("\n" + record.metrics["note"])
    click.echo(f"wrote {output}")
