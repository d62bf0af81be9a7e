"""launcher/agent/gpus.py against every real nvidia-smi capture (tests/fixtures/nvidia-smi, a
verbatim copy of shared/fixtures/nvidia-smi, with its SOURCES.md and NOTES.md), and the simulated
nvidia-smi (tests/fakes/nvidia-smi) against the same captures."""
import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.agent import gpus, smi
from launcher.agent.gpus import NvidiaSmiError

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "nvidia-smi"
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures" / "nvidia-smi"
FAKE = REPO / "tests" / "fakes" / "nvidia-smi"
sys.path.insert(0, str(REPO / "tests"))
import fakesmi  # noqa: E402


def fx(name):
    if not FIXTURES.is_dir():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI=true but the nvidia-smi captures are missing: %s" % FIXTURES)
        pytest.skip("real nvidia-smi captures not available at %s" % FIXTURES)
    return (FIXTURES / name).read_text()


def test_the_captures_are_the_shared_ones():
    """The copy in tests/ is the shared set, file for file (where the shared folder is here)."""
    if not SHARED_FIXTURES.is_dir():
        pytest.skip("no shared/ next to this checkout to compare with")
    names = sorted(p.name for p in SHARED_FIXTURES.iterdir())
    assert sorted(p.name for p in FIXTURES.iterdir()) == names
    for n in names:
        assert (FIXTURES / n).read_bytes() == (SHARED_FIXTURES / n).read_bytes(), n


def header_fields(text):
    return [re.sub(r" \[[^\]]*\]$", "", c) for c in text.splitlines()[0].split(", ")]


def stub(outputs, calls=None):
    """A run() for query(): outputs maps a key ('gpu', 'apps', 'L', 'x') to (rc, out, err)."""
    def run(argv):
        if calls is not None:
            calls.append(list(argv))
        joined = " ".join(argv)
        key = ("gpu" if "--query-gpu=" in joined else "apps" if "--query-compute-apps=" in joined
               else "L" if "-L" in argv else "x" if "-x" in argv else None)
        return outputs.get(key, (0, "", ""))
    return run


def gpu_csv(rows, header=True):
    """--query-gpu=GPU_FIELDS --format=csv,nounits output for rows (lists of cell strings)."""
    lines = []
    if header:
        lines.append("index, uuid, pci.bus_id, name, mig.mode.current, compute_mode, memory.total "
                     "[MiB], memory.used [MiB], memory.free [MiB], utilization.gpu [%]")
    lines += [", ".join(str(c) for c in r) for r in rows]
    return "\n".join(lines) + "\n"


APPS_HEADER = "gpu_uuid, pid, used_gpu_memory [MiB], process_name\n"


# ------------------------------------------------------------------ every capture is accounted for

HANDLED = {
    "csv-noheader-nounits-fan-notsupported-geforce-old-driver.txt": "csv",
    "csv-query-compute-apps-h200-mig-driver590.csv": "csv",
    "csv-query-compute-apps-header-only-h100-mig-idle-driver590.csv": "csv",
    "csv-query-compute-apps-windows-rtx2080super-driver591-wddm.csv": "csv",
    "csv-query-gpu-full-h100-mig-driver590.csv": "csv",
    "csv-query-gpu-full-rtx2080super-driver610-kmd.csv": "csv",
    "csv-query-gpu-mig-container-insufficient-permissions.csv": "csv",
    "csv-query-gpu-noheader-nounits-8x-titanx.txt": "csv",
    "csv-query-gpu-nounits-tesla-p100-driver510.csv": "csv",
    "error-device-handle-gpu-is-lost.txt": "gpu_lost",
    "error-device-handle-unknown-error.txt": "device_handle",
    "error-driver-not-loaded.txt": "driver_not_loaded",
    "error-no-devices-found.txt": "no_devices",
    "error-nvml-driver-library-mismatch.txt": "nvml_mismatch",
    "error-nvml-unknown-error-in-container.txt": "nvml_unknown",
    "help-query-gpu-driver590.txt": "reference",
    "list-L-h200-mig-driver590.txt": "list",
    "q-text-h200-mig-driver590-load.txt": "not parsed",
    "table-default-8x-gtx1080ti-driver390-old-layout.txt": "not parsed",
    "table-default-8x-v100-driver460-inforom-warning.txt": "not parsed",
    "table-default-container-gtx1080ti-driver440-processes-hidden.txt": "not parsed",
    "table-default-h200-mig-driver590-idle.txt": "not parsed",
    "table-default-h200-mig-driver590-load.txt": "not parsed",
    "table-default-rtx2080super-driver610-kmd-header.txt": "not parsed",
    "table-default-windows-rtx2080super-driver591-wddm.txt": "not parsed",
    "table-partial-err-fan-exclusive-process-driver525.txt": "not parsed",
    "table-partial-old-driver325-lost-gpu-MB-units.txt": "not parsed",
    "xml-q-x-a100-sxm4-40gb-mig-driver510.xml": "xml",
    "xml-q-x-dual-rtxa5000-driver590-processes.xml": "xml",
    "xml-q-x-windows-rtx2080-driver516-processes-na-memory.xml": "xml",
}


def test_every_capture_is_handled_by_a_test():
    fx("NOTES.md")
    present = {p.name for p in FIXTURES.iterdir()} - {"NOTES.md", "SOURCES.md"}
    assert present == set(HANDLED), "new or missing captures: %s" % (present ^ set(HANDLED))


@pytest.mark.parametrize("name", sorted(n for n, k in HANDLED.items() if k == "csv"))
def test_every_csv_capture_parses_against_its_own_header_or_query(name):
    text = fx(name)
    if "noheader" in name:
        return  # covered by the dedicated tests below (no header to take the fields from)
    fields = header_fields(text)
    rows = smi.parse_csv(text, fields)
    assert len(rows) == len(text.splitlines()) - 1
    for r in rows:
        assert list(r) == fields


# ------------------------------------------------------------------ CSV captures

