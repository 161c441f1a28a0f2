"""Layout discovery: block lists, block streams, submodules, TeaCache probes, residual segments, errors."""

import pytest
import torch
from torch import nn

from caching import (BlockLayout, CacheConfig, IntervalTrigger, ModelLayout, ResidualScope, ReuseUpdate,
                     apply_cache, get_preset, register_block_layout, register_model_layout, remove_cache)
from caching import discovery, layouts
from caching.layouts import get_block_layout, get_model_layout, range_segments, transformer_blocks
from caching.testing import TINY_MODELS, drive, tiny_model
from tiny_pipelines import FAMILIES, denoiser


@pytest.fixture(scope="module")
def built():
    """family name -> (pipeline, call kwargs), each built once."""
    cache = {}

    def get(name):
        if name not in cache:
            pipe, kwargs = FAMILIES[name].build()
            pipe.set_progress_bar_config(disable=True)
            cache[name] = pipe, kwargs
        return cache[name]
    return get


class _Stop(Exception):
    pass


def _first_call(module: nn.Module, fn) -> dict:
    """The keyword arguments (positional ones named) of `module`'s first call while `fn()` runs."""
    seen = {}

    def grab(mod, args, kwargs):
        seen.update(zip(discovery.forward_parameters(type(mod)), args), **kwargs)
        raise _Stop

    handle = module.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        fn()
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen


def _model_call(built, name) -> tuple[nn.Module, dict]:
    pipe, kwargs = built(name)
    model = denoiser(pipe)
    return model, _first_call(model, lambda: pipe(**kwargs, num_inference_steps=2, output_type="latent"))


# ----------------------------------------------------------------------------------------- models


def test_the_formerly_hand_written_model_layouts_are_discovered():
    expected = {"FluxTransformer2DModel": ("transformer_blocks", "single_transformer_blocks"),
                "SD3Transformer2DModel": ("transformer_blocks",), "DiTTransformer2DModel": ("transformer_blocks",),
                "PixArtTransformer2DModel": ("transformer_blocks",), "WanTransformer3DModel": ("blocks",)}
    for name in TINY_MODELS:
        model = tiny_model(name).model
        assert not any(cls in layouts._MODEL_LAYOUTS for cls in type(model).__mro__)
        layout = get_model_layout(model)
        assert (layout.kind, layout.block_lists) == (("unet", ()) if name.startswith("UNet") else
                                                     ("transformer", expected[name]))


def test_lumina2_chain_leaves_out_the_refiners(built):
    model = denoiser(built("lumina2")[0])
    assert len(model.noise_refiner) == len(model.context_refiner) == 1
    assert get_model_layout(model).block_lists == ("layers",)


# ----------------------------------------------------------------------------------------- blocks


def test_diffusers_block_metadata_agrees_with_the_forward_source():
    from diffusers.hooks._helpers import TransformerBlockRegistry
    TransformerBlockRegistry._register()
    checked = 0
    for cls, meta in TransformerBlockRegistry._registry.items():
        if meta.hidden_states_argument_name != "hidden_states" or meta.return_encoder_hidden_states_index is None:
            continue
        assert discovery.streams_from_source(cls) == discovery.streams_from_metadata(cls), cls.__name__
        checked += 1
    assert checked >= 12


