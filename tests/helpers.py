"""Small models and networks shared by the tests."""

import torch

from pyro_vae.models.vae import VAE
from pyro_vae.networks import MLPDecoder, MLPEncoder


def tiny_vae(image_shape=(1, 2, 2), z_dim=2, hidden=(5,), dtype=torch.float64, seed=0) -> VAE:
    torch.manual_seed(seed)
    d = 1
    for s in image_shape:
        d *= s
    vae = VAE(MLPEncoder(d, z_dim, hidden), MLPDecoder(d, z_dim, hidden), z_dim, image_shape)
    return vae.to(dtype)


def random_binary(n, image_shape=(1, 2, 2), dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, *image_shape), 0.4, dtype=dtype), generator=gen)