TITANX_FIELDS = ["index", "uuid", "name", "temperature.gpu", "utilization.gpu", "memory.used",
                 "memory.total"]


def titanx_snapshot():
    rows = smi.parse_csv(fx("csv-query-gpu-noheader-nounits-8x-titanx.txt"), TITANX_FIELDS)
    return {"gpus": rows, "apps": []}


def test_titanx_noheader_nounits_rows():
    rows = titanx_snapshot()["gpus"]
    assert len(rows) == 8
    assert [r["index"] for r in rows] == list(range(8))
    assert rows[0]["uuid"] == "GPU-004f693d-767b-b215-b4a9-a18af0ffd643"
    assert rows[7]["uuid"] == "GPU-f199c9ea-65d8-5382-aefe-a9e8fb48057b"
    assert rows[0]["name"] == "GeForce GTX TITAN X"
    assert (rows[0]["memory.used"], rows[0]["memory.total"]) == (802, 12206)
    assert (rows[1]["memory.used"], rows[1]["utilization.gpu"]) == (10032, 86)


def test_titanx_classification_depends_on_the_memory_threshold():
    units = gpus.classify(titanx_snapshot(), mem_busy_mib=1024)
    assert [u["state"] for u in units] == ["free"] + ["busy"] * 7
    assert units[0]["index"] == "0" and units[0]["uuid"].startswith("GPU-004f693d")
    assert units[0]["reason"] == "" and units[0]["parent_uuid"] is None
    assert units[1]["reason"] == "memory 10032/12206 MiB in use"
    assert units[1]["utilization"] == 86 and units[1]["memory_used"] == 10032
    units = gpus.classify(titanx_snapshot(), mem_busy_mib=500)
    assert [u["state"] for u in units] == ["busy"] * 8
    assert units[0]["reason"] == "memory 802/12206 MiB in use"


def test_contract_shape_of_a_unit():
    u = gpus.classify(titanx_snapshot())[0]
    assert set(u) == {"index", "uuid", "name", "memory_used", "memory_total", "utilization",
                      "compute_mode", "state", "reason", "processes", "parent_uuid"}
    assert isinstance(u["index"], str)
    json.dumps(u)


def test_visible_restricts_by_index_or_uuid():
    snap = titanx_snapshot()
    units = gpus.classify(snap, visible=[0, "3", "GPU-f199c9ea-65d8-5382-aefe-a9e8fb48057b"])
    assert [u["index"] for u in units] == ["0", "3", "7"]
    assert [u["index"] for u in gpus.classify(snap, visible="1,2")] == ["1", "2"]
    assert gpus.classify(snap, visible=[]) == []


def test_old_driver_not_supported_is_none():
    fields = ["memory.total", "memory.free", "memory.used", "temperature.gpu", "fan.speed",
              "utilization.gpu", "utilization.memory"]
    rows = smi.parse_csv(fx("csv-noheader-nounits-fan-notsupported-geforce-old-driver.txt"), fields)
    assert rows == [{"memory.total": 2004, "memory.free": 2004, "memory.used": 0,
                     "temperature.gpu": 44, "fan.speed": None, "utilization.gpu": 0,
                     "utilization.memory": 0}]


def test_p100_nounits_header_carries_units_and_canonical_clock_names():
    text = fx("csv-query-gpu-nounits-tesla-p100-driver510.csv")
    assert not text.endswith("\n")  # the capture has no trailing newline
    # The query used clocks.gr/...; the header prints clocks.current.graphics/...
    query = ["name", "uuid", "fan.speed", "pstate", "memory.reserved", "memory.used",
             "memory.free", "utilization.gpu", "utilization.memory", "temperature.gpu",
             "power.draw", "clocks.gr", "clocks.sm", "clocks.mem", "clocks.video"]
    [row] = smi.parse_csv(text, query, require_header=True)
    assert row["uuid"] == "GPU-ef1b2c9b-38d8-2090-2bd1-f567a3eb42a6"
    assert row["name"] == "Tesla P100-PCIE-16GB"
    assert row["fan.speed"] is None and row["pstate"] == "P0"
    assert (row["memory.reserved"], row["memory.used"], row["memory.free"]) == (103, 0, 16280)
    assert row["power.draw"] == 28.16 and row["clocks.gr"] == 405 and row["clocks.video"] == 835


def test_insufficient_permissions_is_none_and_classifies_unknown():
    text = fx("csv-query-gpu-mig-container-insufficient-permissions.csv")
    # The query asked for gpu_name; the header says name.
    fields = ["gpu_name", "driver_version", "temperature.gpu", "utilization.gpu",
              "utilization.memory", "memory.total", "memory.free", "memory.used"]
    [row] = smi.parse_csv(text, fields, require_header=True)
    assert row["gpu_name"] == "NVIDIA A100-SXM4-80GB" and row["driver_version"] == "535.161.08"
    assert row["temperature.gpu"] == 47
    assert row["memory.total"] is row["memory.used"] is row["memory.free"] is None
    assert row["utilization.gpu"] is None
    [raw] = smi.parse_csv(text, fields, raw=True)
    assert raw["memory.used"] == "[Insufficient Permissions]"
    # The capture has no uuid column; give it one to classify it.
    row["uuid"] = raw["uuid"] = "GPU-aaaaaaaa-0000-0000-0000-000000000001"
    row["index"] = 0
    [u] = gpus.classify({"gpus": [row], "gpus_raw": [raw], "apps": []})
    assert u["state"] == "unknown"
    assert u["reason"] == "memory not readable: [Insufficient Permissions]"
    assert u["name"] == "NVIDIA A100-SXM4-80GB"


