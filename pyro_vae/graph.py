"""The plate diagram of a program's model or guide, drawn by ``pyro.render_model``.

Needs the optional extra ``pip install "pyro-vae[graph]"`` (the ``graphviz`` Python
package) and, to draw anything but DOT text, the Graphviz program ``dot``
(``apt-get install graphviz``, ``brew install graphviz`` or ``conda install graphviz``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyro
import torch

FORMATS = ("png", "svg", "pdf")  # drawn by dot; ".dot" and ".gv" files get the DOT text itself


def program_graph(program, x: torch.Tensor, *, guide: bool = False, num_data: int | None = None):
    """The ``graphviz.Digraph`` of ``program.model`` (or its ``guide``) on a minibatch ``x``:
    its sample sites, their dependencies, the plates, and each site's distribution."""
    try:
        import graphviz  # noqa: F401
    except ImportError:
        raise ImportError('drawing a program needs the graphviz Python package: pip install "pyro-vae[graph]"') \
            from None
    fn = program.guide if guide else program.model
    kwargs = {"num_data": num_data if num_data is not None else x.shape[0]}
    with pyro.get_param_store().scope(), torch.no_grad():
        return pyro.render_model(fn, model_args=(x,), model_kwargs=kwargs, render_distributions=True)


def write_graph(graph, path: str | Path) -> Path:
    """Write ``graph`` to ``path``: DOT text for ``.dot``/``.gv``, else drawn by ``dot`` in the suffix's format."""
    path = Path(path)
    suffix = path.suffix.lstrip(".").lower()
    if suffix in ("dot", "gv"):
        path.write_text(graph.source)
        return path
    if suffix not in FORMATS:
        raise ValueError(f"cannot draw {path.name}: choose a .png, .svg, .pdf or .dot file")
    if shutil.which("dot") is None:
        raise RuntimeError("drawing needs the Graphviz program dot, which is not on PATH: install it (apt-get install "
                           f"graphviz, brew install graphviz or conda install graphviz), or write {path.stem}.dot instead")
    return Path(graph.render(outfile=str(path), format=suffix, cleanup=True))
