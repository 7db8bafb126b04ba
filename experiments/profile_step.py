"""Where a training step's time goes: pyro_vae's step in phases, beside the reference,
and what each speed lever is worth, all in one process and interleaved (in a fresh
random order each round).

    python experiments/profile_step.py --batch-size 128
    python experiments/profile_step.py --batch-size 1024 --steps 6
    python experiments/profile_step.py --batch-size 1024 --steps 6 --default-malloc

Phases of ours (engine ``captured``, as ``pyro-vae train`` steps): forward (the recorded
Trace_ELBO of model and guide), backward, the non-finite check, Adam. Levers, each
undone alone: ``eager Pyro`` (engine ``module``: Pyro's Python at every step),
``Pyro's Trace_ELBO`` (its differentiable_loss, which reads every site's value to the
host), ``validation`` (Pyro's validation left on during steps), ``plain Normal scoring``
(prior and guide scored by Pyro's general Normal formula instead of
pyro_vae.distributions), ``norm check before Adam`` (one multi-tensor 2-norm, read before
the step, instead of AMP's fused check feeding fused Adam's found_inf), ``per-tensor
check`` (one isfinite pass per gradient, read before the step), ``torch Bernoulli``
(``dist.Bernoulli(logits).to_event(1)`` instead of ``BernoulliImage``), ``cross-entropy
Bernoulli`` (``BernoulliImage`` as it was: one cross-entropy call per image), ``foreach Adam``
(instead of fused), ``no check`` (the non-finite check skipped: its cost). ``--jit`` times
ours with Pyro's TorchScript-traced ``JitTrace_ELBO`` instead. ``--compile`` times ours
with the recorded graph compiled by inductor beside the reference, eager and compiled
(an experiment: no engine compiles). ``--explain-compile`` prints
what ``torch._dynamo`` makes of the ELBO module (graphs and graph breaks) and exits.
``--default-malloc`` leaves glibc's malloc settings as they are
(pyro_vae.steps.keep_freed_memory is process-wide, so it is a run-level switch).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import ReferenceVAE, fake_mnist  # noqa: E402

from pyro.infer import JitTrace_ELBO, Trace_ELBO  # noqa: E402

from pyro_vae.capture import CapturedLoss  # noqa: E402
from pyro_vae.config import ModelConfig  # noqa: E402
from pyro_vae.objectives import build_elbo  # noqa: E402
from pyro_vae.steps import _non_finite, keep_freed_memory  # noqa: E402
from pyro_vae.models import build_model as build_vae  # noqa: E402
from pyro_vae.models.vae import VAE  # noqa: E402


def per_tensor_check(loss, grads):
    return ~torch.isfinite(loss) | torch.stack([~torch.isfinite(g).all() for g in grads]).any()


class TorchBernoulli(torch.nn.Module):
    name = "bernoulli"
    binary = True
    mean = staticmethod(torch.sigmoid)
    check_data = staticmethod(lambda x, what="": None)

    def forward(self, logits):
        return dist.Bernoulli(logits=logits).to_event(1)


class CrossEntropyImage(dist.Independent):
    """``Bernoulli(logits).to_event(1)`` scored by one ``binary_cross_entropy_with_logits``
    call summed per image: pyro_vae's likelihood before it became ``x . l - sum softplus(l)``."""

    def log_prob(self, value):
        logits, value = torch.broadcast_tensors(self.base_dist.logits, value)
        return -torch.nn.functional.binary_cross_entropy_with_logits(logits, value, reduction="none").sum(-1)


class CrossEntropyBernoulli(TorchBernoulli):
    def forward(self, logits):
        return CrossEntropyImage(dist.Bernoulli(logits=logits), 1)


class CompiledCapturedLoss(CapturedLoss):
    """The recorded graph compiled by inductor (an experiment, not an engine)."""

    def _record(self, key, batch, static, dynamic):
        graph = super()._record(key, batch, static, dynamic)
        if graph is not None:
            t0 = time.perf_counter()
            graph = torch.compile(graph, dynamic=False)
            graph(*self._module_tensors, *batch.values(), *dynamic.values())  # compile now (forward; backward on first use)
            self.compile_seconds = time.perf_counter() - t0
            self.graphs[key] = graph
        return graph