# family -> {block list: (hidden_out, encoder_out, attention, token modules)}
BLOCKS = {
    "flux2": {"transformer_blocks": (1, 0, {"self": ("attn",), "mlp": ("ff", "ff_context")}, ("ff", "ff_context")),
              "single_transformer_blocks": (None, None, {"self": ("attn",)}, ())},
    "chroma": {"transformer_blocks": (1, 0, {"self": ("attn",), "mlp": ("ff", "ff_context")}, ("ff", "ff_context")),
               "single_transformer_blocks": (None, None, {"self": ("attn",)}, ())},
    "qwenimage": {"transformer_blocks": (1, 0, {"self": ("attn",), "mlp": ("img_mlp", "txt_mlp")},
                                         ("img_mlp", "txt_mlp"))},
    "hunyuanvideo": {"transformer_blocks": (0, 1, {"self": ("attn",), "mlp": ("ff", "ff_context")},
                                            ("ff", "ff_context")),
                     "single_transformer_blocks": (0, 1, {"self": ("attn",)}, ())},
    "ltx": {"transformer_blocks": (None, None, {"self": ("attn1",), "cross": ("attn2",), "mlp": ("ff",)}, ("ff",))},
    "sana": {"transformer_blocks": (None, None, {"self": ("attn1",), "cross": ("attn2",)}, ())},
    "lumina2": {"layers": (None, None, {"self": ("attn",), "mlp": ("feed_forward",)}, ("feed_forward",))},
    "mochi": {"transformer_blocks": (0, 1, {"self": ("attn1",), "mlp": ("ff", "ff_context")}, ("ff", "ff_context"))},
    "auraflow": {"joint_transformer_blocks": (1, 0, {"self": ("attn",), "mlp": ("ff", "ff_context")},
                                              ("ff", "ff_context")),
                 "single_transformer_blocks": (None, None, {"self": ("attn",), "mlp": ("ff",)}, ("ff",))},
    "hidream": {"double_stream_blocks": (0, 1, {"self": ("block.attn1",), "mlp": ("block.ff_i", "block.ff_t")},
                                         ("block.ff_i", "block.ff_t")),
                "single_stream_blocks": (None, None, {"self": ("block.attn1",), "mlp": ("block.ff_i",)},
                                         ("block.ff_i",))},
}


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_discovered_block_layouts(built, name):
    model = denoiser(built(name)[0])
    for attr, (hidden_out, encoder_out, attention, tokens) in BLOCKS[name].items():
        layout = get_block_layout(getattr(model, attr)[0])
        encoder_arg = None if encoder_out is None else "encoder_hidden_states"
        assert (layout.hidden_arg, layout.encoder_arg, layout.hidden_out, layout.encoder_out) == (
            "hidden_states", encoder_arg, hidden_out, encoder_out), attr
        assert (dict(layout.attention), layout.token_modules, layout.probe is not None) == (attention, tokens, True)


# ----------------------------------------------------------------------------------------- probes


@pytest.mark.parametrize("name", ["flux", "sd3", "wan21", "pixart-alpha"])
def test_first_attention_probe_equals_the_hand_written_probe(built, name):
    """On the first block, which TeaCache watches (FLUX's single blocks attend over text and image
    tokens together, so there the first attention's input is wider than the image stream)."""
    model, call = _model_call(built, name)
    ref = transformer_blocks(model, get_model_layout(model))[0]
    bound = _first_call(ref.module, lambda: model(**call))
    attention = tuple(a for kind in ("self", "cross") for a in ref.layout.attention.get(kind, ()))
    generic = discovery.first_attention_probe(attention)(ref.module, bound)
    assert torch.equal(generic, ref.layout.probe(ref.module, bound))


# ----------------------------------------------------------------------------------------- segments


@pytest.mark.parametrize("name, lists", [
    ("flux", [("transformer_blocks", "single_transformer_blocks")]),
    ("hunyuanvideo", [("transformer_blocks", "single_transformer_blocks")]),
    ("flux2", [("transformer_blocks",), ("single_transformer_blocks",)]),
    ("chroma", [("transformer_blocks",), ("single_transformer_blocks",)]),
    ("auraflow", [("joint_transformer_blocks",), ("single_transformer_blocks",)]),
    ("hidream", [("double_stream_blocks",), ("single_stream_blocks",)]),
])
def test_residual_segments_break_where_text_joins_the_image_stream(built, name, lists):
    model = denoiser(built(name)[0])
    segments = range_segments(transformer_blocks(model, get_model_layout(model)))
    assert [tuple(dict.fromkeys(ref.name.split(".")[0] for ref in segment)) for segment in segments] == lists


@pytest.mark.parametrize("name", ["flux2", "chroma", "auraflow", "hidream", "hunyuanvideo", "qwenimage", "mochi"])
def test_a_reused_residual_reproduces_the_computed_call(built, name):
    """Same inputs at steps 0 and 1: the cached step 1 adds each segment's residual of step 0."""
    model, call = _model_call(built, name)
    config = CacheConfig(IntervalTrigger(2), ResidualScope(), ReuseUpdate())
    handle = apply_cache(model, config)
    try:
        computed, cached = drive(model, [call, call])
    finally:
        remove_cache(model)
    assert handle.stats.last_run().steps_cached() == [1]
    assert torch.allclose(cached, computed, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["qwenimage", "ltx", "mochi"])