def test_h100_full_query_with_units():
    text = fx("csv-query-gpu-full-h100-mig-driver590.csv")
    fields = header_fields(text)
    assert len(fields) == 212
    [row] = smi.parse_csv(text, fields, require_header=True)
    assert row["uuid"] == "GPU-00000000-0000-0000-0000-000000000000"
    assert row["name"] == "NVIDIA H100 80GB HBM3" and row["index"] == 0
    assert (row["memory.total"], row["memory.used"], row["memory.free"]) == (81559, 11125, 69956)
    assert row["memory.reserved"] == 479
    assert row["utilization.gpu"] is None  # [N/A] under MIG
    assert row["mig.mode.current"] == "Enabled" and row["compute_mode"] == "Default"
    assert row["power.draw"] == 433.78
    assert row["display_mode"] is None  # [Requested functionality has been deprecated]
    assert row["timestamp"] == "2026/07/14 09:00:44.579"
    assert row["hostname"] is None
    # A MIG parent without -L/-q -x: never schedulable, shown as unknown.
    [u] = gpus.classify({"gpus": [row], "apps": []})
    assert u["state"] == "unknown" and "MIG" in u["reason"]


def test_rtx2080super_driver610_reserved_memory():
    text = fx("csv-query-gpu-full-rtx2080super-driver610-kmd.csv")
    fields = header_fields(text)
    assert len(fields) == 241 and "kmd_version" in fields
    [row] = smi.parse_csv(text, fields, require_header=True)
    assert row["kmd_version"] == "610.57.04"
    assert (row["memory.total"], row["memory.used"], row["memory.free"],
            row["memory.reserved"]) == (8192, 815, 6978, 400)
    assert row["memory.used"] + row["memory.free"] != row["memory.total"]
    assert row["utilization.gpu"] == 8 and row["mig.mode.current"] is None
    [u] = gpus.classify({"gpus": [row], "apps": []})
    assert u["state"] == "free" and u["memory_used"] == 815


APP_CAPTURE_FIELDS = ["timestamp", "gpu_name", "gpu_bus_id", "gpu_serial", "gpu_uuid", "pid",
                      "process_name", "used_gpu_memory"]


def test_windows_compute_apps_paths_with_spaces_and_x86():
    text = fx("csv-query-compute-apps-windows-rtx2080super-driver591-wddm.csv")
    rows = smi.parse_csv(text, APP_CAPTURE_FIELDS, require_header=True)
    assert len(rows) == 12
    names = [r["process_name"] for r in rows]
    assert r"C:\Program Files\NZXT CAM\NZXT CAM.exe" in names
    assert r"C:\Program Files\NVIDIA Corporation\NVIDIA GeForce Experience\NVIDIA Share.exe" in names
    assert all(r["used_gpu_memory"] is None and r["gpu_serial"] is None for r in rows)
    assert rows[0]["pid"] == 12444 and rows[-1]["pid"] == 26660
    # A name holding ", " and "(x86)" stays whole because process_name is split last.
    line = "GPU-1, 77, [N/A], C:\\Program Files (x86)\\Steam\\a, b c.exe\n"
    [r] = smi.parse_csv(APPS_HEADER + line, smi.APP_FIELDS, require_header=True)
    assert r == {"gpu_uuid": "GPU-1", "pid": 77, "used_memory": None,
                 "process_name": "C:\\Program Files (x86)\\Steam\\a, b c.exe"}


def test_windows_apps_make_the_2080super_busy():
    g = smi.parse_csv(fx("csv-query-gpu-full-rtx2080super-driver610-kmd.csv"),
                       header_fields(fx("csv-query-gpu-full-rtx2080super-driver610-kmd.csv")))
    apps = smi.parse_csv(fx("csv-query-compute-apps-windows-rtx2080super-driver591-wddm.csv"),
                          APP_CAPTURE_FIELDS)
    [u] = gpus.classify({"gpus": g, "apps": apps})
    assert u["state"] == "busy" and u["reason"] == "12 foreign processes"
    assert u["processes"][0] == {"pid": 12444, "used_memory": None, "name":
                                 r"C:\Windows\SystemApps\MicrosoftWindows.Client.CBS_cw5n1h2txyewy"
                                 r"\TextInputHost.exe"}
    [u] = gpus.classify({"gpus": g, "apps": apps}, own_pids=[r["pid"] for r in apps])
    assert u["state"] == "free"


def test_header_only_compute_apps_is_empty():
    text = fx("csv-query-compute-apps-header-only-h100-mig-idle-driver590.csv")
    assert smi.parse_csv(text, APP_CAPTURE_FIELDS, require_header=True) == []
    assert smi.parse_csv(text, ["timestamp", "name", "gpu_bus_id", "serial", "uuid", "pid",
                                 "process_name", "used_memory"], require_header=True) == []


def test_header_must_name_the_requested_columns():
    text = fx("csv-query-gpu-nounits-tesla-p100-driver510.csv")
    with pytest.raises(NvidiaSmiError) as e:
        smi.parse_csv(text, ["uuid", "name"] + header_fields(text)[2:])
    assert e.value.kind == "bad_output"


# ------------------------------------------------------------------ MIG: -L, XML, H200 apps

def h200_snapshot(with_xml=True):
    """The H200 MIG captures (#7, #13) plus the -q values of #14 written as parse_xml() output
    (no saved MIG XML has processes; the q-text capture is not parsed by design)."""
    listing = smi.parse_list(fx("list-L-h200-mig-driver590.txt"))
    parent = listing[0]["uuid"]
    row = {"index": 0, "uuid": parent, "pci.bus_id": "00000000:83:00.0", "name": "NVIDIA H200",
           "mig.mode.current": "Enabled", "compute_mode": "Default", "memory.total": 143771,
           "memory.used": 16960, "memory.free": 126000, "utilization.gpu": None}
    apps = smi.parse_csv(fx("csv-query-compute-apps-h200-mig-driver590.csv"), APP_CAPTURE_FIELDS)
    devs = [(0, 2, 0, 16925, 71424), (1, 2, 1, 16925, 71424), (2, 3, 0, 17, 33280),
            (3, 9, 0, 9, 16384), (4, 10, 0, 9, 16384)]
    xml = {parent: {"mig_devices": [
        {"index": i, "gpu_instance_id": gi, "compute_instance_id": ci, "memory_used": u,
         "memory_total": t} for i, gi, ci, u, t in devs],
        "processes": [{"pid": pid, "gpu_instance_id": 2, "compute_instance_id": 1,
                       "used_memory": mem, "process_name": name, "type": "C"}
                      for pid, mem, name in ((12249, 2194, "/root/tools/memhog"),
                                             (12250, 1170, "/root/tools/memhog"),
                                             (12267, 13526, "./gpu_burn"))]}}
    return {"gpus": [row], "apps": apps, "list": listing, "xml": xml if with_xml else None}


