"""experiments/sd15.py: the SD-1.5-shaped dry run. Always: the configs give SD-1.5's published parameter
counts (built on the meta device, no memory) and the locally built tokenizer tokenises as CLIP's own BPE
(open_clip's SimpleTokenizer is the oracle). Opt-in (RID_SD15_DRY_RUN=1; about 10 GB of disk, 16 GB of
memory, 15 min on 2 cores): the full build and every CLI on it at 64², export equal through diffusers."""
import json
import os

import pytest
import torch

from experiments import sd15


def test_configs_are_sd15_sized():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        built = {"unet": UNet2DConditionModel(**sd15.UNET), "vae": AutoencoderKL(**sd15.VAE),
                 "text_encoder": CLIPTextModel(CLIPTextConfig(**sd15.TEXT))}
    for k, m in built.items():
        assert sum(p.numel() for p in m.parameters()) == sd15.PARAMS[k], k


def test_tokenizer_is_clips_own(tmp_path):
    from open_clip.tokenizer import SimpleTokenizer

    tok = sd15.clip_tokenizer(tmp_path / "tok")
    oracle = SimpleTokenizer()
    assert len(tok) == 49408 and tok.model_max_length == 77
    for text in ("a photo of a cat", "An astronaut riding a horse, 4k, trending on artstation!",
                 "pneumonoultramicroscopic naïve café 😀"):
        ids = tok(text).input_ids
        assert ids == [49406] + oracle.encode(text) + [49407], text


@pytest.mark.skipif(os.environ.get("RID_SD15_DRY_RUN") != "1", reason="opt-in: RID_SD15_DRY_RUN=1 (10 GB disk, 15 min)")
def test_dry_run_at_sd15_size(tmp_path):
    d = tmp_path / "sd15"
    assert sd15.main(["build", str(d)]) == 0
    counts = json.loads((d / "build.json").read_text())
    assert all(counts[k] == v for k, v in sd15.PARAMS.items())
    code = sd15.main(["run", str(d)])
    result = json.loads((d / "dry_run.json").read_text())
    assert code == 0, [s for s in result["steps"] if s["rc"]]
    assert result["checks"]["export_rel_err"] < 1e-4
    from safetensors.torch import load_file

    for s in result["steps"]:  # the step changed the trainable adapter, and nothing is non-finite
        stage = d / "runs" / f"{s['method']}-{s['resolution']}" / f"stage1-{s['task']}"
        w = load_file(str(stage / "adapters.safetensors"))
        assert all(torch.isfinite(v).all() for v in w.values()) and any(v.abs().sum() > 0 for v in w.values())
        rows = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 1 and all(abs(v) < float("inf") for v in rows[0].values() if isinstance(v, float))
