"""Ray Data pipeline: manifest rows -> field reads -> per-channel normalization -> (training) random
channel permutation -> fields padded to one channel count with a channel mask, or grouped by
channel count -> batches.

- Determinism: a training epoch's order is built here, not left to Ray Data: ``epoch_shard`` permutes
  the manifest's read blocks with a seed of (``train.seed``, epoch) and gives each rank its own equal,
  contiguous share; each rank streams its share in that order (``preserve_order``), its local shuffle
  buffer seeded by (seed, epoch, rank), and a field's channel permutation is seeded by (seed, epoch,
  field). So the fields, their order and their channel orders are a function of (seed, epoch, rank,
  worker count), whatever the timing of the read tasks. Evaluation streams keep the manifest's order.

- Read locality: a read task reads whole fields (one Zarr shard each, all channels) for a block of
  consecutive manifest rows (same plate), optionally through the Rust ``zarrs`` codec pipeline; a
  ``data.field_size`` centre crop reads only the tiles it covers.
- Read and normalize are fused in one task, so only the normalized float16 (or uint8) field crosses
  Ray's object store (the raw read never does), and nothing is materialized: the dataset streams
  under a bounded object-store budget and a bounded number of read tasks, whatever the number of plates.
- Mixed channel counts (e.g. 5-, 4- and 1-channel plates in one run), ``data.mixed_channels``:
  ``pad`` zero-pads every field to ``data.pad_channels_to`` channels, ``channel_mask`` (True = real
  channel) and ``channel_names`` (``""`` for padding) travelling with it; ``group`` pads nothing:
  read blocks hold one channel count each and the trainer's batches are regrouped by channel count.
  Different field sizes: ``data.field_size`` crop or resize.
- Bad fields: ``data.bad_field_policy`` ``fail`` raises ``BadFieldError`` naming plate/well/field;
  ``skip`` drops the field, counts it in a ``PipelineMonitor`` actor (which also logs progress:
  fields/s and MB/s) and fails once more than ``data.max_bad_fraction`` of the fields are bad.

- ``data.cache_fields``: the training fields are read once into Ray's object store; each worker then takes
  its epoch share from there in its own process (the same ``FieldLoader`` over the same read blocks), with no
  Ray Data execution per epoch, and the same rows.

Modules: ``layout`` (columns, stream layout, read blocks), ``monitor`` (counting and bad fields),
``loader`` (the read task), ``dataset`` (manifests, epoch shards, the Ray Dataset, a training epoch's blocks),
``cache`` (fields kept in the object store), ``batches`` (the consumer's local shuffle, FieldBatches, prefetching).
"""