def test_list_L_h200_mig():
    listing = smi.parse_list(fx("list-L-h200-mig-driver590.txt"))
    assert len(listing) == 1
    g = listing[0]
    assert (g["index"], g["name"], g["uuid"]) == (0, "NVIDIA H200",
                                                  "GPU-00000000-0000-0000-0000-000000000000")
    assert [m["device"] for m in g["mig"]] == [0, 1, 2, 3, 4]
    assert [m["profile"] for m in g["mig"]] == ["1c.3g.71gb", "2c.3g.71gb", "2g.35gb", "1g.18gb",
                                                "1g.18gb"]
    assert g["mig"][4]["uuid"] == "MIG-00000004-0000-0000-0000-000000000004"


def test_h200_compute_apps_carry_the_parent_uuid():
    snap = h200_snapshot()
    assert len(snap["apps"]) == 3
    assert {a["gpu_uuid"] for a in snap["apps"]} == {snap["list"][0]["uuid"]}
    assert [a["pid"] for a in snap["apps"]] == [12249, 12250, 12267]
    assert [a["used_gpu_memory"] for a in snap["apps"]] == [2194, 1170, 13526]
    assert snap["apps"][2]["process_name"] == "./gpu_burn"


def test_h200_mig_units_per_compute_instance():
    units = gpus.classify(h200_snapshot())
    assert [u["index"] for u in units] == ["0:0", "0:1", "0:2", "0:3", "0:4"]
    assert all(u["uuid"].startswith("MIG-") for u in units)
    assert all(u["parent_uuid"] == "GPU-00000000-0000-0000-0000-000000000000" for u in units)
    assert units[1]["state"] == "busy" and units[1]["reason"] == "3 foreign processes"
    assert [p["pid"] for p in units[1]["processes"]] == [12249, 12250, 12267]
    # CI 0 of GI 2 shares the GI's memory with the busy CI 1: judged by memory.
    assert units[0]["state"] == "busy" and units[0]["processes"] == []
    assert units[0]["reason"] == "memory 16925/71424 MiB in use"
    assert [u["state"] for u in units[2:]] == ["free"] * 3
    assert units[2]["name"] == "NVIDIA H200 MIG 2g.35gb" and units[2]["memory_total"] == 33280
    # visible: the parent index selects all its MIG devices; a MIG uuid selects one.
    assert len(gpus.classify(h200_snapshot(), visible=["0"])) == 5
    assert [u["index"] for u in gpus.classify(
        h200_snapshot(), visible=["MIG-00000003-0000-0000-0000-000000000003"])] == ["0:3"]


def test_h200_without_xml_fails_closed():
    units = gpus.classify(h200_snapshot(with_xml=False))
    assert len(units) == 5 and all(u["state"] == "unknown" for u in units)


def test_mig_process_that_cannot_be_mapped_makes_free_units_unknown():
    snap = h200_snapshot()
    snap["apps"].append({"gpu_uuid": snap["list"][0]["uuid"], "pid": 999, "process_name": "x",
                         "used_gpu_memory": 100})
    units = gpus.classify(snap)
    assert [u["state"] for u in units[2:]] == ["unknown"] * 3


def test_xml_a100_mig():
    x = smi.parse_xml(fx("xml-q-x-a100-sxm4-40gb-mig-driver510.xml"))
    assert list(x) == ["GPU-27b94a00-ed54-5c24-b1fd-1054085de32a"]
    g = x["GPU-27b94a00-ed54-5c24-b1fd-1054085de32a"]
    assert g["mig_mode"] == "Enabled" and g["processes"] == []
    assert (g["memory_used"], g["memory_total"]) == (38, 40960)
    assert g["mig_devices"] == [
        {"index": 0, "gpu_instance_id": 1, "compute_instance_id": 0, "memory_used": 19,
         "memory_total": 19968},
        {"index": 1, "gpu_instance_id": 2, "compute_instance_id": 0, "memory_used": 19,
         "memory_total": 19968}]
    # Classified with a matching -L (the capture has none): two free MIG units, no parent.
    uuid = "GPU-27b94a00-ed54-5c24-b1fd-1054085de32a"
    snap = {"gpus": [{"index": 0, "uuid": uuid, "name": "NVIDIA A100-SXM4-40GB",
                      "mig.mode.current": "Enabled", "memory.used": 38, "memory.total": 40960}],
            "apps": [], "xml": x,
            "list": smi.parse_list("GPU 0: NVIDIA A100-SXM4-40GB (UUID: %s)\n"
                                    "  MIG 3g.20gb     Device  0: (UUID: MIG-a)\n"
                                    "  MIG 3g.20gb     Device  1: (UUID: MIG-b)\n" % uuid)}
    units = gpus.classify(snap)
    assert [(u["index"], u["uuid"], u["state"]) for u in units] == [
        ("0:0", "MIG-a", "free"), ("0:1", "MIG-b", "free")]


def test_xml_dual_a5000_same_pid_on_both_gpus():
    x = smi.parse_xml(fx("xml-q-x-dual-rtxa5000-driver590-processes.xml"))
    assert list(x) == ["GPU-12345678-aaaa-bbbb-cccc-0123456789ab",
                       "GPU-12345678-aaaa-bbbb-cccc-0123456789cd"]
    a, b = x.values()
    assert a["mig_devices"] == [] and a["mig_mode"] is None  # <mig_devices>None</mig_devices>
    assert [p["pid"] for p in a["processes"]] == [p["pid"] for p in b["processes"]] == [100477]
    assert a["processes"][0]["used_memory"] == 22430 and b["processes"][0]["used_memory"] == 17246
    assert a["processes"][0]["gpu_instance_id"] is None
    assert a["processes"][0]["process_name"] == "/root/src/llama.cpp/build/bin/llama-server"
    assert (a["memory_used"], b["memory_used"]) == (22437, 17253)
    assert (a["bus_id"], b["bus_id"]) == ("00000000:81:00.0", "00000000:C1:00.0")


