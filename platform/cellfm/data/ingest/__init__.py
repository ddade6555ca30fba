"""Ingestion: public screen layouts -> OME-Zarr plates + a Parquet manifest, in parallel on Ray, resumable;
and existing OME-Zarr plates registered in place (a manifest only).

One module per concern: `plan` (the `IngestPlan` every layout builds, its checks, `IngestError`), one module
per source layout (`cpg`: Cell Painting Gallery load_data.csv + TIFFs; `chammi`: CHAMMI strips; `generic`:
a glob + filename regex; `ome_zarr`: existing OME-Zarr plates registered in place) — a new layout is a new
module —, `images` (reading a source plane), `metadata` (platemaps and well tables joined to fields) and
`writer` (`run_ingestion`: the plan written into plates and a manifest).

Bad inputs raise `IngestError` naming plate/well/site/file: missing files, channel sets that differ between
fields of a plate, channels absent from the mapping, duplicate fields, images whose shape or dtype differ
from the plate's.
"""
