"""Every Triton kernel compiled for the GPUs users have, on a machine without one.

`python -m rid_kernels.bench compile` compiles each kernel × each autotune config its pruning hook lets
it try on that arch × each dtype rid launches, for sm_80 (A100) and sm_90 (H100), through Triton's
ahead-of-time path (ASTSource + GPUTarget; ptxas and cuobjdump ship in triton's wheel). Oracle: the
cubin itself — stack 0 (no register spills) and shared memory within the arch's per-block maximum.
The LoRA group compiles in both of its modes: R = 12 (shrink fused) and R = 64 (h streamed), at SD-1.5's
64² self-attention and at odd widths; `compile --all` (every backbone's layer shapes × every R ≤ 128,
1690 compilations, ~40 min on 2 shared cores cold, measured once for the README) is too long for a
test; the tests check that the default's compilations are among the full matrix's.

It runs as a subprocess with TRITON_INTERPRET=0: this session decorated the kernels for the
interpreter, whose objects cannot be compiled. Triton caches every cubin on disk, so only the first
run after a kernel or config change pays the compile time (~10 min on 2 shared cores, see the README).
"""
import importlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")  # the compile path is Triton's own

import rid_kernels  # noqa: E402
from rid_kernels import bench, lora_group as lg  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "rows.json"
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-m", "rid_kernels.bench", "compile", "--json", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc


def test_every_config_compiles_without_spills_and_fits_shared_memory(rows):
    rows, proc = rows
    bad = [f"{r['kernel']} sm_{r['arch']} {r['layout']} {r['dtype']} {r['config']}: {bench.problems(r)}"
           for r in rows if bench.problems(r)]
    assert not bad, "\n".join(bad)
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_covers_every_kernel_arch_dtype_and_every_config_the_autotuner_may_try(rows):
    rows, _ = rows
    # every Triton kernel in rid_kernels/ (by the naming convention `..._kernel`), on every arch
    kernel_fns = {name for mod in ("rid_kernels.lora_group", "rid_kernels.jpeg", "rid_kernels.ema")
                  for name, obj in vars(importlib.import_module(mod)).items()
                  if name.endswith("_kernel") and hasattr(obj, "run")}
    assert kernel_fns == {"lora_group_kernel", "_jpeg_blocks_fwd_kernel", "_jpeg_blocks_bwd_kernel", "_ema_kernel"}
    for arch in bench.ARCHS:
        assert {r["fn"] for r in rows if r["arch"] == arch} == kernel_fns
        assert {r["dtype"] for r in rows if r["arch"] == arch and r["fn"] == "_ema_kernel"} == {"fp16", "bf16", "fp32"}
        for layout in ("aligned", "odd"):
            for label, dt, adt, precision in bench.LORA_CASES:
                aligned = layout == "aligned"
                may_try = lg.configs_for(arch, bench.ARCHS[arch], (dt, dt, adt), precision, aligned)
                # fp32 IEEE on Hopper: only 32×64 is spill-free at every R (lora_group._TILES); use TF32 there
                least = 1 if not aligned or (arch, label) == (90, "fp32") else 3
                assert len(may_try) >= least, f"sm_{arch} {layout} {label}: {len(may_try)} tiles"
                for pas in ("fwd", "bwd"):
                    for R in bench.LORA_RANKS:
                        got = [r["config"] for r in rows if r["arch"] == arch and r["layout"] == layout
                               and r["dtype"] == label and r["kernel"] == f"lora_group {pas}" and R in r["ranks"]]
                        assert sorted(got) == sorted(bench._cfg_name(c) for c in may_try), (arch, layout, label, pas, R)
    modes = {r["mode"]: r["ranks"] for r in rows if r["fn"] == "lora_group_kernel"}
    assert modes == {"fused": [12], "streamed": [64]}
    lora = [r for r in rows if r["fn"] == "lora_group_kernel"]
    assert all(r["constexprs"]["FUSE_SHRINK"] == (r["mode"] == "fused") for r in lora)


