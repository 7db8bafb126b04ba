"""Plate diagrams of programs by pyro.render_model (pyro-vae graph)."""

import shutil

import pytest
import torch

from pyro_vae import ModelConfig, build_model
from pyro_vae import graph as graphs
from pyro_vae.cli import main

pytest.importorskip("graphviz", reason="the graph extra: pip install 'pyro-vae[graph]'")


def program(model="vae"):
    return build_model(ModelConfig(model=model, z_dim=2, hidden_dims=(4,)), (1, 2, 2))


def edges(source):
    return {tuple(part.strip() for part in line.split("->")) for line in source.splitlines() if "->" in line}


def test_the_vae_model_and_guide_in_one_plate():
    x = torch.zeros(3, 1, 2, 2)
    model = graphs.program_graph(program(), x).source
    assert "subgraph cluster_data" in model and edges(model) == {("z", "x")}
    assert "z ~ Normal" in model and "x ~ Bernoulli" in model and "fillcolor=gray" in model  # x is observed
    guide = graphs.program_graph(program(), x, guide=True).source
    assert "z ~ Normal" in guide and "x ~" not in guide and edges(guide) == set()


def test_the_two_layer_model_draws_its_hierarchy():
    x = torch.zeros(3, 1, 2, 2)
    assert edges(graphs.program_graph(program("vae2"), x).source) == {("z2", "z1"), ("z1", "x")}
    assert edges(graphs.program_graph(program("vae2"), x, guide=True).source) == {("z1", "z2")}


def test_writing_dot_text_needs_no_graphviz_program(tmp_path, monkeypatch):
    graph = graphs.program_graph(program(), torch.zeros(2, 1, 2, 2))
    assert graphs.write_graph(graph, tmp_path / "vae.dot").read_text() == graph.source
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install graphviz.*or write vae.dot instead"):
        graphs.write_graph(graph, tmp_path / "vae.png")
    with pytest.raises(ValueError, match="choose a .png, .svg, .pdf or .dot file"):
        graphs.write_graph(graph, tmp_path / "vae.jpg")


@pytest.mark.skipif(shutil.which("dot") is None, reason="drawing needs Graphviz's dot program")
def test_graph_command_draws_a_png(tmp_path, data_dir):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--train-limit", "100", "--test-limit", "10", "--epochs", "1",
                 "--batch-size", "50", "--z-dim", "2", "--hidden-dims", "8", "--data-dir", str(data_dir),
                 "--no-progress"]) == 0
    assert main(["graph", str(run)]) == 0
    assert (run / "model.png").read_bytes().startswith(b"\x89PNG")
    assert main(["graph", str(run), "--guide", "--out", str(tmp_path / "q.dot")]) == 0
    assert "z ~ Normal" in (tmp_path / "q.dot").read_text()