def test_xml_windows_na_memory():
    x = smi.parse_xml(fx("xml-q-x-windows-rtx2080-driver516-processes-na-memory.xml"))
    [g] = x.values()
    assert len(g["processes"]) == 26
    assert all(p["used_memory"] is None and p["type"] == "C+G" for p in g["processes"])
    assert g["processes"][1] == {"pid": 10808, "gpu_instance_id": None,
                                 "compute_instance_id": None, "used_memory": None,
                                 "process_name": "", "type": "C+G"}
    assert g["memory_used"] == 862


# ------------------------------------------------------------------ errors

ERROR_FILES = sorted(n for n, k in HANDLED.items() if n.startswith("error-"))


@pytest.mark.parametrize("name", ERROR_FILES)
def test_error_texts_raise_the_right_kind_from_every_parser(name):
    text = fx(name)
    kind = HANDLED[name]
    for parse in (lambda t: smi.parse_csv(t, smi.GPU_FIELDS), lambda t: smi.parse_list(t),
                  lambda t: smi.parse_xml(t)):
        with pytest.raises(NvidiaSmiError) as e:
            parse(text)
        assert e.value.kind == kind
        assert "\n" not in e.value.message and e.value.message.startswith("nvidia-smi")


@pytest.mark.parametrize("name", ERROR_FILES)
def test_error_texts_through_query(name):
    text = fx(name)
    kind = HANDLED[name]
    rc = {"no_devices": 6, "driver_not_loaded": 9, "gpu_lost": 15, "nvml_mismatch": 18}.get(kind, 255)
    run = stub({"gpu": (rc, text, ""), "apps": (rc, text, "")})
    if kind == "no_devices":
        snap = gpus.query(run=run)
        assert snap["gpus"] == [] and gpus.classify(snap) == []
        return
    with pytest.raises(NvidiaSmiError) as e:
        gpus.query(run=run)
    assert e.value.kind == kind


def test_gpu_lost_message():
    with pytest.raises(NvidiaSmiError) as e:
        smi.parse_csv(fx("error-device-handle-gpu-is-lost.txt"), smi.GPU_FIELDS)
    assert e.value.message == ("nvidia-smi: GPU is lost (Unable to determine the device handle for "
                               "GPU 0000:01:00.0). Reboot the host to recover it.")
    # Newer drivers drop the space: "for GPU0000:65:00.0".
    e = smi.detect_error("Unable to determine the device handle for GPU0000:65:00.0: Unknown Error")
    assert e.kind == "device_handle" and "0000:65:00.0" in e.message


def test_error_after_some_rows_still_fails_the_whole_host():
    text = gpu_csv([[0, "GPU-a", "00000000:01:00.0", "X", "Disabled", "Default", 100, 1, 99, 0]])
    text += fx("error-device-handle-gpu-is-lost.txt")
    with pytest.raises(NvidiaSmiError) as e:
        gpus.query(run=stub({"gpu": (15, text, "")}))
    assert e.value.kind == "gpu_lost"


def test_inforom_warning_is_dropped_and_rc14_accepted():
    warning = fx("table-default-8x-v100-driver460-inforom-warning.txt").splitlines()[-1]
    assert warning.startswith("WARNING: infoROM is corrupted at gpu 0008:00:00.0")
    text = gpu_csv([[0, "GPU-a", "00000008:00:00.0", "Tesla V100-PCIE-16GB", "[N/A]", "Default",
                     16384, 0, 16384, 0]]) + warning + "\n"
    rows = smi.parse_csv(text, smi.GPU_FIELDS)
    assert len(rows) == 1 and rows[0]["uuid"] == "GPU-a"
    snap = gpus.query(run=stub({"gpu": (14, text, ""), "apps": (14, APPS_HEADER + warning, "")}))
    assert len(snap["gpus"]) == 1 and snap["apps"] == []
    assert gpus.classify(snap)[0]["state"] == "free"


def test_nonzero_rc_without_csv_fails():
    with pytest.raises(NvidiaSmiError) as e:
        gpus.query(run=stub({"gpu": (3, "Something odd\n", "")}))
    assert e.value.kind == "failed"


def test_missing_binary_is_not_found(tmp_path):
    with pytest.raises(NvidiaSmiError) as e:
        gpus.query(str(tmp_path / "no-such-nvidia-smi"))
    assert e.value.kind == "not_found"
    with pytest.raises(NvidiaSmiError) as e:
        gpus.query("definitely-not-here-nvidia-smi")
    assert e.value.kind == "not_found" and e.value.message == \
        "definitely-not-here-nvidia-smi not found on PATH"


def test_old_driver_without_mig_field_is_asked_again():
    calls = []

    def run(argv):
        calls.append(argv)
        if "mig.mode.current" in argv[1]:
            return 2, 'Field "mig.mode.current" is not a valid field to query.\n\n', ""
        if argv[1].startswith("--query-gpu"):
            return 0, ("index, uuid, pci.bus_id, name, compute_mode, memory.total [MiB], "
                       "memory.used [MiB], memory.free [MiB], utilization.gpu [%]\n"
                       "0, GPU-old, 0000:03:00.0, Tesla K80, Default, 11441, 2, 11439, 0\n"), ""
        return 0, APPS_HEADER, ""
    snap = gpus.query(run=run)
    assert len(calls) == 3 and snap["gpus"][0]["mig.mode.current"] is None
    assert gpus.classify(snap)[0]["state"] == "free"