def test_full_matrix_covers_every_rank_and_backbone_layer_and_contains_the_default():
    """`compile --all` compiles each distinct specialisation of (layer shape, R) once: every R in 1..128 and
    every backbone layer lands in one, for every arch, dtype, layout, pass and tile the hook keeps; the
    default's compilations are among them (so its 0 problems are the full matrix's at R = 12 and 64)."""
    def key(j):
        return (j["arch"], j["kernel"], j["dtype"], j["config"], repr(bench.specialisation(j)))

    full = [j for j in bench.compile_jobs(everything=True) if j["fn"] == "lora_group_kernel"]
    default = [j for j in bench.compile_jobs() if j["fn"] == "lora_group_kernel"]
    assert {key(j) for j in default} <= {key(j) for j in full}
    assert len({key(j) for j in full}) == len(full)  # one compilation per specialisation
    layers = {f"{bb} {w}" for bb, rows in bench.BACKBONE_LORA_SHAPES.items() for w, *_ in rows}
    for arch in bench.ARCHS:
        for label, dt, adt, precision in bench.LORA_CASES:
            for layout in ("aligned", "odd"):
                kept = {bench._cfg_name(c) for c in lg.configs_for(arch, bench.ARCHS[arch], (dt, dt, adt), precision,
                                                                   layout == "aligned")}
                for pas in ("fwd", "bwd"):
                    for cfg in kept:
                        got = [j for j in full if (j["arch"], j["dtype"], j["layout"], j["kernel"], j["config"])
                               == (arch, label, layout, f"lora_group {pas}", cfg)]
                        assert set().union(*(j["ranks"] for j in got)) == set(range(1, 129)), (arch, label, cfg)
                        assert {w for j in got for w in j["shapes"]} == (
                            layers if layout == "aligned" else {bench.ODD_SHAPES[0][0]})
                        # every (layer shape, R) pair in exactly one compilation
                        n_shapes = sum(map(len, bench.BACKBONE_LORA_SHAPES.values())) if layout == "aligned" \
                            else len(bench.ODD_SHAPES)
                        assert sum(j["launches"] for j in got) == n_shapes * 128


# Each backbone as diffusers builds it (on the meta device: no weights), from its published config
BACKBONES = {
    "sd15": ("UNet2DConditionModel", dict(sample_size=64, cross_attention_dim=768)),
    "sdxl": ("UNet2DConditionModel", dict(
        sample_size=128, block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)),
    "sd3": ("SD3Transformer2DModel", dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                                          attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                          caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                                          pos_embed_max_size=192)),
    "flux": ("FluxTransformer2DModel", dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                            attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                            pooled_projection_dim=768, guidance_embeds=True)),
}
TARGETS = re.compile(r"\.(to_q|to_k|to_v|to_out\.0|ff\.net\.0\.proj|ff\.net\.2|add_[qkv]_proj|to_add_out|"
                     r"ff_context\.net\.0\.proj|ff_context\.net\.2|proj_mlp|single_transformer_blocks\.\d+\.proj_out)$")


@pytest.mark.parametrize("name", list(BACKBONES))
def test_backbone_shapes_are_the_models_lora_targets(name):
    """BACKBONE_LORA_SHAPES' (in, out) widths are exactly those of the LoRA-target linears diffusers builds."""
    diffusers = pytest.importorskip("diffusers")
    cls, config = BACKBONES[name]
    with torch.device("meta"):
        model = getattr(diffusers, cls)(**config)
    built = {(m.in_features, m.out_features) for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and TARGETS.search("." + n)}
    assert {(k, n) for _, _, k, n in bench.BACKBONE_LORA_SHAPES[name]} == built


def test_big_tiles_kept_where_they_fit():
    """128×256 tiles make the base GEMM fast; Hopper's wgmma compiles them without spills, Ampere's mma does not."""
    bf16 = (torch.bfloat16, torch.bfloat16, torch.float32)
    hopper = [bench._cfg_name(c) for c in lg.configs_for(90, bench.ARCHS[90], bf16, "ieee", True)]
    ampere = [bench._cfg_name(c) for c in lg.configs_for(80, bench.ARCHS[80], bf16, "ieee", True)]
    assert "128x256x64 w8 s3" in hopper and "128x128x64 w8 s3" in ampere
    assert not any("256" in name for name in ampere)


