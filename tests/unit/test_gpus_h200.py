"""The parser on captures from a real H200 with a current driver (580; tests/fixtures/nvidia-smi-h200,
taken by bench/gpu_check.sh): idle it is free, with a process outside rtrain it is busy, and with
our own job's process (by pid) it is still free to the scheduler (the lease guards it)."""
from pathlib import Path

from launcher.agent import gpus, smi

H200 = Path(__file__).resolve().parents[1] / "fixtures" / "nvidia-smi-h200"
UUID = "GPU-dbd066b7-d66e-7da1-e05a-82dffa4fe2ac"


def snapshot(apps_file):
    text = (H200 / "csv-query-gpu-nounits-h200-driver580-idle.csv").read_text()
    apps = (H200 / apps_file).read_text()
    return {"gpus": smi.parse_csv(text, smi.GPU_FIELDS, require_header=True),
            "gpus_raw": smi.parse_csv(text, smi.GPU_FIELDS, raw=True, require_header=True),
            "apps": smi.parse_csv(apps, smi.APP_FIELDS, require_header=True),
            "list": None, "xml": None, "mig_error": None}


def test_idle_h200_is_one_free_unit():
    snap = snapshot("csv-query-compute-apps-nounits-h200-driver580-idle.csv")
    assert snap["apps"] == []
    (u,) = gpus.classify(snap)
    assert (u["index"], u["uuid"], u["name"], u["state"]) == ("0", UUID, "NVIDIA H200", "free")
    assert (u["memory_used"], u["memory_total"], u["utilization"]) == (0, 143771, 0)
    assert u["parent_uuid"] is None and u["processes"] == []


def test_a_foreign_process_makes_it_busy_and_ours_does_not():
    snap = snapshot("csv-query-compute-apps-nounits-h200-driver580-busy.csv")
    (app,) = snap["apps"]
    assert (app["gpu_uuid"], app["pid"], app["used_memory"], app["process_name"]) == (UUID, 511, 536, "python3")
    (u,) = gpus.classify(snap)
    assert u["state"] == "busy" and "foreign" in u["reason"]
    assert u["processes"] == [{"pid": 511, "used_memory": 536, "name": "python3"}]
    (mine,) = gpus.classify(snap, own_pids=[511])
    assert mine["state"] == "free"


def test_list_and_xml_of_the_h200():
    (g,) = smi.parse_list((H200 / "list-L-h200-driver580.txt").read_text())
    assert g["uuid"] == UUID and g["name"] == "NVIDIA H200"
    x = smi.parse_xml((H200 / "xml-q-x-h200-driver580.xml").read_text())
    assert list(x) == [UUID]
    assert x[UUID]["name"] == "NVIDIA H200" and x[UUID]["mig_mode"] == "Disabled"
    assert x[UUID]["processes"] == [] and x[UUID]["mig_devices"] == []
