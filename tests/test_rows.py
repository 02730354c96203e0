"""fxrep.export.rows: computing only the token rows a program's outputs read gives the same outputs
(hypothesis over transformer shapes, poolings, masks and near misses that mix tokens), really moves the
selection up where it can, keeps a dynamic batch dynamic, and leaves the input program unchanged. The
ExecuTorch lowering of a pruned program is tested at the end and in test_mobile.py."""

import collections

import pytest
import timm
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.export import Dim

import fxrep
import fxrep.models  # noqa: F401
from fxrep.equivalence import relative_error
from fxrep.export.rows import prune_unread_rows
from fxrep.ir.recorded import recorded_shape
from fxrep.numerics import MODEL_RTOL

aten = torch.ops.aten
SETTINGS = settings(max_examples=25, deadline=None)
TOLERANCE = MODEL_RTOL[torch.float32]  # docs/numerics.md


class Block(nn.Module):
    """A pre-norm transformer block written with F.scaled_dot_product_attention, optionally masked or
    causal."""

    def __init__(self, dim: int, heads: int, mask: str):
        super().__init__()
        self.heads, self.mask = heads, mask
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x, bias):
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        masks = {"none": None, "rows": bias, "keys": bias[:1], "heads": bias.expand(self.heads, n, n)}
        mask = masks.get(self.mask)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.mask == "causal")
        x = x + self.proj(o.transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Toy(nn.Module):
    """Blocks, then an optional op that mixes tokens (a near miss: rows must not move through it), a final
    norm, and a pooling that reads some rows."""

    def __init__(self, dim, heads, depth, mask, mixer, pool, tokens):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, mask) for _ in range(depth))
        self.mixer, self.pool = mixer, pool
        self.tokens = nn.Linear(tokens, tokens)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 3)
        self.bias = nn.Parameter(torch.randn(tokens, tokens))

    def forward(self, x):
        for block in self.blocks:
            x = block(x, self.bias)
        if self.mixer == "token_linear":
            x = x + self.tokens(x.transpose(1, 2)).transpose(1, 2)
        elif self.mixer == "cumsum":
            x = x.cumsum(1)
        x = self.norm(x)
        if self.pool == "first":
            x = x[:, 0]
        elif self.pool == "last":
            x = x[:, -1]
        elif self.pool == "range":
            x = x[:, 1:3].sum(1)
        elif self.pool == "two":  # DeiT-distilled style: two different rows, both read
            x = x[:, 0] + x[:, 1]
        else:
            x = x.mean(1)
        return self.head(x)


def _linear_rows(program) -> list[int]:
    """The token count each Linear of the program runs on (3-d Linears only)."""
    return [recorded_shape(n)[1] for n in program.graph.nodes
            if n.target is aten.linear.default and len(recorded_shape(n)) == 3]


@st.composite
def toy_case(draw):
    heads = draw(st.integers(1, 3))
    dim, depth, tokens = heads * draw(st.integers(1, 4)) * 2, draw(st.integers(1, 3)), draw(st.integers(3, 7))
    mask = draw(st.sampled_from(["none", "rows", "keys", "heads", "causal"]))
    mixer = draw(st.sampled_from(["none", "none", "token_linear", "cumsum"]))
    pool = draw(st.sampled_from(["first", "last", "range", "two", "avg"]))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = Toy(dim, heads, depth, mask, mixer, pool, tokens).eval()
    return model, torch.randn(draw(st.integers(1, 3)), tokens, dim) * draw(st.sampled_from([1.0, 10.0]))


@SETTINGS
@given(toy_case())
def test_pruned_program_computes_the_same_outputs(case):
    model, x = case
    program = torch.export.export(model, (x,))
    before = [n.format_node() for n in program.graph.nodes]
    pruned = prune_unread_rows(program, (x,))
    assert [n.format_node() for n in program.graph.nodes] == before  # the input program is left as it was
    fresh = torch.randn_like(x)
    with torch.no_grad():
        assert relative_error(model(fresh), pruned.module()(fresh)) <= TOLERANCE
    rows, n, depth = _linear_rows(pruned), x.shape[1], len(model.blocks)
    blocks = rows[:4 * depth]  # per block: qkv, proj, fc1, fc2 (then the token mixer, if any)
    if model.pool in ("first", "last", "range") and model.mixer == "none":
        # the last block's output projection and MLP run on the selected rows only; its qkv Linear (keys and
        # values) and every earlier block on every token
        want = 2 if model.pool == "range" else 1
        assert blocks == [n] * (4 * depth - 3) + [want] * 3, rows
    else:  # rows mixed after the blocks, or every row read: every block runs on every token
        assert blocks == [n] * (4 * depth), rows


