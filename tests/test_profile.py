import csv
import json
import time

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from typer.testing import CliRunner

from esskit.cli import app
from esskit.config import Config, ProfileConfig, build_config
from esskit.errors import ConfigError
from esskit.profile.estimate import MIB, MemoryTracker, block_bytes, estimate_training_peak
from esskit.profile.report import table6
from esskit.profile.search import COLUMNS, ProfileSpec, Trial, _note, max_batch_size
from esskit.profile.step import cell_config


def test_allocation_rounding_follows_the_caching_allocator():
    assert [block_bytes(n) for n in (0, 1, 512, 513, 4000)] == [0, 512, 512, 1024, 4096]


def test_tracker_counts_each_storage_once_and_frees_it_with_its_last_tensor():
    with MemoryTracker() as tracker:
        a = torch.empty(100)  # 400 B -> one 512 B block
        view = a.view(10, 10)  # same storage: nothing new
        a.add_(1)  # in place: nothing new
        big = torch.empty(300_000)  # 1.2 MB -> 1,200,128 B allocated from a new 20 MiB segment
        c = a + 1  # 512 B
        assert (tracker.reserved, tracker.live_allocated) == (2 * MIB + 20 * MIB, 1024 + 1_200_128)
        del big
        assert (tracker.reserved, tracker.live_allocated) == (22 * MIB, 1024)  # segments stay cached
        del a
        assert tracker.live_allocated == 1024  # `view` keeps a's storage alive
        del view
        assert tracker.live_allocated == 512
    assert (tracker.peak, tracker.peak_allocated) == (22 * MIB, 1024 + 1_200_128)
    del c


def test_boolean_mask_indexing_runs_on_fake_tensors_and_counts_the_nonzero_indices():
    with FakeTensorMode(), MemoryTracker(all_true_masks=True) as tracker:
        x = torch.empty(1000, 12, requires_grad=True)  # 48,000 B -> 48,128
        mask = torch.ones(1000, dtype=torch.bool)  # 1,000 B -> 1,024
        before = tracker.live_allocated
        y = x[mask]
        assert y.shape == (1000, 12)
        # during the op: nonzero() indices [1000, 1] int64 (8,192) and the output (48,128)
        assert tracker.peak_allocated == before + 8192 + 48_128
        assert tracker.live_allocated == before + 48_128
        y.sum().backward()  # index backward: index_put with the same mask
        assert x.grad.shape == (1000, 12)


def test_tracker_agrees_with_pytorchs_memtracker():
    mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")
    from esskit.profile.step import MixedPrecision, build_training, synthetic_batch, training_step

    cfg = cell_config(Config(), method="ess", num_classes=150, backbone="resnet18", crop=(64, 64), precision="no")
    with FakeTensorMode():
        reference = mem_tracker.MemTracker()
        with reference, MemoryTracker(all_true_masks=True) as ours:
            model, optimizer = build_training(cfg, "cpu")
            images, target = synthetic_batch(cfg, 2, "cpu")
            training_step(model, optimizer, images, target, cfg, MixedPrecision("no", "cpu"))
        theirs = sum(snap["Total"] for snap in reference.get_tracker_snapshot("peak").values())
    assert ours.peak_allocated == pytest.approx(theirs, rel=1e-3)


@pytest.mark.parametrize("boundary", [0, 1, 2, 3, 13, 16, 17, 63, 64, 100])
def test_search_finds_the_exact_boundary(boundary):
    def try_batch(batch):  # a fake memory function: 100 MiB per image + 50 MiB fixed
        peak = (batch * 100 + 50) * MIB
        return Trial(batch, batch <= boundary, peak)

    best, trials = max_batch_size(try_batch, limit=64)
    assert best == min(boundary, 64)
    tried = [t.batch for t in trials]
    assert len(tried) == len(set(tried))  # no batch tried twice
    assert len(tried) <= 2 * 7 + 1  # doubling then bisection: O(log limit)
    if boundary == 0:
        assert tried == [1]  # out of memory at batch 1: stop there


def test_max_batch_steps_down_when_the_timed_steps_run_out_of_memory():
    # On the H200 the fp16 baseline fitted batch 30 for the search's two steps, then ran out of
    # memory over the timed ones (fragmentation): the reported max batch must keep training.
    from esskit.profile.search import profile_cell

    class Backend:
        device_name, source = "fake", "measured"

        def try_batch(self, cfg, batch):
            return Trial(batch, batch <= 6, batch * MIB, batch * MIB)

        def extra(self, cfg, batch, tried=None):
            if batch >= 5:
                return {"note": f"out of memory while timing at batch {batch}", "timing_failed": True}
            return {"train_s_per_iter": 0.5}

    spec = ProfileSpec(classes=[19], methods=["ess"], backbone="resnet18", crop=(32, 32), max_batch=8)
    row = profile_cell(spec, Backend(), "ess", 19, lambda row: None)
    assert row["max_batch"] == row["batch"] == 4 and row["peak_mib"] == 4.0 and row["train_s_per_iter"] == 0.5
    assert row["note"] == "batch 5 ran out of memory over the timed steps; max batch lowered to 4"
    assert [t["batch"] for t in row["trials"]][-2:] == [5, 4] and "timing_failed" not in row
    fixed = profile_cell(ProfileSpec(classes=[19], methods=["ess"], backbone="resnet18", crop=(32, 32), batch=6),
                         Backend(), "ess", 19, lambda row: None)
    assert fixed["batch"] == 6 and fixed["note"] == "out of memory while timing at batch 6"  # --batch: no step-down


