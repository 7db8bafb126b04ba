"""One epoch of pyro_vae's conditional VAE against one of Pyro's own CVAE example
(examples/cvae in pyro-ppl's repository: Sohn et al.'s quadrant completion on MNIST), on
the same machine, in the same process, with the same networks and estimator.

    python experiments/cvae_vs_pyro.py                   # the full training set, 1 quadrant
    python experiments/cvae_vs_pyro.py --rounds 2 --json /tmp/cvae-vs-pyro.json
    python experiments/cvae_vs_pyro.py --smoke           # seconds: 300 images, small networks

Both sides: the CVAE of the tutorial, z 200, prior and recognition networks 784-500-500
and generation network 200-500-500-784 (ReLU), its prior network reading a baseline
network's guess (500-500, not trained here: its weights do not change the cost), batch
128, Adam at lr 1e-3, ``Trace_ELBO`` with one particle. Pyro's side is the example's own
code, imported from its folder (``--pyro-examples``; not copied): its ``CVAE`` class,
its data set classes and data loader as its ``get_data`` builds them (read from our data
folder instead of ``../data``), and its ``cvae.train`` for the whole epoch. pyro_vae's
side is ``pyro-vae train --model cvae --baseline RUN`` for one epoch, the baseline run
trained for one epoch first (not timed).

Two times per side, in seconds:

* ``steps``: the epoch's SVI steps alone. Pyro's: ``SVI(cvae.model, cvae.guide,
  pyro.optim.Adam, Trace_ELBO()).step`` over the example's data loader (its per-image
  transforms included, as in its script). pyro_vae's: the ``seconds`` its metrics record
  for the epoch (the steps, with the epoch's binarisation).
* ``epoch``: everything one epoch of each script does. Pyro's ``cvae.train(num_epochs=1)``:
  the training steps, a pass over the test set (``evaluate_loss``) and a saved model.
  pyro_vae's ``train``: the steps, the ELBO of 10,000 training and of the 10,000 test
  images, and the checkpoint.

Differences that are part of each design, not of the measurement: the example feeds its
networks whole images (hidden pixels at -1) and computes all 784 outputs of the
generation network, pyro_vae only the pixels each network is about (the same functions,
docs/results.md); the example scores grey pixels, pyro_vae binarised ones (the same
operations).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_EXAMPLES = REPO.parent / "shared" / "peers" / "pyro-examples" / "examples" / "cvae"
sys.path.insert(0, str(REPO / "experiments"))

from machine import cpu_name  # noqa: E402

SIZES = {"z_dim": 200, "hidden": (500, 500)}  # the example's CVAE(200, 500, 500) and BaselineNet(500, 500)
SMOKE_SIZES = {"z_dim": 8, "hidden": (32, 32)}


def import_example(folder: Path):
    """The example's modules ``cvae``, ``baseline`` and ``mnist``, imported from its folder."""
    if not (folder / "cvae.py").is_file():
        raise SystemExit(f"Pyro's CVAE example is not in {folder}; give its folder with --pyro-examples")
    sys.path.insert(0, str(folder))
    import baseline
    import cvae
    import mnist

    return cvae, baseline, mnist


