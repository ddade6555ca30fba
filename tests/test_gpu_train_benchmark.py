"""benchmarks/gpu_train.py --tiny on CPU: the JSON's fields and that its figures agree with each other."""

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _benchmark():
    spec = importlib.util.spec_from_file_location("gpu_train", REPO / "benchmarks" / "gpu_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.integration  # four tiny models and a batch scan: ~1 min on a loaded 2-core machine
def test_tiny_run_writes_consistent_json(tmp_path):
    out = tmp_path / "gpu_train.json"
    result = _benchmark().main(["--tiny", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["device_type"] == "cpu" and result["tiny"] is True
    assert set(result["models"]) == {"cellrep", "c3r", "channelvit", "vit_rgb"}
    assert [run["batch_size"] for run in result["cellrep_batch_scan"]] == [2, 4]
    for run in [*result["models"].values(), *result["cellrep_batch_scan"]]:
        assert run["images_per_s"] == pytest.approx(run["steps"] * run["batch_size"] / run["seconds"])
        assert run["flops_per_image"] > 0
        assert run["peak_flops_per_s"] is None and run["mfu"] is None  # CPU: no peak in the table
        assert run["peak_memory_bytes"] > 10 * 2**20  # the process's RSS: torch alone is more than 10 MiB
        assert 0 <= run["data_wait_fraction"] < 1
    # The counted FLOPs scale with the batch: per image they match across the scan.
    scan = result["cellrep_batch_scan"]
    assert scan[0]["flops_per_image"] == pytest.approx(scan[1]["flops_per_image"], rel=1e-6)
    # CellRep mixes channels, the RGB ViT sees one 3-channel image: CellRep costs more per image.
    assert result["models"]["cellrep"]["flops_per_image"] > result["models"]["vit_rgb"]["flops_per_image"]


def test_mfu_formula_matches_the_telemetry_table():
    import torch
    from cellfm.train.telemetry import PEAK_BF16_TFLOPS, model_flops_utilisation

    assert dict(PEAK_BF16_TFLOPS)["H100"] == pytest.approx(989.4) and dict(PEAK_BF16_TFLOPS)["H200"] == pytest.approx(989.4)
    assert model_flops_utilisation(2e9, 100.0, 1, 1e12) == pytest.approx(0.2)
    assert _benchmark().peak_memory_bytes(torch.device("cpu")) > 0


def test_on_cpu_nothing_is_written_without_out(tmp_path, monkeypatch):
    module = _benchmark()
    monkeypatch.setattr(module, "RESULTS", tmp_path)
    monkeypatch.setattr(module, "measure", lambda *a, **k: {"images_per_s": 1.0, "mfu": None, "data_wait_fraction": 0.0})
    module.main(["--tiny"])
    assert list(tmp_path.iterdir()) == []


def test_fused_adamw_only_with_use_gpu():
    import torch
    from cellfm.config import load_config
    from cellfm.train.engines import _adamw

    params = [{"params": [torch.nn.Parameter(torch.ones(3))]}]
    assert not _adamw(params, load_config(None, [])).defaults["fused"]
    assert _adamw(params, load_config(None, ["train.use_gpu=true"])).defaults["fused"]
    assert not _adamw(params, load_config(None, ["train.use_gpu=true", "optim.fused_adamw=false"])).defaults["fused"]


@pytest.mark.integration  # compiles a tiny backbone on CPU (inductor): tens of seconds
def test_train_compile_gives_the_eager_loss_and_state_dict_keys():
    import torch
    from cellfm.config import load_config
    from cellfm.data.batch import FieldBatch
    from cellfm.train.meta_arch import SSLMetaArch

    batch = FieldBatch(torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(0)), [["a", "b", "c"]] * 2)
    losses, keys = [], []
    for compile_ in (False, True):
        cfg = load_config(REPO / "configs" / "smoke.yaml", [f"train.compile={str(compile_).lower()}",
                                                            "optim.batch_size_per_worker=2"])
        meta_arch = SSLMetaArch(cfg, steps_per_epoch=1, rank=0, world_size=1, device=torch.device("cpu"),
                                prepare_model=lambda model: model)
        losses.append(meta_arch.forward(batch, epoch=0, step=0, micro=0).total.item())
        keys.append(list(meta_arch.teacher.state_dict()))
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    assert keys[1] == keys[0]  # compiled in place: checkpoints keep their keys
