"""`compress export`: an ONNX folder optimum loads, checked against PyTorch, optionally quantized.

Its flags are the export config's and, under ``--quantize``, every registered quantization
method's (`compressor.quantization.config.method_option_specs`), read from the registry each
time the command is parsed or its help shown: a method registered after import has its name and
its options here too.
"""

from __future__ import annotations

import json

import click

from cli.main import cli, echo_rows, emit_result
from cli.options import build_config, check_json, checkpoint_outputs, click_option, config_options, dtype_option, plain
from compressor.export.config import ExportConfig

#: Click settings of the quantization flags that differ from their specs: off unless asked (an
#: export is fp32 by default), and the text options' help names both readers of text.
_OVERRIDES = {
    "mode": {"default": None, "show_default": False},
    "text_column": {"help": "Column (csv/tsv) or key (jsonl) holding the text of --check-data and --calibration."},
    "encoding": {"help": "Text encoding of --check-data and --calibration.", "show_default": True},
}


def quantization_options(declared: set[str]) -> list[click.Option]:
    """The ``--quantize`` choice and the registered methods' options (those not declared by the
    export config already: the text options both read), as click options; each option's help
    names the methods it is for, the method's own options after the shared ones.

    Raises:
        TypeError: a method option named like one of the export's own (one flag cannot feed both).
    """
    from compressor.config import TextFormat, option_specs
    from compressor.quantization.config import method_option_specs, methods

    text = {s.name for s in option_specs(TextFormat)}
    specs = method_option_specs()
    clash = sorted({s.name for s in specs} & declared - text)
    if clash:
        raise TypeError(f"quantization option(s) {', '.join(clash)} are also export options; rename them")
    # shared by several methods first, then each method's own, the check threshold last
    specs = sorted((s for s in specs if s.name not in declared),
                   key=lambda s: (s.name != "mode", s.name == "min_cosine", len(s.methods or methods()) == 1))
    fields = {s.name for s in specs} | declared
    options = []
    for spec in specs:
        override = dict(_OVERRIDES.get(spec.name, {}))
        if spec.name == "mode":
            about = "; ".join(f"{name}: {cls.summary}" if cls.summary else name for name, cls in methods().items())
            override["help"] = f"Quantize the export with this method ({about}). Off by default."
        elif spec.name == "min_cosine":  # each method's own default, from the registry
            defaults = ", ".join(f"{cls.default_min_cosine:g} {name}" for name, cls in methods().items())
            override["help"] = (f"The export fails if its outputs' mean cosine to PyTorch's, per output vector, is "
                                f"below this. Default per method: {defaults}.")
        elif spec.methods and "help" not in override:
            override["help"] = f"[{', '.join(spec.methods)}] {plain(spec.help, fields)}"
        decorate = click_option(spec, name="--quantize" if spec.name == "mode" else None, fields=fields, **override)
        options.extend(decorate(lambda: None).__click_params__)
    return options


class ExportCommand(click.Command):
    """A command whose quantization options come from the method registry when it is used (made
    once per state of the registry: click tells options apart by identity while parsing)."""

    _made: tuple | None = None

    @property
    def params(self) -> list[click.Parameter]:
        from compressor.quantization.config import methods

        state = tuple(methods().items())
        if self._made is None or self._made[0] != state:
            declared = {p.name for p in self._params}
            # after the export config's options, before --fp16 and the output options
            split = next((i for i, p in enumerate(self._params) if p.name == "fp16"), len(self._params))
            self._made = (state, self._params[:split] + quantization_options(declared) + self._params[split:])
        return self._made[1]

    @params.setter
    def params(self, value: list[click.Parameter]) -> None:
        self._params, self._made = value, None


@cli.command(cls=ExportCommand)
@click.argument("model", required=False)
@config_options(ExportConfig, overrides={k: v for k, v in _OVERRIDES.items() if k != "mode"})
@click.option("--fp16", is_flag=True, help="Half-precision weights and compute, for GPU targets (as --quantize fp16).")
@checkpoint_outputs("Folder for model.onnx, config.json and the tokenizer.")
@dtype_option
def export(model, output, fp16, json_path, overwrite, trust_remote_code, dtype, **options):
    """Export MODEL to ONNX in OUTPUT, in the layout optimum's ORTModelFor* classes load.

    The folder is loaded back through optimum and compared with PyTorch on real text at several
    lengths before it is written; an export past the tolerance fails (exit 1) and writes nothing.
    Weights that layers share are stored once, also after quantization.
    """
    from compressor.errors import ConfigError
    from compressor.export.render import export_summary_rows
    from compressor.export.runner import quantize_config, run_export

    mode = options.pop("mode")
    if fp16 and mode not in (None, "fp16"):
        raise ConfigError("give --quantize or --fp16, not both")
    config = build_config(ExportConfig, options)
    ctx = click.get_current_context()
    given = {name for name in options if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT}
    qconfig = quantize_config("fp16" if fp16 else mode, options, given)
    check_json(json_path, output, overwrite=overwrite)
    record = run_export(model, config, output, quantize=qconfig, overwrite=overwrite, trust_remote_code=trust_remote_code,
                        dtype=dtype)
    if emit_result(json.dumps(record.to_dict(), indent=2), json_path):
        return
    echo_rows(export_summary_rows(record), output)