def no_check(loss, grads):
    return torch.zeros((), dtype=torch.bool)


class PlainNormalVAE(VAE):
    """The VAE with prior and guide scored by Pyro's general Normal formula."""

    def prior(self):
        return dist.Normal(self.prior_loc, self.prior_scale).expand([self.z_dim]).to_event(1)

    def posterior(self, loc, scale):
        return dist.Normal(loc, scale).to_event(1)


def found_inf_check(loss, grads, found_inf, one):
    """pyro_vae.steps.ModuleEngine's check: one fused pass sets found_inf, which fused Adam reads."""
    found_inf.copy_(~torch.isfinite(loss))
    torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, one)


def ours(batch_size, n, validate=False, check="found_inf", likelihood=None, capture=True, elbo=None, adam="fused",
         compile_graph=False, plain_normals=False):
    vae = build_vae(ModelConfig(), (1, 28, 28))
    if plain_normals:
        vae = PlainNormalVAE(vae.encoder, vae.decoder, vae.z_dim, vae.image_shape, vae.likelihood)
    if likelihood is not None:
        vae.likelihood = likelihood
    loss_fn = (elbo or build_elbo("trace"))(vae.model, vae.guide)
    if capture:
        loss_fn = (CompiledCapturedLoss if compile_graph else CapturedLoss)(loss_fn, vae)
    params = list(vae.parameters())
    opt = torch.optim.Adam(params, lr=1e-3, **{adam: True})
    found_inf, one = torch.zeros(()), torch.ones(())
    if check == "found_inf":
        opt.found_inf = found_inf
    pyro.get_param_store().scope().__enter__()
    def step(x, clock):
        opt.zero_grad(set_to_none=True)
        with pyro.validation_enabled(validate):
            loss = loss_fn(x=x, num_data=n)
        clock("forward")
        loss.backward()
        clock("backward")
        grads = [p.grad for p in params if p.grad is not None]
        if check == "found_inf":  # read after the step, which fused Adam skips when it is set
            found_inf_check(loss.detach(), grads, found_inf, one)
            clock("check")
            opt.step()
            clock("adam")
            bool(found_inf)
        else:  # read before the step
            bool(check(loss.detach(), grads))
            clock("check")
            opt.step()
            clock("adam")

    step.loss_fn = loss_fn
    return step


