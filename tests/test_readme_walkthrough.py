"""The README's interpretability section runs as written: its python blocks, in order, in one namespace.

"## Looking inside" shows the named points and hooks, then walks through one question (logit difference -> direct
logit attribution -> patching grid -> attention view) on the bundled model. A README edit that breaks a block, or
a code change that breaks the README, fails here; so does a figure its comments quote that no longer holds.
The blocks run in a temporary directory, where the files they write (view.html) land.
"""
import os
import re

import pytest
import torch

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
SECTION = "## Looking inside"


def section_blocks() -> list[tuple[int, str]]:
    """(line number, code) of each ```python block between SECTION and the next level-2 heading."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    end = len(text) if end < 0 else end
    first_line = text[:start].count("\n") + 1
    return [(first_line + text[start:start + m.start()].count("\n") + 1, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```", text[start:end], re.S | re.M)]


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    """The namespace the blocks leave behind, and the directory they ran in."""
    directory = tmp_path_factory.mktemp("readme")
    namespace = {"__name__": "readme"}
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        for line, code in section_blocks():
            exec(compile(code, f"README.md, block at line {line}", "exec"), namespace)
    finally:
        os.chdir(cwd)
    return namespace, directory


def test_the_section_has_the_walkthrough_blocks():
    codes = [code for _, code in section_blocks()]
    assert len(codes) >= 5, f"expected the hooks block and the four walk-through steps, found {len(codes)} blocks"
    for step in ("# 1. the logit difference", "# 2. direct logit attribution", "# 3. activation patching",
                 "# 4. where those heads look"):
        assert any(step in code for code in codes), f"no README block starts step {step!r}"


def test_the_walkthrough_runs_and_its_figures_hold(walkthrough):
    ns, directory = walkthrough
    model, cache = ns["model"], ns["cache"]
    _, first = model.run_with_cache(ns["ids"], names=["h.1.attn.pattern"])         # the hooks block
    assert first["h.1.attn.pattern"].shape == (1, 4, 15, 15)
    assert len(ns["clean"]) == len(ns["corrupted"]) == 18                           # step 1
    assert ns["clean"][:-1] == ns["corrupted"][:-1] and ns["clean"][-1] != ns["corrupted"][-1]
    assert round(float(ns["diff"].detach()), 2) == 2.63
    assert cache["pattern", 1] is cache["h.1.attn.pattern"]
    results, labels = cache.stack_head_results(pos_slice=-1, return_labels=True)  # step 2
    assert results.shape == (16, 1, model.config.n_embd) and labels[0] == "L0H0" and labels[-1] == "L3H3"
    assert ns["lens"].shape == (5, 1)
    assert [label for label, _ in ns["top"]] == ["h.0.mlp.out", "h.1.mlp.out", "h.2.mlp.out"]   # step 2
    assert [round(v, 2) for _, v in ns["top"]] == [1.59, 0.45, 0.13]
    assert float(ns["per_head"].abs().max()) < 0.03
    grid = ns["grid"]                                                               # step 3
    assert round(grid.clean, 2) == 2.63 and round(grid.corrupted, 2) == 0.11
    torch.testing.assert_close(grid.values[:, -1], torch.full((4,), grid.clean), atol=1e-4, rtol=0)
    torch.testing.assert_close(grid.values[:, :-1], torch.full_like(grid.values[:, :-1], grid.corrupted),
                               atol=1e-4, rtol=0)
    assert [round(v, 2) for v in ns["mlps"].values.tolist()] == [2.71, 1.19, 0.67, 0.34]
    heads = ns["heads"].values
    assert round(float(heads[0, 1]), 2) == -0.72 and round(float(heads[0, 2]), 2) == -0.56
    r = torch.corrcoef(torch.stack([heads.flatten(), ns["quick"].values.flatten()]))[0, 1]
    assert round(float(r), 3) == 0.999 and ns["layer"] == 0
    page = (directory / "view.html").read_text(encoding="utf-8")                    # step 4
    assert page.startswith("<!DOCTYPE html>") and "layer 0, 4 heads, 18 tokens" in page
    last_query = cache["h.0.attn.pattern"][0, :, -1]                                # (heads, keys)
    assert float(last_query.max()) < 0.1, "the README says no key gets above 0.1 from ' I' in layer 0"