def test_exclusive_process_and_prohibited_compute_modes():
    rows = [[0, "GPU-e", "b", "X", "Disabled", "Exclusive_Process", 24000, 200, 23800, 0],
            [1, "GPU-f", "b", "X", "Disabled", "E. Process", 24000, 200, 23800, 0],
            [2, "GPU-p", "b", "X", "Disabled", "Prohibited", 24000, 0, 24000, 0]]
    snap = gpus.query(run=stub({"gpu": (0, gpu_csv(rows), ""),
                                "apps": (0, APPS_HEADER + "GPU-e, 42, 190, mine\n", "")}))
    units = gpus.classify(snap, own_pids=[42])
    assert units[0]["state"] == "busy" and "Exclusive_Process" in units[0]["reason"]
    assert units[1]["state"] == "free"
    assert units[2]["state"] == "busy" and "Prohibited" in units[2]["reason"]


# ------------------------------------------------------------------ the default table is never parsed

TABLES = sorted(n for n, k in HANDLED.items() if k == "not parsed")


@pytest.mark.parametrize("name", TABLES)
def test_tables_are_never_parsed(name):
    """NOTES: "Don't parse the default table". query() only ever runs --query-*, -L and -q -x;
    handed a table instead of CSV, it refuses rather than guessing."""
    text = fx(name)
    calls = []
    with pytest.raises(NvidiaSmiError) as e:
        gpus.query(run=stub({"gpu": (0, text, ""), "apps": (0, text, "")}, calls))
    assert e.value.kind in ("bad_output", "failed")
    for argv in calls:
        assert any(a.startswith("--query-") for a in argv) or "-L" in argv or argv[-2:] == ["-q", "-x"]


def test_query_argv_without_and_with_mig():
    calls = []
    csv = gpu_csv([[0, "GPU-a", "b", "X", "Disabled", "Default", 100, 1, 99, 0]])
    gpus.query("/opt/nv/nvidia-smi", run=stub({"gpu": (0, csv, ""), "apps": (0, APPS_HEADER, "")},
                                             calls))
    assert calls == [["/opt/nv/nvidia-smi", "--query-gpu=" + ",".join(smi.GPU_FIELDS),
                      "--format=csv,nounits"],
                     ["/opt/nv/nvidia-smi", "--query-compute-apps=" + ",".join(smi.APP_FIELDS),
                      "--format=csv,nounits"]]
    calls = []
    csv = gpu_csv([[0, "GPU-a", "b", "X", "Enabled", "Default", 100, 1, 99, "[N/A]"]])
    snap = gpus.query(run=stub({"gpu": (0, csv, ""), "apps": (0, APPS_HEADER, ""),
                                "L": (0, "GPU 0: X (UUID: GPU-a)\n", ""),
                                "x": (0, fx("xml-q-x-a100-sxm4-40gb-mig-driver510.xml"), "")},
                               calls))
    assert [c[1:] for c in calls[2:]] == [["-L"], ["-q", "-x"]]
    assert snap["list"][0]["uuid"] == "GPU-a" and snap["xml"]


# ------------------------------------------------------------------ the simulated nvidia-smi

def fake(state_path, *args, env=None):
    e = dict(os.environ, FAKE_NVIDIA_SMI_STATE=str(state_path))
    e.update(env or {})
    p = subprocess.run([sys.executable, str(FAKE)] + list(args), capture_output=True, text=True,
                       env=e, timeout=30)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture
def fake_smi(tmp_path):
    """(bin_dir, state_path) with the fake installed; write_state() to change it."""
    bin_dir = tmp_path / "bin"
    state = fakesmi.install(bin_dir)
    return bin_dir, state


def fake_run(state_path):
    def run(argv):
        return fake(state_path, *argv[1:])
    return run


def test_fake_source_is_python38_stdlib():
    stdlib = getattr(sys, "stdlib_module_names", None)
    for path in (FAKE, REPO / "launcher" / "agent" / "gpus.py"):
        tree = ast.parse(path.read_text(), feature_version=(3, 8))  # rejects match, etc.
        for node in ast.walk(tree):
            assert not (isinstance(node, ast.Attribute) and node.attr in (
                "removeprefix", "removesuffix")), path
            if isinstance(node, (ast.Import, ast.ImportFrom)) and stdlib and not getattr(
                    node, "level", 0):
                for name in ([a.name for a in node.names] if isinstance(node, ast.Import)
                             else [node.module]):
                    assert name.split(".")[0] in stdlib, (path, name)
            if isinstance(node, (ast.FunctionDef, ast.AnnAssign, ast.arg)):
                assert getattr(node, "annotation", None) is None and \
                    getattr(node, "returns", None) is None, path
    assert FAKE.read_text().startswith("#!/usr/bin/env python3\n")
    assert os.access(str(FAKE), os.X_OK)


def test_install_and_state_next_to_the_script(fake_smi):
    bin_dir, state = fake_smi
    assert state == bin_dir / "nvidia-smi-state.json"
    assert os.stat(str(bin_dir / "nvidia-smi")).st_mode & 0o777 == 0o755
    env = dict(os.environ)
    env.pop("FAKE_NVIDIA_SMI_STATE", None)
    env["PATH"] = "%s:%s" % (bin_dir, env.get("PATH", ""))
    p = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, env=env, timeout=30)
    assert p.returncode == 0 and len(p.stdout.splitlines()) == 4
    s = json.loads(state.read_text())
    assert p.stdout.splitlines()[0] == "GPU 0: NVIDIA A100-SXM4-40GB (UUID: %s)" % s["gpus"][0]["uuid"]
    assert len({g["uuid"] for g in s["gpus"]}) == 4
    assert all(re.match(r"^GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
                        g["uuid"]) for g in s["gpus"])
    # stable across writes
    assert fakesmi.write_state(state)["gpus"][0]["uuid"] == s["gpus"][0]["uuid"]


@pytest.mark.parametrize("fmt", ["csv", "csv,noheader", "csv,nounits", "csv,noheader,nounits"])
@pytest.mark.parametrize("fields", [smi.GPU_FIELDS, list(reversed(smi.GPU_FIELDS)),
                                    ["memory.used", "gpu_name", "index", "gpu_uuid",
                                     "power.draw", "timestamp", "fan.speed"]])
