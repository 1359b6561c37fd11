"""`sdkit hypernet`: inspect A1111 hypernetworks; explain why they cannot be baked."""

from __future__ import annotations

import json
from typing import Any

import click
from sdkit.cli.tables import Table

from sdkit.cli.main import cli
from sdkit.cli.preflight import require_inputs
from sdkit.cli.terminal import SafeConsole
from sdkit.errors import SdkitError


@cli.group("hypernet")
def hypernet_group() -> None:
    """A1111 hypernetworks (.pt).

    Example: sdkit hypernet inspect my-hypernet.pt
    """


def hypernet_report(path: str) -> dict[str, Any]:
    """What `inspect` shows: settings, widths and sizes of an A1111 hypernetwork file."""
    from sdkit.adapters.hypernet import activation_classes, hypernetwork_from_model
    from sdkit.io import open_model

    with open_model(path) as model:
        hn = hypernetwork_from_model(model)
        dtypes = sorted({info.dtype for info in model.infos.values()})
    settings = hn.settings
    return {
        "path": path, "name": hn.name, "step": hn.step, "sizes": hn.sizes,
        "layer_structure": list(settings.layer_structure),
        "activation": settings.activation_func or "linear",
        "activation_module": None if settings.activation_func in (None, "linear")
        else activation_classes()[settings.activation_func].__name__,
        "activate_output": settings.activate_output, "layer_norm": settings.add_layer_norm,
        "dropout": list(settings.dropouts()), "weight_init": settings.weight_init,
        "parameters": hn.parameter_count, "dtypes": dtypes,
        "sd_checkpoint_name": hn.sd_checkpoint_name, "optional_info": hn.optional_info,
    }


@hypernet_group.command("inspect")
@click.argument("path", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def inspect_command(path: str, as_json: bool) -> None:
    """Tell a hypernetwork's widths, layer structure, activation, norm, dropout and size.

    Example: sdkit hypernet inspect anime.pt --json
    """
    require_inputs(path)
    report = hypernet_report(path)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    table = Table(title=path, show_header=False, title_justify="left")
    table.add_column(style="bold cyan")
    table.add_column()
    activation = report["activation"]
    if report["activation_module"]:
        activation += f" ({report['activation_module']})"
    rows = [("name", report["name"]), ("step", report["step"]),
            ("context widths", ", ".join(map(str, report["sizes"]))),
            ("layer structure", report["layer_structure"]), ("activation", activation),
            ("activate output", report["activate_output"]), ("layer norm", report["layer_norm"]),
            ("dropout", report["dropout"]), ("weight init", report["weight_init"]),
            ("parameters", f"{report['parameters']:,}"), ("dtype", ", ".join(report["dtypes"])),
            ("trained on", report["sd_checkpoint_name"]), ("info", report["optional_info"])]
    for label, value in rows:
        if value is not None:
            table.add_row(label, str(value))
    SafeConsole().print(table)


@hypernet_group.command("bake", context_settings={"ignore_unknown_options": True,
                                                  "allow_extra_args": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bake_command(args: tuple[str, ...]) -> None:
    """Hypernetworks cannot be baked into a checkpoint; this explains why.

    Example: sdkit sample model.safetensors --hypernet anime.pt:0.8 (apply while sampling)
    """
    files = [arg for arg in args if arg.lower().endswith(".pt")]
    where = f"{files[-1]}: " if files else ""
    raise SdkitError(f"{where}a hypernetwork cannot be baked into checkpoint weights: it runs a "
                     "non-linear MLP on the attention context at every step, which no change of "
                     "the weights reproduces; apply it while sampling with "
                     "`sdkit sample --hypernet FILE[:STRENGTH]`")
