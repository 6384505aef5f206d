"""pytest configuration and what the program tests share.

A fixed hypothesis profile, so CI runs the same examples every time; a tiny network
configuration for fast end-to-end runs; and a way to call a program's main() as the
command line would.
"""
import os

import pytest
import torch

import cli
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=25, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

HERE = os.path.dirname(os.path.abspath(__file__))
# train.py flags for a network of a few hundred thousand parameters and T = 20: runs in seconds; float32
# whatever the CPU (--amp auto would pick bf16 on some machines and not on others).
TINY = ["--ch", "32", "--ch-mult", "1,2", "--num-res-blocks", "1", "--attn-resolutions", "", "--T", "20",
        "--n-samples", "4", "--batch-size", "32", "--log-every", "5", "--device", "cpu", "--amp", "off"]


def run_program(main, argv):
    """A program's main(argv) as the command line runs it: returns the exit code (0, 2, ...)."""
    try:
        cli.run(lambda: main(list(argv)))
    except SystemExit as e:
        return e.code
    return 0


@pytest.fixture
def one_thread():
    """Tiny networks gain nothing from threads, and on a busy 2-core machine OpenMP threads wait on
    each other (measured: the same tiny bound took 0.23 s on one thread, 1.3-47 s on two)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_port(directory, size):
    """A random diffusers UNet2DModel with the DDPM architecture, saved as the Hugging Face ports are."""
    from diffusers import UNet2DModel
    from safetensors.torch import save_file
    torch.manual_seed(0)
    model = UNet2DModel(sample_size=size, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"), downsample_padding=0, flip_sin_to_cos=False,
                        freq_shift=1, norm_eps=1e-6, norm_num_groups=32, attention_head_dim=None)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "diffusion_pytorch_model.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    model.save_config(directory)
    return path
