"""``EffiModelSummary``: Lightning's rich model summary without a FLOPs column of zeros."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import RichModelSummary
from lightning.pytorch.utilities.model_summary.model_summary import get_formatted_model_size, get_human_readable_count
from typing_extensions import override

_RIGHT = {"Params", "Params per Device", "FLOPs", "In sizes", "Out sizes"}


class EffiModelSummary(RichModelSummary):
    """The same table as ``RichModelSummary`` (same arguments), with the FLOPs column and total shown only when
    Lightning measured them.

    Lightning counts FLOPs only for a module with ``example_input_array``; for every other module it prints a
    column of 0 and "Total FLOPs: 0", which reads as a measurement. The ``effi`` command uses this callback.
    """

    def __init__(self, max_depth: int = 1, **summarize_kwargs: Any) -> None:
        # Lightning reads max_depth only when it draws the table, after the Trainer has set everything up.
        if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < -1:
            raise ValueError(f"Invalid max_depth {max_depth!r}: must be -1 (every layer), 0 (no summary) or a "
                             "positive int (that many levels of submodules)")
        super().__init__(max_depth, **summarize_kwargs)

    @staticmethod
    @override
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if not (name == "FLOPs" and total_flops == 0)]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            table.add_column(name, justify="right" if name in _RIGHT else "left", no_wrap=name == "Name",
                             style="dim" if name == " " else None)
        for row in zip(*(values for _, values in columns)):
            table.add_row(*row)
        console = get_console()
        console.print(table)

        grid = Table.grid(expand=True)
        grid.add_column()
        rows = [("Trainable params", get_human_readable_count(int(trainable_parameters))),
                ("Non-trainable params", get_human_readable_count(int(total_parameters - trainable_parameters))),
                ("Total params", get_human_readable_count(int(total_parameters))),
                ("Total estimated model params size (MB)", get_formatted_model_size(model_size)),
                ("Modules in train mode", str(total_training_modes["train"])),
                ("Modules in eval mode", str(total_training_modes["eval"]))]
        if total_flops:
            rows.append(("Total FLOPs", get_human_readable_count(total_flops)))
        for label, value in rows:
            grid.add_row(f"[bold]{label}[/]: {value}")
        console.print(grid)
