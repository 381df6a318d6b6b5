"""``xception bench`` on tiny inputs: the report, the peers with our weights, missing peers."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import xception

from xception.cli import main
from xception.bench.harness import format_table, run_bench
from xception.deploy.parity import TOLERANCE

FP32, BF16 = TOLERANCE["fp32"], TOLERANCE["bf16"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("middle_blocks", [0, 2, 8])
def test_timm_twin_of_any_middle_flow_depth(middle_blocks):
    """timm's legacy_xception has 8 middle blocks; a shallower seed model gets a twin whose surplus
    blocks pass their input through: the same function on our weights."""
    from xception.bench.harness import randomize_batchnorm_
    from xception.bench.peers import timm_model

    torch.manual_seed(0)
    model = randomize_batchnorm_(xception.create_model("xception", num_classes=4, middle_blocks=middle_blocks)).eval()
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(timm_model(model)(x), model(x), rtol=1e-5, atol=1e-5)


def test_bench_report_and_peers(monkeypatch):
    from xception.bench import peers

    monkeypatch.setattr(peers, "cpu_has_native_bf16", lambda: True)  # timm's bf16 rows, on any CPU
    report = run_bench(image_size=48, dtypes=["fp32"], modes=["eager"], compare=["timm"], warmup=0, repeats=1,
                       min_round_s=0.0, compile_peers=False)
    json.dumps(report)  # JSON-ready
    ours = [r for r in report["results"] if r["impl"] == "ours"]
    timm_rows = {r["mode"]: r for r in report["results"] if r["impl"] == "timm"}
    assert [r["mode"] for r in ours] == ["eager-fp32-channels_last"] and ours[0]["parity_ok"]
    assert set(timm_rows) == {"eager-fp32-nchw", "eager-fp32-channels_last", "eager-bf16-nchw",
                              "eager-bf16-channels_last"}
    # timm got our weights: the same function
    assert timm_rows["eager-fp32-nchw"]["rel_error"] <= FP32
    assert timm_rows["eager-bf16-channels_last"]["rel_error"] <= BF16
    best = max((r for r in report["results"] if r["impl"] == "timm"), key=lambda r: r["images_per_s"])
    assert report["best_peer"]["images_per_s"] == best["images_per_s"]
    assert report["speedup"] == pytest.approx(ours[0]["images_per_s"] / best["images_per_s"])
    for r in report["results"]:
        assert r["images_per_s"] > 0 and r["latency_ms_p95"] >= r["latency_ms_p50"] > 0
    assert "best ours" in format_table(report)


def test_timm_peer_stays_fp32_without_native_bf16(monkeypatch):
    from xception.bench import peers

    monkeypatch.setattr(peers, "cpu_has_native_bf16", lambda: False)
    model = xception.create_model("xception")
    labels = [(label, precision) for label, precision, _ in peers.timm_candidates(model, torch.device("cpu"),
                                                                                  (1, 3, 40, 40), [])]
    assert labels == [("eager-fp32-nchw", "fp32"), ("eager-fp32-channels_last", "fp32"),
                      ("compile-freezing-fp32-channels_last", "fp32")]


def test_bench_aligned_model_has_its_timm_peer():

    report = run_bench(model_name="xception41p", image_size=48, dtypes=["fp32"], modes=["eager"], compare=["timm"],
                       warmup=0, repeats=1, min_round_s=0.0, compile_peers=False)
    timm_rows = {r["mode"]: r for r in report["results"] if r["impl"] == "timm"}
    assert not any(r["error"] for r in report["results"])
    assert timm_rows["eager-fp32-nchw"]["rel_error"] <= FP32  # timm's xception41p with our weights
    assert report["best_peer"] is not None and report["speedup"] is not None


def test_bench_cli_json_and_missing_peer(monkeypatch, capsys):
    """A peer that is not installed is reported in the JSON, not fatal."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    code = main(["bench", "--image-size", "40", "--dtype", "fp32", "--modes", "eager", "--compare", "onnxruntime",
                 "--warmup", "0", "--repeats", "1", "--min-round-s", "0", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    ours, missing = report["results"]
    assert ours["impl"] == "ours" and ours["parity_ok"] and ours["images_per_s"] > 0
    assert missing["impl"] == "onnxruntime" and 'pip install "xception[bench]"' in missing["error"]
    assert report["best_peer"] is None and report["speedup"] is None
    assert main(["bench", "--dtype", "int3"]) == 2