def test_rows_stop_at_ops_that_mix_tokens():
    """Near misses: a Linear over the token axis and a cumulative sum read every row, and a causal attention's
    mask depends on where its query rows sit; the selection stays below each of them."""
    torch.manual_seed(0)
    for mixer, mask in (("token_linear", "none"), ("cumsum", "none"), ("none", "causal")):
        model, x = Toy(8, 2, 1, mask, mixer, "last", 5).eval(), torch.randn(2, 5, 8)
        pruned = prune_unread_rows(torch.export.export(model, (x,)), (x,))
        with torch.no_grad():
            assert relative_error(model(x), pruned.module()(x)) <= TOLERANCE
        rows = _linear_rows(pruned)
        if mask == "causal":  # the selection stops after the attention: qkv whole, proj and MLP on one row
            assert rows == [5, 1, 1, 1], rows
        else:
            assert rows[:4] == [5, 5, 5, 5], rows


def _fused_d3b4(batch: int):
    """A small registered d3b4, fully joined, fused: (model, fused, example input)."""
    torch.manual_seed(0)
    model = timm.create_model("fxrep_deit_tiny_d3b4", embed_dim=32, num_heads=2, num_classes=5, img_size=32,
                              patch_size=8).eval()
    model.set_join(1.0)
    x = torch.randn(batch, 3, 32, 32)
    return model, fxrep.fuse(model, example_inputs=(x,)), x


def test_a_fused_model_runs_its_last_block_for_the_class_token_with_a_dynamic_batch():
    model, fused, x = _fused_d3b4(2)
    program = torch.export.export(fused, (x,), dynamic_shapes=({0: Dim("batch", min=1, max=64)},))
    pruned = prune_unread_rows(program, (x,))
    counts = collections.Counter(_linear_rows(pruned))
    # three blocks: the first two on all 17 tokens, the last one's query, output and MLP Linears on one row
    assert counts[1] >= 3 and counts[17] >= 5, counts
    for batch in (1, 3):
        y = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            assert relative_error(model(y), pruned.module()(y)) <= TOLERANCE


def test_a_timm_vit_with_register_tokens_prunes_exactly():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, reg_tokens=2,
                              num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    pruned = prune_unread_rows(torch.export.export(model, (x,)), (x,))
    assert 1 in _linear_rows(pruned)
    with torch.no_grad():
        assert relative_error(model(x), pruned.module()(x)) <= TOLERANCE


def test_a_program_with_nothing_to_prune_is_returned_as_it_is():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, global_pool="avg",
                              num_classes=4).eval()
    x = torch.randn(1, 3, 32, 32)
    program = torch.export.export(model, (x,))
    pruned = prune_unread_rows(program, (x,))
    with torch.no_grad():
        assert relative_error(model(x), pruned.module()(x)) <= TOLERANCE
    assert 1 not in _linear_rows(pruned)


def test_a_pruning_that_changes_the_output_is_an_internal_error(monkeypatch):
    import fxrep.export.rows

    def wrong_linear(b, node, axis, start, stop):  # cuts the wrong rows
        return b.call(node.target, [b.rows(node.args[0], axis, start + 1, stop + 1), *node.args[1:]])

    monkeypatch.setitem(fxrep.export.rows.RULES, aten.linear.default, wrong_linear)
    model, x = Toy(8, 2, 1, "none", "none", "first", 5).eval(), torch.randn(2, 5, 8)
    with pytest.raises(fxrep.InternalError, match="prune_rows=False"):
        prune_unread_rows(torch.export.export(model, (x,)), (x,))


def test_a_pruned_fused_model_lowers_to_one_xnnpack_delegate():
    pytest.importorskip("executorch")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from fxrep.export.xnnpack import rewrite_for_xnnpack

    _, fused, x = _fused_d3b4(1)
    program = rewrite_for_xnnpack(prune_unread_rows(torch.export.export(fused, (x,)), (x,)), (x,))
    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).exported_program()
    outside = collections.Counter(getattr(n.target, "__name__", str(n.target)) for n in lowered.graph.nodes
                                  if n.op == "call_function" and "getitem" not in str(n.target))
    assert outside.pop("executorch_call_delegate") == 1, outside
    assert outside == {"aten.expand_copy.default": 1}, outside


@pytest.mark.parametrize("name", ["cait_xxs24_224", "crossvit_tiny_240", "pit_xs_224", "xcit_nano_12_p8_224"])
def test_models_written_by_others_prune_exactly(name):
    """timm models with their own class-token heads (CaiT's class attention, CrossViT's two branches, PiT's
    pooling stages, XCiT's class attention): pruned, and exact on a fresh input (benchmarks/rows_zoo.py runs
    the whole zoo)."""
    from benchmarks.zoo_harness import build

    model, x = build("timm", name)
    program = torch.export.export(model, (x,))
    pruned = prune_unread_rows(program, (x,))
    assert pruned is not program
    fresh = torch.randn_like(x)
    with torch.no_grad():
        assert relative_error(model(fresh), pruned.module()(fresh)) <= TOLERANCE
