"""Whether the fields of a manifest fit one stream layout under a `DataConfig`: the rule the Ray Data
pipeline applies before building a dataset and preflight applies before Ray starts."""

from __future__ import annotations

import pandas as pd

from cellfm.config import DataConfig


def field_layout_problems(manifest: pd.DataFrame, data: DataConfig, source: str = "") -> list[str]:
    """Whether the fields of `manifest` fit one layout under `data`: channel counts within
    `data.pad_channels_to`, one field size unless `data.field_size` sets it, one dtype when
    `data.normalization=none`."""
    where = f" (in {source})" if source else ""
    problems = []
    counts = manifest["channel_names"].map(len)
    if data.mixed_channels == "pad" and data.pad_channels_to and int(counts.max()) > data.pad_channels_to:
        row = manifest.loc[counts.idxmax()]
        problems.append(f"data.pad_channels_to={data.pad_channels_to} is smaller than the {counts.max()} channels of "
                        f"plate {row['plate']!r} well {row['well']} field {row['field']}{where}; "
                        f"set it to 0 (the largest count) or >= {counts.max()}")
    if not data.field_size:
        sizes = manifest.groupby(["height", "width"]).size()
        if len(sizes) > 1:
            examples = ", ".join(
                f"{h}x{w} (e.g. plate {manifest.loc[(manifest.height == h) & (manifest.width == w), 'plate'].iloc[0]!r})"
                for h, w in sizes.index[:4])
            problems.append(f"fields of different sizes in one dataset{where}: {examples}; set data.field_size "
                            f"(with data.field_resize crop|resize) to deliver one size")
    if data.normalization == "none":
        dtypes = sorted(set(manifest["dtype"]))
        if len(dtypes) > 1:
            problems.append(f"data.normalization=none with fields of several dtypes {dtypes}{where}; "
                            f"choose a normalization")
    return problems