def test_bench_json_stdout_is_the_report_alone(monkeypatch, capsys):
    """Whatever a peer prints while it builds (NNCF's progress bars do) goes to stderr."""
    from xception.bench import peers

    def chatty(model, device, shape, calibration):
        def build():
            print("Statistics collection 100%")
            return (lambda x: torch.zeros(x.shape[0], 1000)), 0.0
        return [("chatty", "fp32", build)]

    monkeypatch.setitem(peers.PEER_CANDIDATES, "timm", chatty)
    assert main(["bench", "--image-size", "40", "--dtype", "fp32", "--modes", "eager", "--compare", "timm",
                 "--warmup", "0", "--repeats", "1", "--min-round-s", "0", "--json"]) == 0
    out = capsys.readouterr()
    assert [r["mode"] for r in json.loads(out.out)["results"]] == ["eager-fp32-channels_last", "chatty"]
    assert "Statistics collection" in out.err


def test_bench_times_both_int8_paths():
    report = run_bench(image_size=32, dtypes=["int8", "int8-dynamic"], modes=["eager"], compare=[], warmup=0,
                       repeats=1, min_round_s=0.0, calibration=2, model_kwargs={"middle_blocks": 0})
    rows = {r["mode"]: r for r in report["results"]}
    assert set(rows) == {"static-int8", "eager-int8-dynamic-channels_last"}
    assert all(r["precision"] == "int8" and r["parity_ok"] and r["images_per_s"] > 0 for r in rows.values())
    assert 0 < rows["eager-int8-dynamic-channels_last"]["rel_error"] <= BF16
    assert 0 < rows["static-int8"]["rel_error"] <= TOLERANCE["int8"]
    assert report["best_ours_int8"]["mode"] in rows


def test_bench_default_precisions_follow_the_cpu(monkeypatch):
    from xception.bench import harness as bench

    for flags, expected in [(set(), ["fp32", "int8"]), ({"avx512_bf16"}, ["bf16", "int8"]),
                            ({"amx_bf16", "amx_int8"}, ["bf16", "int8", "int8-dynamic"]),
                            ({"avx_vnni"}, ["fp32", "int8", "int8-dynamic"])]:
        monkeypatch.setattr(bench, "cpu_flags", lambda flags=flags: flags)
        assert bench.default_precisions(torch.device("cpu")) == expected
    assert bench.default_precisions(torch.device("cuda")) == ["bf16"]


@pytest.mark.slow
def test_deployment_engines_as_peers():
    """ONNX Runtime fp32 and static int8, OpenVINO default / f32 / NNCF int8, all on our weights and
    calibrated on the same images; the report singles out the int8 paths."""
    report = run_bench(image_size=32, dtypes=["fp32", "int8"], modes=["eager"], compare=["onnxruntime", "openvino"],
                       warmup=0, repeats=1, min_round_s=0.0, calibration=2,
                       model_kwargs={"num_classes": 10, "middle_blocks": 1})
    rows = {(r["impl"], r["mode"]): r for r in report["results"]}
    assert not [r["error"] for r in report["results"] if r["error"]]
    expected = {("onnxruntime", "fp32-cpu"): ("fp32", FP32 * 10), ("onnxruntime", "int8-static-qdq-per-channel-cpu"):
                ("int8", 0.2), ("openvino", "default-latency-cpu"): ("default", BF16),
                ("openvino", "f32-latency-cpu"): ("fp32", FP32 * 10), ("openvino", "int8-nncf-latency-cpu"): ("int8", 0.2)}
    for key, (precision, bound) in expected.items():
        assert rows[key]["precision"] == precision and 0 <= rows[key]["rel_error"] <= bound, (key, rows[key])
        assert rows[key]["images_per_s"] > 0
    assert rows[("ours", "static-int8")]["precision"] == "int8"
    assert rows[("ours", "static-int8")]["rel_error"] <= TOLERANCE["int8"]
    assert report["calibration_images"] == 2 and report["best_peer_int8"]["impl"] in ("onnxruntime", "openvino")
    assert report["int8_speedup"] == pytest.approx(report["best_ours_int8"]["images_per_s"]
                                                   / report["best_peer_int8"]["images_per_s"])
    assert "int8" in format_table(report).splitlines()[-1]