def test_shared_memory_formula_bounds_every_compiled_kernel(rows):
    """configs_for prunes on lg.smem_bytes without compiling (for GPUs with less shared memory than an
    A100, e.g. sm_86's 99 KB), so it must never underestimate what Triton allocates."""
    rows, _ = rows
    for r in rows:
        if not r["fn"] == "lora_group_kernel":
            continue
        cx = r["constexprs"]
        cfg = triton.Config({k: cx[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}, **r["options"])
        sizes = [getattr(torch, r["args"][p][1]).itemsize for p in ("x_ptr", "w_ptr", "a_ptr")]
        all_stages = r["arch"] >= 90 and not (sizes[0] == 4 and cx["PRECISION"] == "ieee")
        assert cx["BLOCK_R"] == lg.RANK_TILE
        assert lg.smem_bytes(cfg, all_stages, sizes) >= r["smem"], (r["config"], r["mode"])


def test_pruning_hook_is_the_autotuners_and_reads_the_device_and_the_launch(monkeypatch):
    assert lg.lora_group_kernel.early_config_prune is lg._prune
    bf16 = torch.empty(64, dtype=torch.bfloat16)
    fp32 = torch.empty(64)
    for cap, smem in [((8, 6), 99 * 1024), ((9, 0), 227 * 1024)]:  # an RTX 3090's shared memory, an H100's
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cap=cap: cap)
        monkeypatch.setattr(lg, "max_shared_memory", lambda index, smem=smem: smem)
        for K, a, aligned in [(320, fp32, True), (321, fp32, False), (320, fp32[1:], False)]:
            named = {"x_ptr": bf16, "w_ptr": bf16, "a_ptr": a, "b_ptr": fp32, "K": K, "N": 320}
            kept = lg._prune(lg.CONFIGS, named, PRECISION="ieee", BLOCK_R=lg.RANK_TILE)
            assert kept == lg.configs_for(10 * cap[0] + cap[1], smem, (torch.bfloat16,) * 2 + (torch.float32,),
                                          "ieee", aligned)
            assert kept and all(lg.smem_bytes(c, cap == (9, 0), (2, 2, 4)) <= smem for c in kept)


def test_cli_errors_are_one_line(capsys):
    assert bench.main(["compile", "--arch", "75"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--arch 75" in err and "80, 90" in err
    assert bench.main(["gpu-check", "--backbones", "sd15,sd2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--backbones sd15,sd2" in err and "sd15, sdxl, sd3, flux" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gets")
def test_gpu_check_without_a_gpu_says_so_in_one_line(capsys):
    assert bench.main(["gpu-check"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA GPU" in err


GPU_CHECK_TOY = dict(shapes={"toy": [("16 tokens", 16, 32, 48)], "odd": [("widths", 9, 33, 17)]},
                     jpeg_shape=(1, 3, 16, 16), ema_shapes=[(4, 8), (8, 4)] * 3)


def _cpu_ms(fn):
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def test_gpu_check_body_runs_on_a_cpu_under_the_interpreter(monkeypatch, capsys):
    """gpu-check's body (validation, autotune picks, every table) at toy shapes on the CPU with the Triton
    path forced through the interpreter: no line of it meets its first run on a GPU."""
    monkeypatch.setenv("RID_KERNELS", "triton")
    assert bench.gpu_check(torch.device("cpu"), 1, _cpu_ms, arch=90, max_smem=232448, **GPU_CHECK_TOY) == 0
    out = capsys.readouterr().out
    assert "All results match" in out
    rows = [line for line in out.splitlines() if line.startswith(("| toy 16 tokens |", "| odd widths |"))]
    assert len(rows) == 2 * len(bench.GPU_LORA_RANKS) * len(bench.GPU_LORA_CASES), out
    assert all(len(r.split(" | ")) == 11 for r in rows), rows  # every column of the LoRA table filled
    assert {r.split(" | ")[2] for r in rows} == {str(R) for R in bench.GPU_LORA_RANKS} == {"12", "64"}
    for table in ("### differentiable JPEG, 1×3×16×16", "| triton |", "| torch reference |", "### EMA over",
                  "| triton, one flat buffer |", "| torch._foreach_lerp_ per tensor |"):
        assert table in out, (table, out)


def test_gpu_check_reports_a_kernel_that_differs_from_its_reference(monkeypatch, capsys):
    monkeypatch.setenv("RID_KERNELS", "triton")
    real = rid_kernels.lora_group_linear
    monkeypatch.setattr(rid_kernels, "lora_group_linear", lambda *a, **k: real(*a, **k) * 1.01)
    assert bench.gpu_check(torch.device("cpu"), 1, _cpu_ms, arch=90, max_smem=232448, **GPU_CHECK_TOY) == 1
    out = capsys.readouterr().out
    assert "differs from the reference" in out and "All results match" not in out
