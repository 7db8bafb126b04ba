"""A VAE trained on MNIST in plain PyTorch, the way one writes it by hand: the reference
of experiments/whole_process.py for what ``pyro-vae train`` does with its defaults.

The same work as ``pyro-vae train --epochs E`` with the default configuration: MNIST's
60,000 training images read by torchvision and held on the device, binarised afresh
each epoch, shuffled, batches of 128 gathered by index; the same network (the
benchmark's ``ReferenceVAE``: 784-400-50, softplus) and one-sample ELBO; fused Adam at
1e-3; after each epoch the ELBO (Monte Carlo log-likelihood, closed-form KL) of the
first 10,000 training images and of the 10,000 test images (binarised once), a metrics
line appended to a file and a checkpoint written atomically. What it does not do, and
pyro-vae does: check the data, check each update for NaN, record versions and
configuration, resume.

    python experiments/handwritten_train.py --epochs 4 --out /tmp/hand
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import ReferenceVAE  # noqa: E402


def load_mnist(root: str, train: bool, device) -> torch.Tensor:
    from torchvision import datasets

    ds = datasets.MNIST(root, train=train, download=False)
    return (ds.data.reshape(-1, 784).float() / 255).to(device)


@torch.no_grad()
def elbo(model: ReferenceVAE, x: torch.Tensor, batch_size: int = 1000) -> float:
    """Mean per-image ELBO: one-sample log p(x|z) minus the closed-form KL to N(0, I)."""
    total = 0.0
    for xb in x.split(batch_size):
        h = model.enc(xb)
        loc, scale = model.enc_loc(h), F.softplus(model.enc_scale(h))
        z = loc + scale * torch.randn_like(loc)
        log_lik = -F.binary_cross_entropy_with_logits(model.dec(z), xb, reduction="none").sum(-1)
        kl = 0.5 * (loc.pow(2) + scale.pow(2) - 1).sum(-1) - scale.log().sum(-1)
        total += float((log_lik - kl).sum())
    return total / x.shape[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=os.environ.get("PYRO_VAE_DATA", "data"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--limit", type=int, default=None, help="the first N training and test images only (smoke runs)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    train = load_mnist(args.data_dir, True, device)[: args.limit]
    test = torch.bernoulli(load_mnist(args.data_dir, False, device)[: args.limit],
                           generator=torch.Generator(device).manual_seed(1))
    model = ReferenceVAE().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, fused=True)
    args.out.mkdir(parents=True, exist_ok=True)
    n, steps = train.shape[0], math.ceil(train.shape[0] / args.batch_size)
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        images = torch.bernoulli(train)
        perm = torch.randperm(n, device=device)
        loss_sum = torch.zeros((), device=device)
        for step in range(steps):
            x = images[perm[step * args.batch_size : (step + 1) * args.batch_size]]
            opt.zero_grad(set_to_none=True)
            loss = model.loss(x, n)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
        seconds = time.perf_counter() - t0
        record = {"epoch": epoch + 1, "train_objective": -float(loss_sum) / steps / n,
                  "train_elbo": elbo(model, images[:10_000]), "test_elbo": elbo(model, test), "seconds": seconds}
        with open(args.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        tmp = args.out / "checkpoint.pt.tmp"
        torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "epoch": epoch + 1}, tmp)
        os.replace(tmp, args.out / "checkpoint.pt")
        print(f"epoch {epoch + 1}/{args.epochs}  train elbo {record['train_elbo']:9.3f}  "
              f"test elbo {record['test_elbo']:9.3f}  {seconds:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