def example_loaders(mnist, data_dir: Path, quadrants: int, limit: int | None, batch_size: int = 128):
    """The example's data loaders, as its ``get_data`` builds them, reading ``data_dir``."""
    from torch.utils.data import DataLoader, Subset
    from torchvision.transforms import Compose

    transform = Compose([mnist.ToTensor(), mnist.MaskImages(num_quadrant_inputs=quadrants)])
    loaders, sizes = {}, {}
    for phase in ("train", "val"):
        data = mnist.CVAEMNIST(str(data_dir), train=phase == "train", transform=transform, download=False)
        if limit is not None:
            data = Subset(data, range(min(limit if phase == "train" else max(limit // 6, 1), len(data))))
        loaders[phase] = DataLoader(data, batch_size=batch_size, shuffle=phase == "train", num_workers=0)
        sizes[phase] = len(data)
    return loaders, sizes


def time_example(cvae, baseline, mnist, data_dir, quadrants, limit, sizes, device, lr, workdir) -> dict:
    """The example's seconds: its SVI steps over its loader for one epoch, then its ``cvae.train`` for one."""
    import pyro
    from pyro.infer import SVI, Trace_ELBO

    loaders, counts = example_loaders(mnist, data_dir, quadrants, limit)
    torch.manual_seed(0)
    pyro.clear_param_store()
    guesser = baseline.BaselineNet(*sizes["hidden"]).to(device)
    net = cvae.CVAE(sizes["z_dim"], *sizes["hidden"], guesser).to(device)
    svi = SVI(net.model, net.guide, pyro.optim.Adam({"lr": lr}), loss=Trace_ELBO())
    start = time.perf_counter()
    for batch in loaders["train"]:
        loss = svi.step(batch["input"].to(device), batch["output"].to(device))
    steps = time.perf_counter() - start
    devnull = open(os.devnull, "w")
    stderr, sys.stderr = sys.stderr, devnull  # its progress bars
    try:
        start = time.perf_counter()
        cvae.train(device=device, dataloaders=loaders, dataset_sizes=counts, learning_rate=lr, num_epochs=1,
                   early_stop_patience=3, model_path=str(workdir / "example-cvae.pth"),
                   pre_trained_baseline_net=guesser)
        epoch = time.perf_counter() - start
    finally:
        sys.stderr = stderr
        devnull.close()
    return {"steps": steps, "epoch": epoch, "last_loss_per_image": loss / loaders["train"].batch_size}


def time_ours(data_dir, quadrants, limit, sizes, device, lr, workdir, round_: int) -> dict:
    """pyro_vae's seconds: ``pyro-vae train --model cvae --baseline RUN`` for one epoch."""
    from pyro_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from pyro_vae.runs import read_metrics
    from pyro_vae.train import train

    data = DataConfig(dataset="mnist", data_dir=str(data_dir), train_limit=limit,
                      test_limit=None if limit is None else max(limit // 6, 1))
    settings = TrainConfig(epochs=1, batch_size=128, lr=lr, device=str(device), estimator="trace")
    nets = dict(hidden_dims=tuple(sizes["hidden"]), activation="relu", quadrants=quadrants)
    guesser = workdir / f"baseline-{round_}"
    if not guesser.exists():
        train(RunConfig(ModelConfig(model="cvae-baseline", **nets), data, settings), guesser, progress=False,
              log=lambda line: None)
    model = ModelConfig(model="cvae", z_dim=sizes["z_dim"], baseline=str(guesser), **nets)
    start = time.perf_counter()
    run_dir = workdir / f"cvae-{round_}"
    train(RunConfig(model, data, settings), run_dir, progress=False, log=lambda line: None, overwrite=True)
    epoch = time.perf_counter() - start
    record = read_metrics(run_dir)[-1]
    return {"steps": record["seconds"], "epoch": epoch, "train_elbo": record["train_elbo"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pyro-examples", type=Path, default=DEFAULT_EXAMPLES, metavar="FOLDER",
                        help=f"the folder of Pyro's CVAE example (default: {DEFAULT_EXAMPLES})")
    parser.add_argument("--data-dir", type=Path, default=None, help="MNIST's folder (default: $PYRO_VAE_DATA)")
    parser.add_argument("--quadrants", type=int, default=1, choices=(1, 2, 3))
    parser.add_argument("--train-limit", type=int, default=None, metavar="N", help="the first N training images")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds of both (default: 1)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    parser.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: torch's)")
    parser.add_argument("--smoke", action="store_true", help="300 images, small networks: seconds")
    parser.add_argument("--json", type=Path, help="write the times here")
    args = parser.parse_args(argv)

    from pyro_vae.data import resolve_data_dir
    from pyro_vae.runs import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = resolve_data_dir(args.data_dir)
    device = resolve_device(args.device)
    sizes = SMOKE_SIZES if args.smoke else SIZES
    limit = 300 if args.smoke and args.train_limit is None else args.train_limit
    cvae, baseline, mnist = import_example(args.pyro_examples)
    times = {"pyro example": [], "pyro_vae": []}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for r in range(args.rounds):  # alternating, so that a change in the machine's load hits both
            order = ("pyro example", "pyro_vae") if r % 2 == 0 else ("pyro_vae", "pyro example")
            for side in order:
                if side == "pyro example":
                    out = time_example(cvae, baseline, mnist, data_dir, args.quadrants, limit, sizes, device, 1e-3,
                                       workdir)
                else:
                    out = time_ours(data_dir, args.quadrants, limit, sizes, device, 1e-3, workdir, r)
                times[side].append(out)
                print(f"round {r + 1} {side}: " + ", ".join(f"{k} {v:.3f}" for k, v in out.items()), flush=True)
    median = {side: {k: statistics.median(t[k] for t in runs) for k in ("steps", "epoch")}
              for side, runs in times.items()}
    images = "60,000" if limit is None else f"{limit:,}"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{cpu_name()}, {torch.get_num_threads()} threads"
    print(f"\nOne epoch of {images} training images, {args.quadrants} quadrant(s) shown, z {sizes['z_dim']}, "
          f"hidden {sizes['hidden']}, batch 128, Trace_ELBO; {where}; median of {args.rounds} round(s)")
    print("| seconds per epoch | Pyro's example | pyro_vae | Pyro's / pyro_vae |")
    print("|---|---|---|---|")
    for what, name in (("steps", "SVI steps"), ("epoch", "whole epoch (steps, test pass, save)")):
        a, b = median["pyro example"][what], median["pyro_vae"][what]
        print(f"| {name} | {a:.2f} | {b:.2f} | {a / b:.2f} |")
    if args.json is not None:
        args.json.write_text(json.dumps({"device": where, "images": limit or 60000, "quadrants": args.quadrants,
                                         "sizes": sizes, "rounds": times, "median": median}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
