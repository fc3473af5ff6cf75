"""A black-box reward for train.py: any function of PIL images and prompts, no gradient needed.

    python train.py --tasks aesthetic,examples.black_box:darkness

trains the aesthetic task, then this one through LaSRO's latent surrogate (surrogate.py). The
function gets the decoded uint8 images and their prompts and returns one float per image, higher
is better. It may call anything: a file encoder, a detector, a scoring service.
"""


def darkness(images, prompts):
    """1 − mean luminance in [0, 1]: darker images score higher."""
    return [1 - sum(im.convert("L").getdata()) / (255 * im.width * im.height) for im in images]