def test_search_order_is_doubling_then_bisection():
    best, trials = max_batch_size(lambda b: Trial(b, b <= 13), limit=256)
    assert best == 13 and [t.batch for t in trials] == [1, 2, 4, 8, 16, 12, 14, 13]


def _peak(method, num_classes, batch, crop):
    # 1 MiB kNN and loss blocks: the [rows, C] distance block and the dense Eq. 6's [rows, C] logit
    # block otherwise grow with C up to their 64 MiB caps, a large share of the step at this tiny
    # scale (at 512x512 every C fills them and they are a few percent).
    base = build_config({"method": {"knn_chunk_mib": 1, "loss_chunk_mib": 1}})
    cfg = cell_config(base, method=method, num_classes=num_classes, backbone="resnet18", crop=(crop, crop),
                      precision="no")
    return estimate_training_peak(cfg, batch).peak_allocated_bytes


def test_estimate_replays_the_allocator_under_the_budget():
    cfg = cell_config(Config(), method="ess", num_classes=19, backbone="resnet18", crop=(64, 64), precision="no")
    free = estimate_training_peak(cfg, 2)
    # Fragmentation: the replayed allocator reserves more than the live bytes at their peak.
    assert free.fits and free.peak_bytes > free.peak_allocated_bytes
    assert estimate_training_peak(cfg, 2, cap_bytes=free.peak_bytes) == free  # the cap is never hit
    tight = estimate_training_peak(cfg, 2, cap_bytes=free.peak_allocated_bytes // 2)
    assert not tight.fits and tight.peak_bytes == free.peak_bytes  # reported: what it would need
    # Just below the free peak: cached segments are released before giving up, as a capped GPU
    # does (here resnet18 at 64 px reserves 262 MiB freely and fits a 258 MiB cap, not 254).
    squeezed = estimate_training_peak(cfg, 2, cap_bytes=free.peak_bytes - 4 * MIB)
    assert squeezed.fits and squeezed.peak_bytes <= free.peak_bytes - 4 * MIB


def test_estimated_ess_memory_is_flat_in_classes_while_baseline_grows():
    batch, crop, small, large = 4, 128, 19, 400
    ess_small, ess_large = _peak("ess", small, batch, crop), _peak("ess", large, batch, crop)
    base_small, base_large = _peak("baseline", small, batch, crop), _peak("baseline", large, batch, crop)
    # The baseline's backward holds three fp32 [B, C, H, W] tensors at once: the saved log-softmax,
    # the NLL gradient and the log-softmax gradient; two of them more than at C = small is a floor.
    pixels_x_bytes = batch * crop * crop * 4
    assert base_large >= 3 * large * pixels_x_bytes
    assert base_large - base_small >= 2 * (large - small) * pixels_x_bytes
    # ESS grows only by the C x d class embeddings (+ gradient and momentum): bytes, not megabytes.
    assert abs(ess_large - ess_small) < 0.01 * ess_small


def _profile_tiny(tmp_path, *options: str):
    """`esskit profile` estimating resnet18 at 64 px in a 0.35 GiB budget; returns its output folder."""
    out = tmp_path / "profile"
    result = CliRunner().invoke(app, ["profile", "--device", "meta", "--backbone", "resnet18", "--crop", "64",
                                      "--budget-gib", "0.35", *options, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_profile_cli_writes_results_with_the_right_columns(tmp_path):
    out = _profile_tiny(tmp_path, "--classes", "19,150", "--max-batch", "2")
    with open(out / "results.csv") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == COLUMNS
    assert [(r["method"], r["classes"]) for r in rows] == [("baseline", "19"), ("baseline", "150"),
                                                          ("ess", "19"), ("ess", "150")]
    for row in rows:
        assert row["source"] == "estimated" and row["device"] == "meta" and row["crop"] == "64x64"
        assert row["train_s_per_iter"] == row["infer_s_per_img"] == row["estimated_peak_mib"] == ""
        assert 1 <= int(row["max_batch"]) <= 2 and float(row["peak_mib"]) <= 0.35 * 1024
    payload = json.loads((out / "results.json").read_text())
    assert len(payload["rows"]) == 4 and set(COLUMNS) <= set(payload["rows"][0])
    assert payload["settings"]["source"] == "estimated" and payload["rows"][0]["trials"][0]["batch"] == 1
    assert (out / "figure1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table6_md = (out / "table6.md").read_text()
    assert "| Cityscapes (19; paper crop 400x800) | baseline | 14 | 12.1 |" in table6_md
    assert "| ADE20k (150; paper crop 512x512) | ours (ESS) | 10 | 10.0 |" in table6_md
    assert "| 0.195 | 4.94 | - | - | - |" in (out / "table7.md").read_text()


def test_profile_cli_reports_bad_options_in_one_line(tmp_path):
    result = CliRunner().invoke(app, ["profile", "--device", "meta", "--methods", "baseline,fancy",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--methods: 'fancy' is not one of baseline, ess" in result.output
    result = CliRunner().invoke(app, ["profile", "--device", "meta", "--methods", ",", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--methods: no method given" in result.output
    result = CliRunner().invoke(app, ["profile", "--set", "profile.methods=[]", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "profile.methods is empty" in result.output
    # the error names the user's --set only, not the class count the profiler checks with
    result = CliRunner().invoke(app, ["profile", "--set", "foo.bar=1", "--classes", "19", "--out", str(tmp_path)])
    assert result.exit_code == 2 and result.output.startswith("error: defaults with --set foo.bar=1: unknown"), result.output
    (tmp_path / "a_file").write_text("")  # refused before the first (minutes-long) cell, not after it
    result = CliRunner().invoke(app, ["profile", "--device", "meta", "--classes", "19", "--methods", "ess",
                                      "--backbone", "resnet18", "--crop", "16", "--out", str(tmp_path / "a_file")])
    assert result.exit_code == 2 and "--out" in result.output and "a_file: cannot create" in result.output
    for budget in ("nan", "inf"):
        result = CliRunner().invoke(app, ["profile", "--device", "meta", "--budget-gib", budget, "--out", str(tmp_path)])
        assert result.exit_code == 2 and f"--budget-gib {budget} must be a positive number of GiB" in result.output
    result = CliRunner().invoke(app, ["profile", "--device", "meta", "--backbone", "resnet_nope", "--out",
                                      str(tmp_path / "never")])  # before any table or folder
    assert result.output.startswith("error: model.backbone = 'resnet_nope' is not a timm model")
    assert not (tmp_path / "never").exists()
    # k is checked against the profiled C, not the recipe's default 19
    from esskit.profile import load_base
    assert load_base(None, ["method.k=30"], "150,1284")[0].method.k == 30


def test_profile_search_and_notes_at_the_edges():
    # batch 1 at a 16 px crop: BatchNorm refuses one value per channel, a failed trial, not a crash;
    # batch 2 gives it two values, so the search goes on from there
    spec = ProfileSpec(classes=[19], methods=["ess"], backbone="resnet18", crop=(16, 16), max_batch=4)
    from esskit.profile.estimate import Estimator
    from esskit.profile.search import profile_cell

    row = profile_cell(spec, Estimator(spec.budget_bytes), "ess", 19, lambda row: None)
    # batch 1's failure is no limit of a max batch of 4: the note says the search limit capped it
    assert row["max_batch"] == 4 and row["note"] == "search limit --max-batch 4 reached"
    failed = [Trial(1, False, failure="BatchNorm sees one value per channel (use a larger --crop)")]
    assert _note(spec, 0, failed).startswith("batch 1 does not run: BatchNorm sees one value")
    # --batch equal to --max-batch ran no search: no "limit reached" note
    fits = [Trial(4, True, MIB, MIB)]
    assert _note(ProfileSpec(classes=[19], batch=4, max_batch=4), 4, fits) == ""
    assert _note(ProfileSpec(classes=[19], max_batch=4), 4, fits) == "search limit --max-batch 4 reached"


def test_profile_takes_its_grid_from_the_recipes_profile_section(tmp_path):
    recipe = tmp_path / "grid.toml"
    recipe.write_text('[model]\nbackbone = "resnet18"\n[data]\ncrop = [64, 64]\n'
                      '[profile]\nclasses = [19, 40]\nmethods = ["ess"]\nbudget_gib = 0.35\nmax_batch = 2\n'
                      'device = "meta"\n')
    out = tmp_path / "profile"
    result = CliRunner().invoke(app, ["profile", str(recipe), "--out", str(out)])
    assert result.exit_code == 0, result.output
    settings = json.loads((out / "results.json").read_text())["settings"]
    assert (settings["classes"], settings["methods"], settings["budget_gib"], settings["max_batch_limit"]) == \
        ([19, 40], ["ess"], 0.35, 2)
    # --set overrides the section, an option both
    result = CliRunner().invoke(app, ["profile", str(recipe), "--classes", "19", "--set", "profile.methods=['baseline']",
                                      "--batch", "1", "--out", str(tmp_path / "other")])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "other" / "results.json").read_text())["rows"]
    assert [(r["method"], r["classes"], r["trials"][0]["batch"]) for r in rows] == [("baseline", 19, 1)]
    result = CliRunner().invoke(app, ["profile", str(recipe), "--set", "profile.methods=['fancy']", "--out", str(out)])
    assert result.exit_code == 2 and "profile.methods = 'fancy' is not one of" in result.output


def test_cuda_measurer_control_flow_without_a_gpu(monkeypatch):
    """No GPU here: torch.cuda and the step are stubbed to check the OOM handling, the peaks read
    and the timing arithmetic of measure.py; real numbers need `--device cuda` on a GPU."""
    from types import SimpleNamespace

    from esskit.profile import measure
    from esskit.profile.estimate import MemoryEstimate

    calls = {}
    props = SimpleNamespace(name="Fake GPU", total_memory=48 * 2**30)
    for name, value in {"is_available": lambda: True, "current_device": lambda: 0,
                        "get_device_properties": lambda device: props, "synchronize": lambda device=None: None,
                        "empty_cache": lambda: None, "reset_peak_memory_stats": lambda device=None: None,
                        "max_memory_reserved": lambda device=None: 3 * MIB,
                        "max_memory_allocated": lambda device=None: 2 * MIB,
                        "set_per_process_memory_fraction": lambda f, device=None: calls.setdefault("fraction", f),
                        }.items():
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(measure, "gpu_name_and_memory", lambda device: ("Fake GPU", props.total_memory))
    builds = []
    monkeypatch.setattr(measure, "build_training",
                        lambda cfg, device: builds.append(cfg.method.name) or (torch.nn.Linear(1, 1), None))
    inputs_seen = []
    monkeypatch.setattr(measure, "synthetic_batch",
                        lambda cfg, batch, device, inputs, step=0: inputs_seen.append(inputs) or (batch, None))
    monkeypatch.setattr(measure, "inference_step", lambda model, images, amp, cfg: None)
    estimated_at = []
    monkeypatch.setattr(measure, "estimate_training_peak",
                        lambda cfg, batch, cap_bytes: estimated_at.append(batch) or MemoryEstimate(5 * MIB, 4 * MIB))

    def step(model, optimizer, batch, target, cfg, amp, knn=None):
        if batch == 100:  # what torch raised for the baseline's 2^31+-element logits on an H200
            raise RuntimeError("CUDA error: invalid argument\nSearch for `cudaErrorInvalidValue'")
        if batch > 6:
            model.weight.grad = torch.ones_like(model.weight)  # a backward that ran out half way
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        time.sleep(0.004)  # the step's own work
        if knn is not None:  # the loss's searches, timed between synchronisations
            knn(torch.randn(64, 4), torch.randn(19, 4), 3)

    monkeypatch.setattr(measure, "training_step", step)
    measurer = measure.CudaMeasurer(12 * 2**30)
    assert calls["fraction"] == pytest.approx(12 / 48) and "capped at 12 GiB" in measurer.device_name
    # synthetic inputs for the times; the memory trials keep noise (the worst case, as the estimate's)
    synthetic = Config(profile=ProfileConfig(inputs="synthetic"))
    cfg = cell_config(synthetic, method="ess", num_classes=19, backbone="resnet18", crop=(64, 64), precision="no")
    assert measurer.try_batch(cfg, 6) == Trial(6, True, 3 * MIB, 2 * MIB)
    assert measurer.try_batch(cfg, 7) == Trial(7, False, None, None)
    assert measurer.timer.training(cfg)[0].weight.grad is None  # the failed trial's gradients are gone
    too_large = measurer.try_batch(cfg, 100)
    assert not too_large.fits and "invalid argument" in too_large.failure
    spec = ProfileSpec(classes=[19], batch=100)
    assert _note(spec, 0, [too_large]).startswith("batch 100 does not run: a kernel refused")
    assert set(inputs_seen) == {"noise"}
    inputs_seen.clear()
    row = measurer.extra(cfg, 6)
    assert set(inputs_seen) == {"synthetic"}
    assert row["estimated_peak_mib"] == 5.0 and row["train_s_per_iter"] >= 0 and row["infer_s_per_img"] >= 0
    assert row["estimated_peak_allocated_mib"] == 4.0 and estimated_at == [6]
    # Table 6 compares each estimate with its own measurement: reserved with reserved, allocated with allocated
    text = table6([{**row, "method": "ess", "classes": 19, "max_batch": 6, "peak_mib": 5.5, "peak_allocated_mib": 4.0,
                    "source": "measured", "note": ""}], {"backbone": "resnet18", "crop": [64, 64], "precision": "no", "embed_dim": 12,
                                                        "k": 8, "budget_gib": 12, "source": "measured",
                                                        "device_name": "fake"})
    assert "| -9.1 % | +0.0 % |" in text
    assert measurer.extra(cfg, 0, 8) == {"estimated_peak_mib": 5.0, "estimated_peak_allocated_mib": 4.0}
    assert estimated_at[-1] == 8  # --batch 8 did not run: the estimate at 8, not at 1
    assert row["train_s_per_img"] == pytest.approx(row["train_s_per_iter"] / 6, abs=1e-4)
    assert row["knn_s_per_iter"] > 0 and 0 < row["knn_share"] < 1
    baseline = cell_config(Config(), method="baseline", num_classes=19, backbone="resnet18", crop=(64, 64),
                           precision="no")
    assert "knn_share" not in measurer.extra(baseline, 6)  # no search in the baseline
    assert builds == ["ess", "baseline"]  # one model per cell, reused by its trials and timings
    with pytest.raises(ValueError):  # anything but out-of-memory propagates
        monkeypatch.setattr(measure, "training_step", lambda *a: (_ for _ in ()).throw(ValueError("bug")))
        measurer.try_batch(cfg, 1)


def test_profile_cli_ess_full_and_large_c_are_flat(tmp_path):
    # ess and ess_full at C = 19 and 100,000: the estimate runs without boolean-mask help (the lean
    # losses have none) and the peak at equal batch stays within 10 % of C = 19 (1 MiB kNN blocks:
    # at this tiny crop the default 64 MiB block would be a large share of the step).
    out = _profile_tiny(tmp_path, "--classes", "19,100000", "--methods", "ess,ess_full", "--max-batch", "1",
                        "--set", "method.knn_chunk_mib=1", "--set", "method.loss_chunk_mib=1")
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["method"], r["classes"]) for r in rows] == [("ess", 19), ("ess", 100000), ("ess_full", 19),
                                                          ("ess_full", 100000)]
    for method in ("ess", "ess_full"):
        small, large = (next(r for r in rows if r["method"] == method and r["classes"] == c) for c in (19, 100000))
        assert small["max_batch"] == large["max_batch"] == 1
        assert large["peak_allocated_mib"] <= 1.1 * small["peak_allocated_mib"]
    assert "ESS, full softmax" in (out / "table6.md").read_text()


def test_profile_cli_estimates_the_feature_exact_search(tmp_path):
    """knn_at = "feature_exact" on fake tensors (every union at 4m slots, every pixel counted as
    searched again): the estimate runs and stays within 10 % of the search per label pixel's."""
    peaks = {}
    for at in ("label", "feature_exact"):
        out = _profile_tiny(tmp_path / at, "--classes", "1284", "--methods", "ess", "--batch", "2",
                            "--set", "method.knn_chunk_mib=1", "--set", f"method.knn_at={at}")
        peaks[at] = json.loads((out / "results.json").read_text())["rows"][0]["peak_allocated_mib"]
    assert peaks["label"] > 0 and abs(peaks["feature_exact"] / peaks["label"] - 1) < 0.1


def test_profile_cli_fixed_batch_skips_the_search(tmp_path):
    out = _profile_tiny(tmp_path, "--classes", "19,1284", "--batch", "3")
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert all(r["max_batch"] is None and len(r["trials"]) == 1 and r["trials"][0]["batch"] == 3 for r in rows)
    fits = {(r["method"], r["classes"]): r["batch"] for r in rows}
    # At 64 px and 0.35 GiB the baseline's C = 1284 logits no longer fit 3 images; ESS's do.
    assert fits == {("baseline", 19): 3, ("baseline", 1284): 0, ("ess", 19): 3, ("ess", 1284): 3}
    big = next(r for r in rows if r["batch"] == 0)
    assert big["note"].startswith("batch 3 does not fit in 0.35 GiB (needs ") and big["peak_mib"] is None
    assert not (out / "figure1.png").exists() and not (out / "table6.md").exists()
    assert "training at batch 3" in (out / "table7.md").read_text()


def test_profile_cli_cpu_times_the_estimates_batch(tmp_path):
    """--device cpu: max batch and peaks are the estimate's, times are real CPU steps at that batch
    (the kNN share on a machine without a GPU)."""
    options = ["--backbone", "resnet18", "--crop", "64", "--budget-gib", "0.35", "--classes", "19,150",
               "--methods", "baseline,ess", "--max-batch", "2"]
    for device in ("meta", "cpu"):
        result = CliRunner().invoke(app, ["profile", "--device", device, *options, "--out", str(tmp_path / device)])
        assert result.exit_code == 0, result.output
    estimated, timed = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("meta", "cpu"))
    assert timed["settings"]["source"] == "estimated + CPU times" and "torch thread" in timed["settings"]["device_name"]
    for est, row in zip(estimated["rows"], timed["rows"]):
        assert (row["method"], row["classes"]) == (est["method"], est["classes"])
        assert (row["max_batch"], row["peak_mib"], row["peak_allocated_mib"]) == (
            est["max_batch"], est["peak_mib"], est["peak_allocated_mib"]) and row["max_batch"] == 2
        assert est["train_s_per_iter"] is None and row["train_s_per_iter"] > 0 and row["infer_s_per_img"] > 0
        assert est["train_spread"] is None and row["train_spread"] >= 0  # (slowest - fastest) / median
        assert row["train_s_per_img"] == pytest.approx(row["train_s_per_iter"] / 2, abs=1e-4)
        if row["method"] == "ess":
            assert 0 < row["knn_s_per_iter"] < row["train_s_per_iter"] and 0 < row["knn_share"] < 1
        else:
            assert row["knn_share"] is None
    table7 = (tmp_path / "cpu" / "table7.md").read_text()
    assert "estimated + CPU times on" in table7 and "Estimated rows have no times" not in table7


def test_profile_cli_times_steps_on_the_synthetic_datasets_inputs(tmp_path, monkeypatch):
    """--inputs synthetic: the timed steps and inference see the synthetic dataset's images and
    labels (one batch drawn per timed run), the estimate keeps the noise batch; the setting is
    recorded, names the default folder, and a folder of the other inputs is refused."""
    import esskit.profile.measure as measure
    from esskit.profile import default_out_dir, load_base, spec_from_options

    seen = []
    batch = measure.synthetic_batch
    monkeypatch.setattr(measure, "synthetic_batch",
                        lambda cfg, b, device, inputs, step=None: seen.append((inputs, step)) or batch(cfg, b, device,
                                                                                                       inputs, step or 0))
    options = ["profile", "--device", "cpu", "--backbone", "resnet18", "--crop", "64", "--classes", "300",
               "--methods", "ess", "--batch", "2", "--set", "method.knn_at=feature_exact"]
    result = CliRunner().invoke(app, [*options, "--inputs", "synthetic", "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    # a new batch each step of the two timed runs (step times, then the kNN's), then inference's image
    steps = measure.TRAIN_WARMUP + measure.TRAIN_ITERS
    assert seen == [("synthetic", i) for i in range(steps)] * 2 + [("synthetic", None)]
    run = json.loads((tmp_path / "p" / "results.json").read_text())
    assert run["settings"]["inputs"] == "synthetic" and run["rows"][0]["knn_share"] > 0
    again = CliRunner().invoke(app, [*options, "--out", str(tmp_path / "p")])
    assert again.exit_code == 2 and "inputs synthetic here, noise now" in again.output
    # a folder from before the inputs were recorded ran on noise: refused too
    settings = json.loads((tmp_path / "p" / "results.json").read_text())
    del settings["settings"]["inputs"]
    settings["settings"]["inputs_was"] = "unrecorded"
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.json").write_text(json.dumps(settings))
    old = CliRunner().invoke(app, [*options, "--inputs", "synthetic", "--out", str(tmp_path / "old")])
    assert old.exit_code == 2 and "inputs noise here, synthetic now" in old.output
    assert "synthetic inputs" in (tmp_path / "p" / "table7.md").read_text()
    meta = CliRunner().invoke(app, ["profile", "--device", "meta", "--inputs", "synthetic", "--out", str(tmp_path / "m")])
    assert meta.exit_code == 2 and "--device meta times nothing" in meta.output
    bad = CliRunner().invoke(app, [*options, "--inputs", "photos", "--out", str(tmp_path / "q")])
    assert bad.exit_code == 2 and "--inputs 'photos' is not one of noise, synthetic" in bad.output
    base, keys = load_base(None, [])
    spec = spec_from_options(base, keys, inputs="synthetic", device="cpu")
    assert default_out_dir(spec).name.endswith("-synthetic-cpu")


def test_synthetic_inputs_are_the_datasets_images_normalised():
    from esskit.data import IGNORE_INDEX
    from esskit.data.synthetic import SyntheticSegmentation
    from esskit.profile.step import synthetic_batch

    cfg = build_config({"data": {"num_classes": 50, "crop": [40, 70]}})
    images, target = synthetic_batch(cfg, 2, "cpu", "synthetic", index=1)  # the dataset's images 2 and 3
    assert images.shape == (2, 3, 40, 70) and target.shape == (2, 40, 70)
    image, mask = SyntheticSegmentation(50, 4, 70)[3]
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (cfg.data.mean, cfg.data.std))
    torch.testing.assert_close(images[1], (image[:, :40].float() / 255 - mean) / std)
    assert torch.equal(target[1], mask[:40]) and (target == IGNORE_INDEX).any()
    noise, labels = synthetic_batch(cfg, 2, "cpu")  # the default: no ignore pixels (the estimate's worst case)
    assert noise.shape == images.shape and (labels >= 0).all()


def test_timed_knn_adds_up_its_calls_and_leaves_the_loss_unchanged():
    from esskit.config import MethodConfig
    from esskit.losses import segmentation_loss
    from esskit.profile.step import TimedKnn

    g = torch.Generator().manual_seed(0)
    output = {"embeddings": torch.randn(2, 7, 8, 8, generator=g), "class_embeddings": torch.randn(19, 7, generator=g)}
    target = torch.randint(0, 19, (2, 32, 32), generator=g)
    syncs = []
    cfg = build_config({"method": {"k": 4}})
    timed = TimedKnn.for_config(cfg, lambda: syncs.append(1))
    plain, _ = segmentation_loss(output, target, MethodConfig(k=4))
    loss, _ = segmentation_loss(output, target, cfg.method, timed)
    assert torch.equal(loss, plain)
    # two searches (pixels' negatives, Eq. 7's nearest classes), each between two synchronisations
    assert len(syncs) == 4 and timed.seconds > 0


def test_timed_knn_counts_the_feature_exact_search_whole_and_once(monkeypatch):
    """knn_at = "feature_exact": its decoder-pixel search, the bound and the label pixels' full
    searches inside it are one timed span each, not counted twice."""
    from esskit.losses import segmentation_loss
    import esskit.profile.step as step

    clock = iter(range(1000))
    monkeypatch.setattr(step.time, "perf_counter", lambda: next(clock))
    g = torch.Generator().manual_seed(0)
    output = {"embeddings": torch.randn(2, 7, 8, 8, generator=g), "class_embeddings": torch.randn(100, 7, generator=g)}
    target = torch.randint(0, 100, (2, 32, 32), generator=g)
    cfg = build_config({"method": {"k": 4, "knn_at": "feature_exact", "margin_weight": 0}})
    syncs = []
    timed = step.TimedKnn.for_config(cfg, lambda: syncs.append(1))
    segmentation_loss(output, target, cfg.method, timed)
    # the build and one lookup: two spans of one clock tick, two synchronisations each
    assert timed.seconds == 2 and len(syncs) == 4


def test_profile_saves_each_finished_cell_so_a_cut_short_run_keeps_them(tmp_path, monkeypatch):
    from esskit import profile as profiling
    from esskit.profile.estimate import Estimator

    class DiesOnEss(Estimator):  # a GPU lease ending during the ESS cell
        def try_batch(self, cfg, batch):
            if cfg.method.name == "ess":
                raise KeyboardInterrupt
            return super().try_batch(cfg, batch)

    monkeypatch.setattr(profiling, "make_backend", lambda spec: DiesOnEss(spec.budget_bytes))
    out = tmp_path / "profile"
    result = CliRunner().invoke(app, ["profile", "--device", "meta", "--backbone", "resnet18", "--crop", "64",
                                      "--budget-gib", "0.35", "--classes", "19,150", "--max-batch", "2",
                                      "--out", str(out)])
    assert result.exit_code != 0
    payload = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["classes"]) for r in payload["rows"]] == [("baseline", 19), ("baseline", 150)]
    assert payload["settings"]["complete"] is False and payload["rows"][1]["max_batch"] >= 1
    assert (out / "figure1.png").is_file() and "baseline" in (out / "table6.md").read_text()
    whole = _profile_tiny(tmp_path / "whole", "--classes", "19", "--methods", "baseline", "--max-batch", "1")
    assert json.loads((whole / "results.json").read_text())["settings"]["complete"] is True


def test_replot_skips_other_folders_and_keeps_old_table6(tmp_path):
    """profiling/replot.py over profiling/results/*/ (its usage line): other folders are skipped with
    a note, and a measured folder from before estimated_peak_allocated_mib keeps its table6.md."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    old = tmp_path / "resnet50-512-fp32-cuda"
    shutil.copytree(root / "profiling/results/resnet50-512-fp32-cuda", old)
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench/results.json").write_text("[]")
    before = (old / "table6.md").read_text()
    result = subprocess.run([sys.executable, str(root / "profiling/replot.py"), str(tmp_path / "bench"), str(old)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "skipped" in result.stdout and "table6.md kept" in result.stdout
    assert (old / "table6.md").read_text() == before


def test_search_tries_batch_2_when_batch_1_fails_on_batchnorm():
    from esskit.profile.search import BATCHNORM_FAILURE

    def try_batch(batch):  # a tiny crop: BatchNorm sees one value per channel at batch 1 only
        return Trial(batch, False, failure=BATCHNORM_FAILURE) if batch == 1 else Trial(batch, batch <= 6, MIB)

    best, trials = max_batch_size(try_batch, limit=64)
    assert best == 6 and [t.batch for t in trials][:3] == [1, 2, 4]
    assert max_batch_size(lambda b: Trial(b, False), limit=64)[1] == [Trial(1, False)]  # out of memory: stop


def test_bad_profile_options_name_the_flag_and_value():
    from esskit.profile import load_base, parse_ints

    for text in ("", ","):
        with pytest.raises(ConfigError, match="--classes"):
            load_base(None, [], text)
        with pytest.raises(ConfigError, match="--classes"):
            parse_ints(text, "--classes")
    for kwargs, flag in (({"budget_gib": 0.0}, "--budget-gib 0 "), ({"max_batch": 0}, "--max-batch 0 "),
                         ({"batch": -1}, "--batch -1 "), ({"crop": (0, 0)}, "--crop 0x0 ")):
        with pytest.raises(ConfigError) as error:
            ProfileSpec(classes=[19], **kwargs)
        assert str(error.value).startswith(flag)


def test_repeated_classes_and_methods_run_once():
    spec = ProfileSpec(classes=[19, 150, 19], methods=["ess", "baseline", "ess"])
    assert spec.classes == [19, 150] and spec.methods == ["ess", "baseline"]


def test_an_out_folder_of_another_grid_is_refused(tmp_path):
    import json

    from esskit.profile import check_out_dir

    settings = {"backbone": "resnet50", "crop": "512x512", "classes": [19, 150], "methods": ["ess"],
                "budget_gib": 12.0}
    (tmp_path / "results.json").write_text(json.dumps({"settings": settings, "rows": []}))
    check_out_dir(tmp_path, settings)  # the same command again (after an interruption): fine
    with pytest.raises(ConfigError, match=r"--out .*classes \[19, 150\] here, \[1000\] now"):
        check_out_dir(tmp_path, {**settings, "classes": [1000]})
    check_out_dir(tmp_path / "new", settings)  # no results yet
    # a key the folder's esskit did not record (it may have run another value), another GPU
    with pytest.raises(ConfigError, match=r"knn not recorded here, triton now"):
        check_out_dir(tmp_path, {**settings, "knn": "triton"})
    (tmp_path / "results.json").write_text(json.dumps({"settings": {**settings, "device_name": "H200"}, "rows": []}))
    with pytest.raises(ConfigError, match=r"device_name H200 here, H100 now"):
        check_out_dir(tmp_path, {**settings, "device_name": "H100"})


# `esskit profile` review: small C for methods without k, --classes 1, FAISS on the estimate, --out of
# another experiment

REVIEW_TINY = ["profile", "--device", "meta", "--backbone", "resnet18", "--crop", "64", "--budget-gib", "0.35",
        "--max-batch", "1"]


@pytest.mark.parametrize("method", ["baseline", "ess_full"])
def test_methods_without_k_run_at_small_c(tmp_path, method):
    # method.k (8) only constrains ess cells; baseline / ess_full at C = 5 are valid
    result = CliRunner().invoke(app, [*REVIEW_TINY, "--classes", "5", "--methods", method, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output


def test_classes_below_two_names_the_flag(tmp_path):
    result = CliRunner().invoke(app, [*REVIEW_TINY, "--classes", "1", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--classes" in result.output, result.output


def test_faiss_knn_on_the_estimate_is_one_line(tmp_path):
    result = CliRunner().invoke(app, [*REVIEW_TINY, "--classes", "19", "--methods", "ess", "--set", "method.knn=faiss",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 2 and "method.knn" in result.output, (result.exit_code, result.output[-300:])


def test_out_of_another_experiment_is_refused(tmp_path):
    options = [*REVIEW_TINY, "--classes", "19", "--methods", "baseline", "--out", str(tmp_path)]
    assert CliRunner().invoke(app, options).exit_code == 0
    before = (tmp_path / "results.json").read_text()
    result = CliRunner().invoke(app, [*options, "--set", "model.norm=gn"])
    assert result.exit_code == 2 and "another profile" in result.output, result.output
    assert (tmp_path / "results.json").read_text() == before
    assert CliRunner().invoke(app, options).exit_code == 0  # the same command again: fine


def test_fp16_trials_apply_their_steps():
    """GradScaler's default scale (2^16) overflowed ESS's first fp16 gradients, so a 2-step trial skipped
    both steps: no momentum in its peak, and timed steps that applied nothing. Its scaler lives per cell."""
    from esskit.config import Config
    from esskit.profile.measure import StepTimer
    from esskit.profile.step import cell_config

    torch.manual_seed(0)
    cfg = cell_config(Config(), method="ess", num_classes=150, backbone="resnet18", crop=(64, 64), precision="fp16")
    timer = StepTimer(torch.device("cpu"))
    timer.train_steps(cfg, 2, 2)
    model, optimizer, amp = timer.training(cfg)
    assert amp.scaler.get_scale() == 2.0**10  # no step skipped
    assert all(optimizer.state[p].get("momentum_buffer") is not None for p in model.parameters())
    timer.train_steps(cfg, 2, 1)
    assert timer.training(cfg)[2] is amp  # the same scaler for the cell's next trial


def test_figure1_marks_the_pixel_accuracy_of_trained_runs(tmp_path, monkeypatch):
    """--accuracy: each run's eval.json pAcc on a right axis at its C, as the paper's Figure 1 does."""
    from esskit.profile import report

    runs = []
    for method, classes, pacc in (("baseline", 19, 0.95), ("ess", 19, 0.93), ("ess", 150, 0.59)):
        run = tmp_path / f"{method}{classes}"
        run.mkdir()
        (run / "eval.json").write_text(json.dumps({"method": method, "num_classes": classes, "pAcc": pacc,
                                                   "mIoU": 0.5}))
        runs.append(str(run))
    figures = []
    monkeypatch.setattr(report, "save_figure_atomic", lambda fig, path: figures.append(fig))
    out = _profile_tiny(tmp_path, "--classes", "19,150", "--max-batch", "2", "--accuracy", ",".join(runs))
    marks = json.loads((out / "results.json").read_text())["settings"]["accuracy"]
    assert [(m["method"], m["classes"], m["pAcc"]) for m in marks] == [("baseline", 19, 0.95), ("ess", 19, 0.93),
                                                                       ("ess", 150, 0.59)]
    right = figures[-1].axes[1]
    assert right.get_ylabel() == "pixel accuracy (%)"
    points = {line.get_label(): list(zip(*line.get_data())) for line in right.get_lines()}
    assert points == {"baseline, pixel accuracy (--accuracy runs)": [(19, 95.0)],
                      "ours (ESS), pixel accuracy (--accuracy runs)": [(19, 93.0), (150, 59.0)]}
    result = CliRunner().invoke(app, ["profile", "--device", "meta", "--accuracy", str(tmp_path / "nope"),
                                      "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and result.output.startswith(f"error: --accuracy {tmp_path / 'nope'}: no readable")
    assert not (tmp_path / "x").exists()