def reference(batch_size, n, compile_loss=False):
    model = ReferenceVAE()
    loss_of = torch.compile(model.loss) if compile_loss else model.loss
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)

    def step(x, clock):
        opt.zero_grad(set_to_none=True)
        loss = loss_of(x, n)
        clock("forward")
        loss.backward()
        clock("backward")
        opt.step()
        clock("adam")

    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=50, help="steps per block")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--default-malloc", action="store_true", help="leave glibc's malloc settings alone")
    p.add_argument("--compile", action="store_true",
                   help="ours with the recorded graph compiled by inductor, beside the reference eager and compiled")
    p.add_argument("--jit", action="store_true", help="time ours with JitTrace_ELBO against the reference only")
    p.add_argument("--explain-compile", action="store_true", help="torch._dynamo.explain of the ELBO module, then exit")
    args = p.parse_args(argv)
    if args.explain_compile:
        return explain_compile(args.batch_size)
    if not args.default_malloc:
        keep_freed_memory()
    torch.manual_seed(0)
    data = fake_mnist(torch.device("cpu"))
    n, bs = data.shape[0], args.batch_size
    variants = {
        "reference": reference(bs, n),
        "ours": ours(bs, n),
        "ours, eager Pyro": ours(bs, n, capture=False),
        "ours, eager, Pyro's Trace_ELBO": ours(bs, n, capture=False, elbo=Trace_ELBO(max_plate_nesting=1)),
        "ours, validation on": ours(bs, n, validate=True),
        "ours, plain Normal scoring": ours(bs, n, plain_normals=True),
        "ours, norm check before Adam": ours(bs, n, check=_non_finite),
        "ours, per-tensor check": ours(bs, n, check=per_tensor_check),
        "ours, torch Bernoulli": ours(bs, n, likelihood=TorchBernoulli()),
        "ours, cross-entropy Bernoulli": ours(bs, n, likelihood=CrossEntropyBernoulli()),
        "ours, foreach Adam": ours(bs, n, adam="foreach", check=_non_finite),
        "ours, no check": ours(bs, n, check=no_check),
    }
    if args.compile:
        from torch._inductor import config as inductor_config

        inductor_config.fallback_random = True  # the eager random stream, as the recording draws
        variants = {"reference": variants["reference"], "reference, compiled": reference(bs, n, compile_loss=True),
                    "ours": variants["ours"], "ours, recorded graph compiled": ours(bs, n, compile_graph=True),
                    "ours, recorded graph compiled, no check": ours(bs, n, compile_graph=True, check=no_check)}
    if args.jit:
        # alone beside the reference: the variants share Pyro's param store, whose tensors
        # JitTrace_ELBO feeds into its traced function, so a second VAE's would collide
        variants = {"reference": variants["reference"],
                    "ours, JitTrace_ELBO": ours(bs, n, capture=False,
                                                elbo=JitTrace_ELBO(max_plate_nesting=1, ignore_jit_warnings=True))}
    phases = {name: {} for name in variants}
    totals = {name: [] for name in variants}
    batches = n // bs
    order = random.Random(0)
    for r in range(args.rounds + 1):  # round 0 warms up
        names = list(variants)
        order.shuffle(names)  # a fresh order each round: no variant always runs after the same one
        for name in names:
            step = variants[name]
            spent = {}
            last = [time.perf_counter()]

            def clock(phase):
                now = time.perf_counter()
                spent[phase] = spent.get(phase, 0.0) + now - last[0]
                last[0] = now

            t0 = time.perf_counter()
            for i in range(args.steps):
                j = (r * args.steps + i) % batches
                last[0] = time.perf_counter()
                step(data[j * bs : (j + 1) * bs], clock)
            if r:
                totals[name].append((time.perf_counter() - t0) / args.steps * 1000)
                for phase, s in spent.items():
                    phases[name].setdefault(phase, []).append(s / args.steps * 1000)
    ref = statistics.median(totals["reference"])
    print(f"batch {bs}, median ms per step over {args.rounds} interleaved blocks of {args.steps} steps")
    print(f"{'variant':32} {'total':>7} {'ratio':>6}  phases")
    for name in variants:
        tot = statistics.median(totals[name])
        ph = "  ".join(f"{k} {statistics.median(v):.2f}" for k, v in phases[name].items())
        print(f"{name:32} {tot:7.2f} {ref / tot:6.3f}  {ph}")
    for name, step in variants.items():
        seconds = getattr(getattr(step, "loss_fn", None), "compile_seconds", None)
        if seconds is not None:
            print(f"{name}: compiling the recorded forward pass took {seconds:.1f} s")
    return 0


def explain_compile(batch_size: int) -> int:
    """What torch.compile's graph capture makes of Pyro's ELBO on the VAE."""
    import torch._dynamo

    vae = build_vae(ModelConfig(), (1, 28, 28))
    loss_fn = build_elbo("trace")(vae.model, vae.guide)
    x = fake_mnist(torch.device("cpu"), batch_size)
    with pyro.validation_enabled(False):
        loss_fn(x=x, num_data=60_000)  # register the networks with Pyro first
        report = torch._dynamo.explain(loss_fn)(x=x, num_data=60_000)
    print(f"graphs {report.graph_count}, graph breaks {report.graph_break_count}")
    reasons = {}
    for brk in report.break_reasons:
        first = brk.reason.splitlines()[0]
        reasons[first] = reasons.get(first, 0) + 1
    for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
        print(f"{count:3d} x {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