def test_teacache_runs_on_a_discovered_probe(built, name):
    model, call = _model_call(built, name)
    handle = apply_cache(model, get_preset("teacache", threshold=2.0, coefficients=[1.0, 0.0], cooldown=0.0))
    try:
        drive(model, [call] * 4)
    finally:
        remove_cache(model)
    assert handle.stats.last_run().steps_cached() == [1, 2, 3]  # identical inputs: zero change


# ----------------------------------------------------------------------------------------- errors


class LinearBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, hidden_states, temb):
        return hidden_states + self.proj(hidden_states) * temb[:, None, None]


class GatedBlock(nn.Module):
    def forward(self, hidden_states, encoder_hidden_states):
        return hidden_states, hidden_states.mean(), encoder_hidden_states


class StageNet(nn.Module):
    def __init__(self, block=LinearBlock) -> None:
        super().__init__()
        self.stages = nn.ModuleList([block(), block()])

    def forward(self, hidden_states, temb):
        for stage in self.stages:
            hidden_states = stage(hidden_states, temb)
        return (hidden_states,)


class ZippedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([LinearBlock()])
        self.layers = nn.ModuleList([LinearBlock()])

    def forward(self, hidden_states, temb):
        for spatial, temporal in zip(self.blocks, self.layers):
            hidden_states = temporal(spatial(hidden_states, temb), temb)
        return (hidden_states,)


def _error(fn) -> str:
    with pytest.raises(ValueError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_an_unknown_chain_names_the_model_registration(monkeypatch):
    message = _error(lambda: get_model_layout(StageNet()))
    assert message.endswith("register its chain with caching.register_model_layout(StageNet, caching.ModelLayout("
                            "kind='transformer', block_lists=('stages',)))")
    assert "interleaved" in _error(lambda: get_model_layout(ZippedNet()))

    monkeypatch.setattr(layouts, "_MODEL_LAYOUTS", dict(layouts._MODEL_LAYOUTS))
    register_model_layout(StageNet, ModelLayout("transformer", ("stages",)))
    model = StageNet()
    handle = apply_cache(model, get_preset("taylorseer", interval=2, warmup=0.0))
    try:
        drive(model, [dict(hidden_states=torch.ones(1, 3, 4), temb=torch.full((1,), 0.5))] * 2)
    finally:
        remove_cache(model)
    assert handle.stats.last_run().steps_cached() == [1] and get_block_layout(model.stages[0]).hidden_out is None


def test_ambiguous_returns_and_missing_probes_name_the_block_registration(monkeypatch):
    monkeypatch.setattr(layouts, "_MODEL_LAYOUTS", dict(layouts._MODEL_LAYOUTS))
    register_model_layout(StageNet, ModelLayout("transformer", ("stages",)))
    message = _error(lambda: get_block_layout(GatedBlock()))
    assert message.endswith("register it with caching.register_block_layout(GatedBlock, caching.BlockLayout("
                            "hidden_arg='hidden_states', encoder_arg='encoder_hidden_states', "
                            "hidden_out=<index or None>, encoder_out=<index or None>))")
    message = _error(lambda: apply_cache(StageNet(), get_preset("teacache", coefficients=[1.0, 0.0])))
    assert message.endswith("register one with caching.register_block_layout(LinearBlock, caching.BlockLayout("
                            "hidden_arg='hidden_states', encoder_arg=None, hidden_out=None, encoder_out=None, "
                            "attention={}, token_modules=(), probe=<fn(block, bound_args) -> tensor (B, N, D)>))")


def test_a_registration_overrides_discovery(built, monkeypatch):
    model = denoiser(built("ltx")[0])
    block = model.transformer_blocks[0]
    monkeypatch.setattr(layouts, "_BLOCK_LAYOUTS", dict(layouts._BLOCK_LAYOUTS))
    register_block_layout(type(block), BlockLayout(attention={"mlp": ("ff",)}))
    assert get_block_layout(block).attention == {"mlp": ("ff",)} and get_block_layout(block).probe is None
    handle = apply_cache(model, get_preset("fora", interval=2))
    remove_cache(model)
    assert handle.num_hooks == len(model.transformer_blocks) + 1  # one "mlp" hook per block, one on the model