def test_fake_any_fields_any_format_round_trip(fake_smi, fmt, fields):
    _, state = fake_smi
    rc, out, _ = fake(state, "--query-gpu=" + ",".join(fields), "--format=" + fmt)
    assert rc == 0
    lines = out.splitlines()
    assert len(lines) == 4 + ("noheader" not in fmt) and out.endswith("\n")
    if "noheader" not in fmt:
        assert lines[0].startswith(smi.canonical(fields[0]))
    rows = smi.parse_csv(out, fields, require_header="noheader" not in fmt)
    s = json.loads(state.read_text())
    assert [r[smi.canonical(fields[0]) if fields[0] in r else fields[0]] is not None for r in rows]
    by = {(r.get("uuid") or r.get("gpu_uuid")): r for r in rows}
    for g in s["gpus"]:
        r = by[g["uuid"]]
        assert r["memory.used"] == 3 and r.get("index", g["index"]) == g["index"]
        if "fan.speed" in r:
            assert r["fan.speed"] is None  # not in the state -> [N/A]
        if "timestamp" in r:
            assert re.match(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d\.\d{3}$", r["timestamp"])
        if "power.draw" in r:
            assert r["power.draw"] == g["power.draw"]


def test_fake_headers_byte_equal_real_captures(fake_smi):
    _, state = fake_smi
    for name in ("csv-query-gpu-full-h100-mig-driver590.csv",
                 "csv-query-gpu-full-rtx2080super-driver610-kmd.csv",
                 "csv-query-gpu-nounits-tesla-p100-driver510.csv",
                 "csv-query-gpu-mig-container-insufficient-permissions.csv"):
        real_header = fx(name).splitlines()[0]
        query = header_fields(fx(name))
        if "p100" in name:
            query = [{"clocks.current.graphics": "clocks.gr", "clocks.current.sm": "clocks.sm",
                      "clocks.current.memory": "clocks.mem", "clocks.current.video": "clocks.video"}
                     .get(f, f) for f in query]
        if "insufficient" in name:
            query[0] = "gpu_name"
        rc, out, _ = fake(state, "--query-gpu=" + ",".join(query), "--format=csv")
        assert rc == 0 and out.splitlines()[0] == real_header, name
    rc, out, _ = fake(state, "--query-compute-apps=" + ",".join(APP_CAPTURE_FIELDS), "--format=csv")
    assert out == fx("csv-query-compute-apps-header-only-h100-mig-idle-driver590.csv")


def test_fake_value_style_matches_real_captures(fake_smi):
    _, state = fake_smi
    fields = ["timestamp", "name", "uuid", "pci.bus_id", "memory.total", "memory.used",
              "utilization.gpu", "power.draw", "fan.speed", "mig.mode.current"]
    rc, out, _ = fake(state, "--query-gpu=" + ",".join(fields), "--format=csv")
    row = out.splitlines()[1].split(", ")
    assert re.match(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d\.\d{3}$", row[0])
    assert re.match(r"^\d{8}:[0-9A-F]{2}:00\.0$", row[3])  # like 00000000:0C:00.0
    assert row[4] == "40960 MiB" and row[5] == "3 MiB" and row[6] == "0 %"
    assert re.match(r"^\d+\.\d\d W$", row[7])  # like 111.50 W
    assert row[8] == "[N/A]" and row[9] == "Disabled"
    rc, out, _ = fake(state, "--query-gpu=" + ",".join(fields), "--format=csv,noheader,nounits")
    row = out.splitlines()[0].split(", ")
    assert row[4] == "40960" and row[6] == "0" and row[8] == "[N/A]"


def test_fake_unknown_field(fake_smi):
    _, state = fake_smi
    rc, out, _ = fake(state, "--query-gpu=index,xyz", "--format=csv")
    assert rc == 2 and out.splitlines()[0] == 'Field "xyz" is not a valid field to query.'
    with pytest.raises(NvidiaSmiError) as e:
        smi.parse_csv(out, ["index", "xyz"])
    assert e.value.kind == "failed"


def test_fake_list_L_byte_equal_to_the_h200_capture(tmp_path):
    real = fx("list-L-h200-mig-driver590.txt")
    listing = smi.parse_list(real)[0]
    gi_ci = [(2, 0), (2, 1), (3, 0), (9, 0), (10, 0)]
    mig = [{"uuid": m["uuid"], "profile": m["profile"], "gi": gi, "ci": ci, "memory.used": 9,
            "memory.total": 16384} for m, (gi, ci) in zip(listing["mig"], gi_ci)]
    state = tmp_path / "s.json"
    fakesmi.write_state(state, gpus=[{"index": 0, "uuid": listing["uuid"], "name": "NVIDIA H200",
                                      "mig": mig}])
    rc, out, _ = fake(state, "-L")
    assert rc == 0 and out == real


def test_fake_version_and_i(fake_smi):
    _, state = fake_smi
    rc, out, _ = fake(state, "--version")
    assert rc == 0 and "DRIVER version      : 550.127.05" in out
    rc, out, _ = fake(state, "-i", "2", "--query-gpu=index,uuid", "--format=csv,noheader")
    assert rc == 0 and out.startswith("2, GPU-") and len(out.splitlines()) == 1
    rc, out, _ = fake(state, "-i", "9", "--query-gpu=index", "--format=csv,noheader")
    assert rc == 6 and out == "No devices were found\n"
    rc, out, _ = fake(state, "-q", "-x", "-i", "1")
    assert len(smi.parse_xml(out)) == 1


FAKE_ERROR_RC = {"driver_not_loaded": 9, "nvml_mismatch": 18, "no_devices": 6,
                 "device_handle": 255, "gpu_lost": 15, "nvml_unknown": 255, "failed": 3,
                 "bad_output": 0}


@pytest.mark.parametrize("kind", sorted(FAKE_ERROR_RC))
def test_fake_error_modes_make_query_raise(fake_smi, kind):
    _, state = fake_smi
    fakesmi.write_state(state, error=kind)
    rc, out, _ = fake(state, "--query-gpu=index", "--format=csv")
    assert rc == FAKE_ERROR_RC[kind]
    real = {"driver_not_loaded": "error-driver-not-loaded.txt",
            "nvml_mismatch": "error-nvml-driver-library-mismatch.txt",
            "no_devices": "error-no-devices-found.txt",
            "device_handle": "error-device-handle-unknown-error.txt",
            "gpu_lost": "error-device-handle-gpu-is-lost.txt",
            "nvml_unknown": "error-nvml-unknown-error-in-container.txt"}.get(kind)
    if real:
        assert out == fx(real)
    if kind == "no_devices":
        assert gpus.query(run=fake_run(state))["gpus"] == []
        return
    with pytest.raises(NvidiaSmiError) as e:
        gpus.query(run=fake_run(state))
    assert e.value.kind == kind


def test_fake_not_found_timeout_and_inforom(fake_smi):
    bin_dir, state = fake_smi
    fakesmi.write_state(state, error="not_found")
    with pytest.raises(NvidiaSmiError) as e:
        gpus.query(run=fake_run(state))
    assert e.value.kind == "not_found"
    fakesmi.write_state(state, delay_s=5)
    with pytest.raises(NvidiaSmiError) as e:
        gpus.query(str(bin_dir / "nvidia-smi"), timeout=0.5)
    assert e.value.kind == "timeout"
    fakesmi.write_state(state, error="inforom")
    rc, out, _ = fake(state, "--query-gpu=index", "--format=csv,noheader")
    assert rc == 14 and out.splitlines()[-1].startswith("WARNING: infoROM is corrupted")
    snap = gpus.query(run=fake_run(state))
    assert len(snap["gpus"]) == 4


def test_fake_real_binary_path_via_query(fake_smi):
    """query() with the default subprocess runner on the installed fake (PATH-free)."""
    bin_dir, state = fake_smi
    units = gpus.classify(gpus.query(str(bin_dir / "nvidia-smi")))
    assert [u["state"] for u in units] == ["free"] * 4
    assert [u["index"] for u in units] == ["0", "1", "2", "3"]


def test_fake_foreign_process_on_gpu0_makes_it_busy(fake_smi):
    _, state = fake_smi
    s = fakesmi.write_state(state, apps=[{"gpu_uuid": fakesmi.gpu_uuid(0), "pid": 4242,
                                          "process_name": "python other user.py --lr 0.1, x",
                                          "used_memory": 20000}])
    rc, out, _ = fake(state, "--query-compute-apps=pid,process_name,used_memory,gpu_uuid",
                      "--format=csv")
    assert out.splitlines()[0] == "pid, process_name, used_gpu_memory [MiB], gpu_uuid"
    snap = gpus.query(run=fake_run(state))
    assert snap["apps"] == [{"gpu_uuid": s["gpus"][0]["uuid"], "pid": 4242, "used_memory": 20000,
                             "process_name": "python other user.py --lr 0.1, x"}]
    units = gpus.classify(snap)
    assert [u["state"] for u in units] == ["busy", "free", "free", "free"]
    assert units[0]["reason"] == "1 foreign process" and units[0]["memory_used"] == 20003
    assert units[0]["processes"] == [{"pid": 4242, "used_memory": 20000,
                                      "name": "python other user.py --lr 0.1, x"}]
    # Our own job's process: not foreign, and its memory does not count against the threshold.
    assert gpus.classify(snap, own_pids=(4242,))[0]["state"] == "free"


def test_fake_memory_threshold_and_insufficient_permissions(fake_smi):
    _, state = fake_smi
    fakesmi.write_state(state, gpu1={"memory.used": 5000}, gpu2={"memory.used": None})
    units = gpus.classify(gpus.query(run=fake_run(state)))
    assert [u["state"] for u in units] == ["free", "busy", "unknown", "free"]
    assert units[1]["reason"] == "memory 5000/40960 MiB in use"
    assert units[2]["reason"] == "memory not readable: [N/A]"


def test_fake_mig_yields_mig_units(fake_smi):
    _, state = fake_smi
    s = fakesmi.write_state(state, gpus=2, mig={1: ["3g.20gb", "2g.10gb", "1g.5gb"]})
    mig = s["gpus"][1]["mig"]
    fakesmi.write_state(state, gpus=2, mig={1: ["3g.20gb", "2g.10gb", "1g.5gb"]},
                        apps=[{"gpu_uuid": mig[1]["uuid"], "pid": 777, "process_name": "train.py",
                               "used_memory": 4000}])
    calls = []
    run = fake_run(state)
    snap = gpus.query(run=lambda argv: (calls.append(argv), run(argv))[1])
    assert [c[1:] for c in calls[2:]] == [["-L"], ["-q", "-x"]]
    # compute-apps reports the parent GPU- uuid, like the real H200 capture
    assert snap["apps"][0]["gpu_uuid"] == s["gpus"][1]["uuid"]
    units = gpus.classify(snap)
    assert [u["index"] for u in units] == ["0", "1:0", "1:1", "1:2"]
    assert s["gpus"][1]["uuid"] not in [u["uuid"] for u in units]
    assert [u["uuid"] for u in units[1:]] == [m["uuid"] for m in mig]
    assert [u["state"] for u in units] == ["free", "free", "busy", "free"]
    assert units[2]["reason"] == "1 foreign process" and units[2]["memory_used"] == 4013
    assert units[2]["name"] == "NVIDIA A100-SXM4-40GB MIG 2g.10gb"
    assert all(u["parent_uuid"] == s["gpus"][1]["uuid"] for u in units[1:])
    # Our own process: its 4000 MiB don't count, the 13 MiB left are under the threshold.
    assert gpus.classify(snap, own_pids=[777])[2]["state"] == "free"
    assert gpus.classify(snap, own_pids=[777], mem_busy_mib=10)[2]["state"] == "busy"
