"""The mini world: a CPU-scale text-to-image world in which the RIL experiment runs for real.

Committed artifacts live in mini/world/ (rebuilt, seeded, by `python -m mini build`):
    model/        diffusers layout (unet, vae, text_encoder, tokenizer, scheduler) -> rid.load_models(str(MODEL))
    rewards.json  RewardSpec for rewards.load_spec(REWARD_SPEC): the domain CLIP (clip score, FID
                  features), the LAION-layout aesthetic MLP on it, and the hps model (that CLIP with
                  its image tower fine-tuned on preference pairs, as HPSv2; mini.domain.preference)
    prompts/      train.txt (750) and test.txt (50) captions, disjoint combinations
    fid_ref.safetensors, world.json (sizes, default DDIM steps / guidance, measured quality)
The flow world, mini/flow/ (`python -m mini build-flow`, mini/flow_build.py): an SD3-architecture transformer on a
rectified flow with the world's VAE, text encoder and tokenizer, a StableDiffusion3Pipeline directory ->
rid.load_models(str(FLOW)); flow.json in it (default Euler steps / guidance, measured quality).
"""
import os
from pathlib import Path

WORLD = Path(__file__).resolve().parent / "world"
MODEL = WORLD / "model"
REWARD_SPEC = WORLD / "rewards.json"
FLOW = Path(__file__).resolve().parent / "flow"


def is_model(model) -> bool:
    """True when `model` (a path or hub id) is this world's model directory: the one check of
    "is this the mini world?" that train.py and eval.py share."""
    return os.path.realpath(str(model)) == os.path.realpath(MODEL) and MODEL.is_dir()


__all__ = ["WORLD", "MODEL", "REWARD_SPEC", "FLOW", "is_model"]
