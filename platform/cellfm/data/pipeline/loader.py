"""The read task of a field stream: ``FieldLoader`` reads each field of a block of manifest rows (one Zarr
shard each, all channels, optionally through the Rust ``zarrs`` codec pipeline; a ``data.field_size``
centre crop reads only the tiles it covers), normalizes it straight into the batch in the transfer dtype,
permutes its channels when training and pads it to the stream's channel count. Read and normalize are
fused, so only the normalized field crosses Ray's object store."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from cellfm.config import DataConfig
from cellfm.data.cells import cell_crop_batch
from cellfm.data.normalize import normalize_field, quantize_unit
from cellfm.data.pipeline.layout import (CHANNEL_SEPARATOR, FIELD_INDEX, LABELS_COLUMN, PAD_CHANNEL_NAME, READ_COLUMNS,
                                         StreamLayout)
from cellfm.data.pipeline.monitor import BadFieldError, too_many_bad_message
from cellfm.data.plate import PlateError, read_field
from cellfm.progress import log_line
from cellfm.seeding import Stream, numpy_rng

if TYPE_CHECKING:
    from cellfm.data.pipeline.cache import FieldCache

_ZARRS_SET: bool | None = None


def _ensure_codec_pipeline(use_zarrs: bool) -> None:
    """Select zarr's codec pipeline once per worker process (zarr's config is process-global)."""
    global _ZARRS_SET
    if _ZARRS_SET is use_zarrs:
        return
    from cellfm.data.plate import use_zarrs as select

    active = select(use_zarrs)
    if use_zarrs and not active:
        log_line("data.use_zarrs=true but zarrs is not installed (pip install 'cellfm[zarrs]'); using zarr's pipeline")
    _ZARRS_SET = use_zarrs


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, H, W) float -> (C, height, width), bilinear with antialiasing when shrinking."""
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    out = F.interpolate(tensor, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return out[0].numpy()



class FieldLoader:
    """Ray Data batch UDF: reads each field of a batch of manifest rows and normalizes it.

    Output batch: ``image`` (N, C, H, W) in ``layout.dtype`` (float16 [0, 1] by default; C = the
    padded count, padded channels zero, or with ``mixed_channels=group`` the block's one channel
    count), ``channel_mask`` (N, C) bool, ``channel_names`` (N,) comma-joined names in the
    image's channel order (after permutation, when enabled; ``""`` for padding), plus ``keep_columns``.
    With ``permute_channels``, a field's channel order is drawn from (``seed``, ``epoch``, its
    ``field_index``): the same in every rerun, a new one every epoch. With a ``cache`` (``FieldCache``)
    the normalized fields come from Ray's object store instead of the plates, bit for bit the same rows.
    With ``cell_crop_size`` (``data.crop_mode=cells``) each field leaves as one row per cell centre of its
    CELLS_Y / CELLS_X columns (``cellfm.data.cells.cell_crop_batch``), after normalization and permutation.
    """

    def __init__(self, cfg: DataConfig, permute_channels: bool, keep_columns: Sequence[str] = (),
                 layout: StreamLayout | None = None, monitor=None, max_bad: int = 0, total: int = 0,
                 seed: int = 0, epoch: int = 0, cache: "FieldCache | None" = None, cell_crop_size: int = 0):
        self.cfg = cfg
        self.cell_crop_size = cell_crop_size
        self.cache = cache
        self._cached_blocks: dict[int, dict[str, np.ndarray]] = {}
        self.permute_channels = permute_channels
        self.seed = seed
        self.epoch = epoch
        self.keep_columns = list(keep_columns)
        self.layout = layout
        self.monitor = monitor
        self.max_bad = max_bad
        self.total = total

    def _read_into(self, row: dict, out: np.ndarray, field_index: int) -> list[str]:
        """Read one field and write it, normalized, into ``out`` (this sample's slot of the batch:
        (C_padded, H, W) in the transfer dtype); returns its channel names in the order written.

        Channels are permuted (``permute_channels``) by reading them in the permuted order, and
        percentile clipping writes straight into ``out``: a field crosses memory once after decoding.
        """
        cfg, layout = self.cfg, self.layout
        where = (str(row["store_uri"]), str(row["row"]), str(row["col"]), int(row["field"]))
        height, width = int(row["height"]), int(row["width"])
        region = None
        # The manifest's height/width are full resolution: another level is read whole, then fitted.
        crop = (cfg.field_size and cfg.field_resize == "crop" and height >= layout.height and width >= layout.width
                and not cfg.resolution_level)
        if crop and (height, width) != (layout.height, layout.width):
            y0, x0 = (height - layout.height) // 2, (width - layout.width) // 2
            region = (y0, y0 + layout.height, x0, x0 + layout.width)
        names = list(row["channel_names"])
        order = np.arange(len(names))
        if self.permute_channels:
            order = numpy_rng(self.seed, Stream.CHANNEL_PERMUTATION, self.epoch, field_index).permutation(len(names))
            names = [names[j] for j in order]
        if self.cache is not None:
            # Normalization, cropping and resizing act on each channel alone, so permuting the cached
            # channels gives what reading them in the permuted order gives.
            image, cached_names = self.cache.field(field_index, self._cached_blocks, row)
            out[: len(order)] = image[order]
            return [cached_names[j] for j in order]
        labels = row.get(LABELS_COLUMN)
        image, channels = read_field(*where, channels=names, storage_options=cfg.storage_options or None, region=region,
                                     z_plane=cfg.z_plane, z_projection=cfg.z_projection,
                                     resolution_level=cfg.resolution_level,
                                     labels=list(labels) if isinstance(labels, (list, np.ndarray)) and len(labels) else None)
        dest = out[: len(channels)]
        resized = image.shape[1:] != (layout.height, layout.width)
        if cfg.normalization == "none":
            if resized:
                image = self._fit(image)
            dest[...] = image
            return channels
        if not resized:
            normalize_field(image, cfg.normalization, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                            clahe_clip_limit=cfg.clahe_clip_limit, clahe_tiles=cfg.clahe_tiles, out=dest)
            return channels
        image = normalize_field(image, cfg.normalization, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                                clahe_clip_limit=cfg.clahe_clip_limit, clahe_tiles=cfg.clahe_tiles, dtype=np.float32)
        image = self._fit(image)
        if dest.dtype == np.uint8:
            quantize_unit(image, dest)
        else:
            dest[...] = image
        return channels

    def _fit(self, image: np.ndarray) -> np.ndarray:
        """A field of another size -> the layout's (float32): ``crop`` scales the short side up to it
        and centre-crops, ``resize`` resizes the whole field."""
        layout = self.layout
        if self.cfg.field_resize == "crop":
            scale = max(layout.height / image.shape[1], layout.width / image.shape[2])
            h, w = max(layout.height, round(image.shape[1] * scale)), max(layout.width, round(image.shape[2] * scale))
            image = _resize(image, h, w)
            y0, x0 = (h - layout.height) // 2, (w - layout.width) // 2
            return image[:, y0:y0 + layout.height, x0:x0 + layout.width]
        return _resize(image, layout.height, layout.width)

    def _batch_channels(self, batch: dict[str, np.ndarray]) -> int:
        """Channels per output row: the padded count, or with ``mixed_channels=group`` the one
        channel count every field of this block has (blocks are formed per channel count)."""
        if self.cfg.mixed_channels == "pad":
            return self.layout.channels
        counts = {len(names) for names in batch["channel_names"]}
        if len(counts) != 1:  # blocks never mix counts (build_field_pipeline); a bundling change would
            raise ValueError(f"data.mixed_channels=group: one read block holds fields of {sorted(counts)} channels")
        return counts.pop()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        _ensure_codec_pipeline(self.cfg.use_zarrs)
        layout = self.layout
        n = len(batch["plate"])
        channels = self._batch_channels(batch)
        if self.cache is not None:
            self._cached_blocks = self.cache.fetch(batch[FIELD_INDEX])
        images = np.zeros((n, channels, layout.height, layout.width), dtype=layout.dtype)
        masks = np.zeros((n, channels), dtype=bool)
        names, kept, bad = [], [], []
        for i in range(n):
            row = {k: batch[k][i] for k in READ_COLUMNS + [LABELS_COLUMN] if k in batch}
            k = len(kept)
            try:
                field_channels = self._read_into(row, images[k], int(batch[FIELD_INDEX][i]))
            except PlateError as exc:
                if self.cfg.bad_field_policy == "fail":
                    raise BadFieldError(f"{exc} [data.bad_field_policy=fail; set data.bad_field_policy=skip to skip "
                                        f"and count bad fields]") from exc
                images[k] = 0  # a partial write of the failed field
                bad.append({"plate": str(row["plate"]), "well": str(row["well"]), "field": int(row["field"]),
                            "error": str(exc)})
                continue
            masks[k, : len(field_channels)] = True
            names.append(CHANNEL_SEPARATOR.join(field_channels + [PAD_CHANNEL_NAME] * (channels - len(field_channels))))
            kept.append(i)
        images, masks = images[: len(kept)], masks[: len(kept)]
        if self.monitor is not None:
            ref = self.monitor.record.remote(len(kept), images.nbytes, bad)
            if bad:  # only then wait for the count: the common case stays fire-and-forget
                n_bad = ray_get(ref)
                if n_bad > self.max_bad:
                    raise BadFieldError(too_many_bad_message(n_bad, self.total, self.max_bad, bad))
        elif bad:  # the skip policy always has a monitor; defensive
            raise BadFieldError(bad[0]["error"])
        self._cached_blocks = {}
        out = {"image": images, "channel_mask": masks, "channel_names": np.asarray(names, dtype=object)}
        for col in self.keep_columns:
            out[col] = np.asarray(batch[col])[kept]
        if self.cell_crop_size:
            out = cell_crop_batch(out, self.cell_crop_size)
        return out


def ray_get(ref):
    import ray

    return ray.get(ref)

